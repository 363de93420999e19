"""The memory bank of dense retrieval: document vectors on disk, exact (or faiss) top-k search.

A bank is a folder:
  embeddings.npy  float16 [N,D], L2-normalised rows; memory-mapped on load, never read whole
  meta.jsonl      one JSON object per row: id, text, image (path relative to the image root,
                  or to the bank folder when image_base == "bank"), has_text, has_image, meta
  bank.json       format, version, encoder fingerprint, dim, count, dtype, image_root, hash
Search is exact maximum inner product (= cosine): a chunked matmul over the memory map with a
running top-k merge, or faiss' IndexFlatIP when asked (or installed and the bank is large).

CM3leon's selection over a bank is in cm3leon/retrieval.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from cm3leon.encoder import DualEncoder, encode_documents  # re-exported: INTERFACES names them here
from cm3leon.errors import Cm3evalError

__all__ = ["RetrievalDoc", "MemoryBank", "EncoderMismatchError", "Progress", "load_image"]

BANK_FORMAT = "cm3eval-memory-bank"
BANK_VERSION = 1
EMB_FILE, META_FILE, INFO_FILE, IMAGES_DIR = "embeddings.npy", "meta.jsonl", "bank.json", "images"
_HEADER_LEN = 128  # our .npy headers have a fixed size, so appending rewrites them in place
# "auto" search backend: faiss (when installed) only for few queries on a large bank. Measured (bench
# retrieval, 200k x 512, 2 cores): IndexFlatIP ~1.7x faster than the chunked fp16 path at 8 queries
# (the fp16 -> fp32 conversion dominates there), but 2.5-4x slower from ~20 queries on (faiss'
# blocked BLAS + heaps), and it holds a float32 copy (2x the bank file) in RAM.
FAISS_AUTO_ROWS = 100_000
FAISS_AUTO_MAX_QUERIES = 16


class EncoderMismatchError(Cm3evalError, ValueError):
    """A bank queried or extended with an encoder other than the one that built it."""


# progress callback: called with the number of documents just added (the library prints nothing)
Progress = Callable[[int], None]


@dataclass
class RetrievalDoc:
    id: str
    text: str | None = None
    image: Image.Image | None = None
    image_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None


# ----------------------------------------------------------------------------- .npy with a fixed header


def _npy_header(n: int, d: int) -> bytes:
    body = "{'descr': '<f2', 'fortran_order': False, 'shape': (%d, %d), }" % (n, d)
    pad = _HEADER_LEN - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_LEN - 10) + body.encode() + b" " * pad + b"\n"


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            return shape, dtype, fortran, f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def load_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from None


def _confined(root: Path, rel: str, where: str) -> Path:
    """root/rel, refusing paths that leave root (absolute, '..', symlinks out)."""
    root = root.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise ValueError(f"{where}: image path {rel!r} is outside the image root {root}")
    return p


def _sha256_file(path: Path, offset: int = 0, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(1 << 24):
            h.update(block)
    return h


# ----------------------------------------------------------------------------- memory bank


class MemoryBank:
    """Document vectors + metadata. Built in memory (save later) or streamed into a folder."""

    def __init__(self, fingerprint: str, dim: int, encoder_name: str = "", image_root: str | Path | None = None) -> None:
        self.fingerprint, self.dim, self.encoder_name = fingerprint, int(dim), encoder_name
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.dir: Path | None = None
        self.content_hash: str | None = None
        # in-memory state (dir is None)
        self._chunks: list[np.ndarray] = []
        self._records: list[dict] = []
        self._images: dict[int, Image.Image] = {}  # rows whose image was given as a PIL image only
        # on-disk state (dir is set)
        self._emb: np.ndarray | None = None
        self._meta: np.ndarray | None = None  # meta.jsonl memory-mapped as bytes
        self._line_ends: np.ndarray | None = None
        self._count = 0
        self._faiss = None

    # --- construction
    @classmethod
    def build(cls, docs: Iterable[RetrievalDoc], encoder: DualEncoder, batch_size: int = 256,
              out_dir: str | Path | None = None, image_root: str | Path | None = None,
              progress: Progress | bool | None = None) -> "MemoryBank":
        """Encode `docs` in batches. With out_dir the vectors stream to disk (the bank never sits in RAM)."""
        bank = cls(encoder.fingerprint(), encoder.dim, getattr(encoder, "name", ""), image_root)
        if out_dir is not None:
            bank._create_dir(Path(out_dir))
        bank.append(docs, encoder, batch_size=batch_size, progress=progress)
        return bank

    @classmethod
    def create(cls, out_dir: str | Path, fingerprint: str, dim: int, encoder_name: str = "",
               image_root: str | Path | None = None) -> "MemoryBank":
        """An empty bank in a new folder, to fill with `append` or `add_vectors` + `flush`."""
        bank = cls(fingerprint, dim, encoder_name, image_root)
        bank._create_dir(Path(out_dir))
        return bank

    def _create_dir(self, out: Path) -> None:
        if (out / INFO_FILE).exists():
            raise FileExistsError(f"{out}: a memory bank is already there; load it and append, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / EMB_FILE, "wb") as f:
            f.write(_npy_header(0, self.dim))
        (out / META_FILE).write_bytes(b"")
        self.dir = out
        self._write_info()
        self._open_files()

    def append(self, docs: Iterable[RetrievalDoc], encoder: DualEncoder, batch_size: int = 256,
               progress: Progress | bool | None = None) -> int:
        """Encode and add documents; returns how many were added. `progress(n)` is called after each
        batch of n documents (a bool is accepted for older callers and shows nothing)."""
        self.check_encoder(encoder)
        advance = progress if callable(progress) else None
        added = 0
        for batch in _batches(docs, batch_size):
            self._add_batch(batch, encoder)
            added += len(batch)
            if advance is not None:
                advance(len(batch))
        self.flush()
        return added

    def _add_batch(self, batch: list[RetrievalDoc], encoder: DualEncoder) -> None:
        texts, images, records = [], [], []
        for doc in batch:
            if not doc.has_text and not doc.has_image:
                raise ValueError(f"document {doc.id!r} has neither text nor image")
            rec = {"id": str(doc.id), "text": doc.text, "image": None, "image_base": None,
                   "has_text": doc.has_text, "has_image": doc.has_image, "meta": doc.meta or {}}
            image = doc.image
            if doc.image_path is not None:
                if self.image_root is None:
                    raise ValueError(f"document {doc.id!r} has image_path {doc.image_path!r} but the bank has no image_root")
                p = _confined(self.image_root, str(doc.image_path), f"document {doc.id!r}")
                rec["image"], rec["image_base"] = p.relative_to(self.image_root).as_posix(), "root"
                if image is None:
                    image = load_image(p, f"document {doc.id!r}")
            texts.append(doc.text)
            images.append(image)
            records.append(rec)
        vecs = encode_documents(encoder, texts, images).numpy()
        first = len(self)
        for j, (rec, doc) in enumerate(zip(records, batch)):
            if rec["has_image"] and rec["image"] is None:  # a PIL image with no file: keep it with the bank
                rec["image"], rec["image_base"] = f"{IMAGES_DIR}/{first + j:09d}.png", "bank"
                if self.dir is not None:
                    (self.dir / IMAGES_DIR).mkdir(exist_ok=True)
                    doc.image.save(self.dir / rec["image"])
                else:
                    self._images[first + j] = doc.image
        self.add_vectors(vecs, records)

    def add_vectors(self, vecs: np.ndarray | torch.Tensor, records: list[dict] | None = None) -> None:
        """Add precomputed L2-normalised vectors [B,D] made by this bank's encoder (the caller vouches
        for that). records: one dict per row with at least "id" (default: the row number). On a bank
        folder, call `flush()` after the last batch (append does)."""
        vecs = np.asarray(vecs.detach().cpu() if isinstance(vecs, torch.Tensor) else vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have shape {vecs.shape}, the bank holds [N, {self.dim}]")
        norms = np.linalg.norm(vecs, axis=1)
        if not np.all(np.abs(norms - 1) < 1e-2):  # also catches NaN/inf
            bad = int(np.flatnonzero(~(np.abs(norms - 1) < 1e-2))[0])
            raise ValueError(f"vector {bad} of the batch has norm {norms[bad]:.4g}; bank vectors must be L2-normalised")
        first = len(self)
        if records is None:
            records = [{"id": str(first + j)} for j in range(len(vecs))]
        if len(records) != len(vecs):
            raise ValueError(f"{len(vecs)} vectors but {len(records)} records")
        half = vecs.astype(np.float16)
        self._faiss = None
        if self.dir is None:
            self._chunks.append(half)
            self._records.extend(records)
            return
        with open(self.dir / EMB_FILE, "ab") as f:
            f.write(np.ascontiguousarray(half).tobytes())
        with open(self.dir / META_FILE, "ab") as f:
            f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        self._count += len(records)

    def flush(self) -> None:
        """Bank folder: rewrite the .npy header and bank.json (count, hash), reopen the memory maps."""
        if self.dir is None:
            return
        path = self.dir / EMB_FILE
        _, _, _, offset = _read_npy_header(path)
        if offset == _HEADER_LEN:
            with open(path, "r+b") as f:
                f.write(_npy_header(self._count, self.dim))
        else:  # a header written by someone else: rewrite the file with ours
            tmp = path.with_suffix(".tmp")
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(offset)
                dst.write(_npy_header(self._count, self.dim))
                while block := src.read(1 << 24):
                    dst.write(block)
            os.replace(tmp, path)
        self._write_info()
        self._open_files()

    def _write_info(self) -> None:
        h = _sha256_file(self.dir / EMB_FILE, offset=_read_npy_header(self.dir / EMB_FILE)[3])
        h = _sha256_file(self.dir / META_FILE, h=h)
        self.content_hash = h.hexdigest()
        info = {"format": BANK_FORMAT, "version": BANK_VERSION, "encoder": self.fingerprint,
                "encoder_name": self.encoder_name, "dim": self.dim, "count": self._count, "dtype": "float16",
                "image_root": str(self.image_root) if self.image_root is not None else None, "hash": self.content_hash}
        tmp = self.dir / (INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.dir / INFO_FILE)  # bank.json last: a crash mid-append leaves a count mismatch, caught on load

    def save(self, out_dir: str | Path) -> Path:
        """Write an in-memory bank to a folder; the bank then lives there (memory-mapped)."""
        out = Path(out_dir)
        if self.dir is not None:
            raise ValueError(f"this bank already lives in {self.dir}")
        if (out / INFO_FILE).exists():
            raise FileExistsError(f"{out}: a memory bank is already there")
        out.mkdir(parents=True, exist_ok=True)
        emb = self.embeddings
        with open(out / EMB_FILE, "wb") as f:
            f.write(_npy_header(len(emb), self.dim))
            f.write(np.ascontiguousarray(emb).tobytes())
        with open(out / META_FILE, "wb") as f:
            f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in self._records))
        if self._images:
            (out / IMAGES_DIR).mkdir(exist_ok=True)
            for row, im in self._images.items():
                im.save(out / self._records[row]["image"])
        self.dir, self._count = out, len(emb)
        self._chunks, self._records, self._images = [], [], {}
        self._write_info()
        self._open_files()
        return out

    @classmethod
    def load(cls, bank_dir: str | Path, image_root: str | Path | None = None, verify_hash: bool = False) -> "MemoryBank":
        """Open a bank folder, memory-mapped. Sizes are always checked; the content hash when asked."""
        d = Path(bank_dir)
        info_path = d / INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: not found (build a bank with `cm3eval bank build`)")
        try:
            info = json.loads(info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{info_path}: not valid JSON ({e})") from None
        if info.get("format") != BANK_FORMAT or info.get("version") != BANK_VERSION:
            raise ValueError(f"{info_path}: format {info.get('format')!r} v{info.get('version')!r}, expected {BANK_FORMAT!r} v{BANK_VERSION}")
        for key in ("encoder", "dim", "count", "dtype", "hash"):
            if key not in info:
                raise ValueError(f"{info_path}: missing field {key!r}")
        if info["dtype"] != "float16":
            raise ValueError(f"{info_path}: dtype {info['dtype']!r}, only float16 banks are supported")
        bank = cls(info["encoder"], info["dim"], info.get("encoder_name", ""), image_root or info.get("image_root"))
        bank.dir, bank._count, bank.content_hash = d, int(info["count"]), info["hash"]
        bank._open_files()
        if verify_hash:
            h = _sha256_file(d / META_FILE, h=_sha256_file(d / EMB_FILE, offset=_read_npy_header(d / EMB_FILE)[3]))
            if h.hexdigest() != info["hash"]:
                raise ValueError(f"{d}: content hash {h.hexdigest()[:16]}… differs from bank.json's {info['hash'][:16]}… (files changed since the bank was written)")
        return bank

    def _open_files(self) -> None:
        d, n, dim = self.dir, self._count, self.dim
        path = d / EMB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        shape, dtype, fortran, offset = _read_npy_header(path)
        if dtype != np.float16 or fortran or len(shape) != 2:
            raise ValueError(f"{path}: holds {dtype} {shape}{' fortran-order' if fortran else ''}, expected C-order float16 [N,D]")
        if shape != (n, dim):
            raise ValueError(f"{path}: shape {shape} but bank.json says count={n}, dim={dim}")
        expected, actual = offset + n * dim * 2, path.stat().st_size
        if actual != expected:
            raise ValueError(f"{path}: {'truncated' if actual < expected else 'too long'}: expected {expected} bytes "
                             f"({n} x {dim} float16 + {offset}-byte header), found {actual}")
        self._emb = np.load(path, mmap_mode="r") if n else np.zeros((0, dim), np.float16)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found")
        self._meta = np.memmap(meta_path, dtype=np.uint8, mode="r") if meta_path.stat().st_size else np.zeros(0, np.uint8)
        self._line_ends = np.flatnonzero(self._meta == ord("\n"))
        if len(self._line_ends) != n or (n and self._line_ends[-1] != len(self._meta) - 1):
            raise ValueError(f"{meta_path}: {len(self._line_ends)} lines but bank.json says count={n}")

    # --- access
    def __len__(self) -> int:
        return self._count if self.dir is not None else len(self._records)

    @property
    def embeddings(self) -> np.ndarray:
        """[N,D] float16; a read-only memory map for banks on disk."""
        if self.dir is not None:
            return self._emb
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros((0, self.dim), np.float16)

    def record(self, row: int) -> dict:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a bank of {len(self)}")
        if self.dir is None:
            return self._records[row]
        start = 0 if row == 0 else int(self._line_ends[row - 1]) + 1
        line = bytes(self._meta[start : int(self._line_ends[row])])
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.dir / META_FILE}:{row + 1}: bad JSON ({e})") from None

    def doc(self, row: int, with_image: bool = True) -> RetrievalDoc:
        """The stored document; its image loaded from the image root (confined to it) or the bank folder."""
        rec = self.record(row)
        image = None
        if with_image and rec.get("image"):
            if rec.get("image_base") == "bank":
                if self.dir is None:
                    image = self._images[row]
                else:
                    image = load_image(_confined(self.dir, rec["image"], f"bank {self.dir} row {row}"), f"bank {self.dir}")
            else:
                if self.image_root is None:
                    raise ValueError(f"bank {self.dir}: row {row} has image {rec['image']!r} but no image root is set (pass image_root)")
                image = load_image(_confined(self.image_root, rec["image"], f"bank {self.dir} row {row}"), f"bank {self.dir}")
        return RetrievalDoc(id=rec["id"], text=rec.get("text"), image=image, image_path=rec.get("image"), meta=dict(rec.get("meta") or {}))

    def check_encoder(self, encoder: DualEncoder) -> None:
        fp = encoder.fingerprint()
        if fp != self.fingerprint:
            where = f"memory bank {self.dir}" if self.dir is not None else "the memory bank"
            raise EncoderMismatchError(
                f"{where} was built with encoder {self.fingerprint!r}, but the query encoder is {fp!r}; "
                "its vectors are not comparable — use the bank's encoder or rebuild the bank with this one")

    # --- search
    def search(self, query_vecs: torch.Tensor | np.ndarray, k: int, backend: str = "auto",
               chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by inner product. query_vecs [Q,D] -> (scores [Q,k'] float32, rows [Q,k'] int64),
        k' = min(k, N), best first. Rows index the bank (`doc(row)`, `record(row)["id"]`).
        backend: "torch" (chunked matmul over the memory map), "faiss" (IndexFlatIP), or "auto"
        (faiss when installed, N >= FAISS_AUTO_ROWS and Q <= FAISS_AUTO_MAX_QUERIES, else torch).
        Batch the queries: the torch path converts the bank once per call whatever Q is."""
        q = torch.as_tensor(np.asarray(query_vecs) if isinstance(query_vecs, np.ndarray) else query_vecs)
        q = q.detach().to("cpu", torch.float32).contiguous()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {tuple(q.shape)}, expected [Q, {self.dim}]")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(self)
        k = min(k, n)
        if k == 0:
            return torch.zeros(len(q), 0), torch.zeros(len(q), 0, dtype=torch.long)
        if backend == "auto":
            small = n >= FAISS_AUTO_ROWS and len(q) <= FAISS_AUTO_MAX_QUERIES
            backend = "faiss" if small and _faiss_available() else "torch"
        if backend == "faiss":
            return self._search_faiss(q, k, chunk_rows)
        if backend != "torch":
            raise ValueError(f"backend must be auto, torch or faiss, got {backend!r}")
        return _chunked_topk(self.embeddings, q, k, chunk_rows)

    def _search_faiss(self, q: torch.Tensor, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        if self._faiss is None:  # built once per bank state; holds a float32 copy (2x the fp16 file)
            index = faiss.IndexFlatIP(self.dim)
            emb = self.embeddings
            for s in range(0, len(emb), chunk_rows):
                index.add(np.ascontiguousarray(emb[s : s + chunk_rows], dtype=np.float32))
            self._faiss = index
        scores, rows = self._faiss.search(q.numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


def _chunked_topk(emb: np.ndarray, q: torch.Tensor, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over row chunks: each chunk is converted fp16 -> fp32 once and multiplied by all
    queries (one GEMM), so the bank is read once. The fp32 chunk and the [Q, chunk] score block are
    preallocated and reused: fresh 100+ MB tensors per chunk would cost page faults every time."""
    nq, n, d = len(q), len(emb), emb.shape[1]
    rows = max(1024, min(chunk_rows, (1 << 26) // max(1, nq)))  # score block <= ~256 MB whatever Q is
    rows = min(rows, n)
    chunk32 = torch.empty(rows, d)
    scores = torch.empty(nq, rows)
    best_s = torch.full((nq, k), -float("inf"))
    best_i = torch.zeros((nq, k), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # from_numpy on a read-only map: we never write to it
        for s in range(0, n, rows):
            m = min(rows, n - s)
            c, sc = chunk32[:m], scores[:, :m]
            c.copy_(torch.from_numpy(emb[s : s + m]))
            torch.mm(q, c.t(), out=sc) if m == rows else sc.copy_(q @ c.t())  # out= needs a contiguous target
            cs, ci = torch.topk(sc, min(k, m), dim=1)
            merged_s = torch.cat([best_s, cs], dim=1)
            merged_i = torch.cat([best_i, ci + s], dim=1)
            best_s, pos = torch.topk(merged_s, k, dim=1)
            best_i = torch.gather(merged_i, 1, pos)
    return best_s, best_i


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss search backend needs faiss: pip install 'cm3eval[faiss]'") from None
    return faiss


def _batches(docs: Iterable[RetrievalDoc], size: int) -> Iterator[list[RetrievalDoc]]:
    batch: list[RetrievalDoc] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
