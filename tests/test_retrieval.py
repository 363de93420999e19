"""Memory bank (search = brute force, files, validation) and CM3leon's selection rules."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cm3leon.encoder import NativeDualEncoder, NativeEncoderConfig
from cm3leon.retrieval import (EncoderMismatchError, MemoryBank, RetrievalDoc, Retriever, SelectionConfig,
                               query_dropout)

from real_data import COCO_MINI
SMALL = NativeEncoderConfig(image_channels=(8, 16, 16, 16), text_dim=32, text_heads=2, dim=16)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(bank: MemoryBank, q: torch.Tensor, k: int):
    full = q.double() @ torch.from_numpy(np.asarray(bank.embeddings, dtype=np.float64)).t()
    return torch.topk(full, k, dim=1)


class Table:
    """Encoder with given vectors: text -> vector; image -> vector by its top-left pixel colour."""
    name = "table"

    def __init__(self, text: dict, image: dict | None = None, dim: int = 8, fp: str = "table:v1") -> None:
        self.text, self.image, self.dim, self.fp = text, image or {}, dim, fp

    def encode_text(self, texts):
        return F.normalize(torch.tensor(np.array([self.text[t] for t in texts]), dtype=torch.float32), dim=-1)

    def encode_image(self, images):
        return F.normalize(torch.tensor(np.array([self.image[im.getpixel((0, 0))] for im in images]), dtype=torch.float32), dim=-1)

    def fingerprint(self):
        return self.fp


@pytest.fixture(scope="module")
def native():
    torch.manual_seed(0)
    return NativeDualEncoder(SMALL)


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("on_disk", [False, True])
def test_topk_equals_brute_force_across_chunks(tmp_path, on_disk):
    n, d = 3000, 32  # chunks of 1024 rows: boundaries at 1024 and 2048, a short last chunk
    vecs = _unit(n, d, 0)
    bank = MemoryBank.create(tmp_path / "b", "rand", d) if on_disk else MemoryBank("rand", d)
    bank.add_vectors(vecs[:1500])
    bank.add_vectors(vecs[1500:])
    bank.flush()
    # queries whose best match sits on each side of each chunk boundary, plus random ones
    q = torch.cat([torch.from_numpy(vecs[[0, 1023, 1024, 2047, 2048, n - 1]]), torch.from_numpy(_unit(20, d, 1))])
    ref_s, ref_i = _brute(bank, q, 7)
    scores, rows = bank.search(q, 7, backend="torch", chunk_rows=1024)
    assert torch.equal(rows, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, atol=1e-5, rtol=0)
    assert rows[:6, 0].tolist() == [0, 1023, 1024, 2047, 2048, n - 1]
    s_all, i_all = bank.search(q, 50, backend="torch", chunk_rows=100_000)  # one chunk
    assert torch.equal(i_all[:, :7], ref_i)
    assert bank.search(q[:2], 10_000)[1].shape == (2, n)  # k > N: all rows


def test_faiss_path_equals_brute_force(tmp_path):
    pytest.importorskip("faiss")
    bank = MemoryBank.create(tmp_path / "b", "rand", 16)
    bank.add_vectors(_unit(2500, 16, 2))
    bank.flush()
    q = torch.from_numpy(_unit(30, 16, 3))
    ref_s, ref_i = _brute(bank, q, 5)
    scores, rows = bank.search(q, 5, backend="faiss")
    assert torch.equal(rows, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, atol=1e-5, rtol=0)
    t_s, t_i = bank.search(q, 5, backend="torch")
    assert torch.equal(t_i, rows)


def test_faiss_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    bank = MemoryBank("rand", 4)
    bank.add_vectors(_unit(10, 4, 0))
    with pytest.raises(ImportError, match=r"cm3eval\[faiss\]"):
        bank.search(torch.from_numpy(_unit(1, 4, 1)), 2, backend="faiss")
    assert bank.search(torch.from_numpy(_unit(1, 4, 1)), 2)[1].shape == (1, 2)  # auto falls back to torch


def test_search_input_checks():
    bank = MemoryBank("rand", 4)
    bank.add_vectors(_unit(10, 4, 0))
    with pytest.raises(ValueError, match=r"expected \[Q, 4\]"):
        bank.search(torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="L2-normalised"):
        bank.add_vectors(np.ones((1, 4)))


# ----------------------------------------------------------------------------- files


def _docs(root: Path) -> list[RetrievalDoc]:
    colors = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (250, 250, 0)]
    (root / "img").mkdir(parents=True, exist_ok=True)
    docs = []
    for i, c in enumerate(colors):
        Image.new("RGB", (64, 64), c).save(root / "img" / f"{i}.png")
        docs.append(RetrievalDoc(id=f"f{i}", text=f"shape {i} colour {c}", image_path=f"img/{i}.png", meta={"i": i}))
    docs.append(RetrievalDoc(id="mem", text="an in-memory image", image=Image.new("RGB", (64, 64), (9, 99, 199))))
    docs.append(RetrievalDoc(id="txt", text="text only"))
    docs.append(RetrievalDoc(id="img", image_path="img/0.png"))
    return docs


def test_save_load_round_trip(native, tmp_path):
    docs = _docs(tmp_path / "root")
    bank = MemoryBank.build(docs, native, batch_size=3, image_root=tmp_path / "root", progress=False)
    emb = np.array(bank.embeddings)
    recs = [bank.record(i) for i in range(len(bank))]
    bank.save(tmp_path / "bank")
    back = MemoryBank.load(tmp_path / "bank", verify_hash=True)
    assert len(back) == 7 and back.dim == 16 and back.fingerprint == native.fingerprint()
    assert isinstance(back.embeddings, np.memmap)
    assert np.array_equal(np.asarray(back.embeddings), emb)
    assert [back.record(i) for i in range(7)] == recs
    assert back.content_hash == bank.content_hash
    d = back.doc(4)  # the in-memory image was written into the bank folder
    assert d.id == "mem" and d.image.getpixel((5, 5)) == (9, 99, 199)
    assert back.doc(1).image.getpixel((0, 0)) == (0, 0, 255) and back.doc(1).meta == {"i": 1}
    assert back.doc(5).image is None and back.doc(6).text is None
    # streaming build into a folder gives the same bank, and so does build + append
    streamed = MemoryBank.build(docs, native, out_dir=tmp_path / "s", image_root=tmp_path / "root", progress=False)
    part = MemoryBank.build(docs[:4], native, out_dir=tmp_path / "p", image_root=tmp_path / "root", progress=False)
    part = MemoryBank.load(tmp_path / "p")
    part.append(docs[4:], native, progress=False)
    assert streamed.content_hash == part.content_hash == back.content_hash
    assert np.array_equal(np.asarray(MemoryBank.load(tmp_path / "p").embeddings), emb)


def test_truncated_embeddings_is_a_clear_error(tmp_path):
    bank = MemoryBank.create(tmp_path / "b", "rand", 8)
    bank.add_vectors(_unit(100, 8, 0))
    bank.flush()
    path = tmp_path / "b" / "embeddings.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 16)
    with pytest.raises(ValueError, match=r"embeddings.npy: truncated: expected 1728 bytes .* found 1712"):
        MemoryBank.load(tmp_path / "b")


def test_bank_files_validated(tmp_path):
    bank = MemoryBank.create(tmp_path / "b", "rand", 8)
    bank.add_vectors(_unit(10, 8, 0))
    bank.flush()
    meta = tmp_path / "b" / "meta.jsonl"
    lines = meta.read_bytes()
    meta.write_bytes(lines + b'{"id": "extra"}\n')
    with pytest.raises(ValueError, match="meta.jsonl: 11 lines but bank.json says count=10"):
        MemoryBank.load(tmp_path / "b")
    meta.write_bytes(lines)
    info = json.loads((tmp_path / "b" / "bank.json").read_text())
    (tmp_path / "b" / "bank.json").write_text(json.dumps(info | {"dim": 9}))
    with pytest.raises(ValueError, match=r"embeddings.npy: shape \(10, 8\) but bank.json says count=10, dim=9"):
        MemoryBank.load(tmp_path / "b")
    (tmp_path / "b" / "bank.json").write_text(json.dumps(info | {"hash": "0" * 64}))
    with pytest.raises(ValueError, match="content hash"):
        MemoryBank.load(tmp_path / "b", verify_hash=True)
    with pytest.raises(FileNotFoundError, match="bank.json"):
        MemoryBank.load(tmp_path / "nothing")


def test_image_paths_confined_to_root(native, tmp_path):
    root = tmp_path / "root"
    docs = _docs(root)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="outside the image root"):
        MemoryBank.build([RetrievalDoc(id="x", image_path="../outside.png")], native, image_root=root, progress=False)
    bank = MemoryBank.build(docs[:2], native, out_dir=tmp_path / "b", image_root=root, progress=False)
    meta = tmp_path / "b" / "meta.jsonl"
    meta.write_text(meta.read_text().replace("img/1.png", "../outside.png"))
    bank = MemoryBank.load(tmp_path / "b")
    with pytest.raises(ValueError, match="outside the image root"):
        bank.doc(1)


def test_encoder_fingerprint_mismatch_refused(native, tmp_path):
    bank = MemoryBank.build(_docs(tmp_path / "root")[:2], native, out_dir=tmp_path / "b",
                            image_root=tmp_path / "root", progress=False)
    torch.manual_seed(1)
    other = NativeDualEncoder(SMALL)
    with pytest.raises(EncoderMismatchError, match="(?s)was built with encoder 'native:.*but the query encoder is 'native:"):
        Retriever(MemoryBank.load(tmp_path / "b"), other)
    with pytest.raises(EncoderMismatchError) as e:
        bank.append([RetrievalDoc(id="z", text="z")], other, progress=False)
    assert native.fingerprint() in str(e.value) and other.fingerprint() in str(e.value)
    Retriever(bank, native)  # the right encoder is accepted


# ----------------------------------------------------------------------------- selection


E = np.eye(8, dtype=np.float32)


def _doc_vec(rel: float, axis: int, tilt: float = 0.0, tilt_axis: int = 7) -> np.ndarray:
    """A unit vector with cosine exactly `rel` to the query direction e0; the rest along `axis` (+ tilt)."""
    other = E[axis] + tilt * E[tilt_axis]
    return rel * E[0] + math.sqrt(1 - rel**2) * other / np.linalg.norm(other)


def _selection_bank(rows: list[tuple[str, np.ndarray, bool, bool]]) -> MemoryBank:
    bank = MemoryBank("table:v1", 8)
    bank.add_vectors(np.stack([r[1] for r in rows]),
                     [{"id": r[0], "text": r[0], "has_text": r[2], "has_image": r[3]} for r in rows])
    return bank


def _ids(docs):
    return [d.id for d in docs]


def test_near_duplicate_of_query_skipped():
    bank = _selection_bank([("same", E[0], True, True), ("b", _doc_vec(0.8, 1), True, True),
                            ("c", _doc_vec(0.7, 2), True, True), ("d", _doc_vec(0.3, 3), True, True)])
    r = Retriever(bank, Table({"q": E[0]}))
    assert _ids(r.augment(RetrievalDoc(id="query", text="q"), k=2)) == ["b", "c"]
    r_loose = Retriever(bank, Table({"q": E[0]}), SelectionConfig(max_similarity=1.01))
    assert _ids(r_loose.augment(RetrievalDoc(id="query", text="q"), k=2)) == ["same", "b"]


def test_near_duplicate_of_earlier_pick_skipped():
    b = _doc_vec(0.8, 1)
    b2 = _doc_vec(0.79, 1, tilt=0.1)  # cos(b, b2) > 0.9, but only 0.79 to the query
    assert float(b @ b2) > 0.9
    bank = _selection_bank([("b", b, True, True), ("b2", b2, True, True), ("c", _doc_vec(0.7, 2), True, True)])
    r = Retriever(bank, Table({"q": E[0]}))
    picked = r.augment(RetrievalDoc(id="query", text="q"), k=2)
    assert _ids(picked) == ["b", "c"]
    assert picked[0].meta["score"] == pytest.approx(0.8, abs=1e-3)


def test_text_only_ranked_after_multimodal():
    bank = _selection_bank([("text-only", _doc_vec(0.85, 1), True, False), ("image-only", _doc_vec(0.8, 4), False, True),
                            ("m1", _doc_vec(0.6, 2), True, True), ("m2", _doc_vec(0.5, 3), True, True)])
    q = RetrievalDoc(id="query", text="q")
    r = Retriever(bank, Table({"q": E[0]}))
    assert _ids(r.augment(q, k=2)) == ["m1", "m2"]
    assert _ids(r.augment(q, k=4)) == ["m1", "m2", "text-only", "image-only"]
    plain = Retriever(bank, Table({"q": E[0]}), SelectionConfig(prefer_multimodal=False))
    assert _ids(plain.augment(q, k=2)) == ["text-only", "image-only"]


def test_exclusions_and_deep_pool():
    # 30 exact copies of the query fill the first pool (10 * k = 20): the pool must grow to reach "far"
    rows = [(f"dup{i}", E[0], True, True) for i in range(30)] + [("far", _doc_vec(0.2, 1), True, True),
                                                                  ("own", _doc_vec(0.5, 2), True, True)]
    bank = _selection_bank(rows)
    r = Retriever(bank, Table({"q": E[0]}))
    assert _ids(r.augment(RetrievalDoc(id="own", text="q"), k=2)) == ["far"]  # the query's own id is excluded
    assert _ids(r.augment(RetrievalDoc(id="x", text="q"), k=2)) == ["own", "far"]
    assert _ids(r.augment(RetrievalDoc(id="x", text="q"), k=2, exclude={"far"})) == ["own"]


def test_query_dropout_reproducible_and_rate():
    text = " ".join(f"w{i}" for i in range(20))
    a, b = query_dropout(text, 0.2, seed=7), query_dropout(text, 0.2, seed=7)
    assert a == b and len(a.split()) == 16
    kept = a.split()
    assert kept == sorted(kept, key=lambda w: int(w[1:]))  # order preserved
    outs = {query_dropout(text, 0.2, seed=s) for s in range(20)}
    assert len(outs) > 10  # the seed decides which words go
    dropped = [1 - len(query_dropout("a b c d e f g", 0.2, s).split()) / 7 for s in range(50)]
    assert abs(np.mean(dropped) - 0.2) < 0.1
    assert query_dropout("one", 0.2, 0) == "one"  # never empties the query


def test_query_dropout_changes_query_vector_reproducibly(native, tmp_path):
    bank = MemoryBank.build(_docs(tmp_path / "root"), native, image_root=tmp_path / "root", progress=False)
    r = Retriever(bank, native)
    q = [RetrievalDoc(id="q", text="a small red square in the top left corner of a white canvas")]
    v0 = r.query_vectors(q)
    v1, v2, v3 = r.query_vectors(q, [3]), r.query_vectors(q, [3]), r.query_vectors(q, [4])
    assert torch.equal(v1, v2) and not torch.allclose(v0, v1) and not torch.allclose(v1, v3)


def test_augment_loads_documents_from_the_bank(native, tmp_path):
    root = tmp_path / "root"
    MemoryBank.build(_docs(root), native, out_dir=tmp_path / "b", image_root=root, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    bank = MemoryBank.load(tmp_path / "b", image_root=moved)  # the image root can be moved
    r = Retriever(bank, native, SelectionConfig(max_similarity=1.01, prefer_multimodal=False))
    out = r.augment(RetrievalDoc(id="f1", text="shape 1 colour (0, 0, 255)", image=Image.new("RGB", (64, 64), (0, 0, 255))), k=7)
    assert "f1" not in _ids(out) and len(out) == 6
    by_id = {d.id: d for d in out}
    assert by_id["f2"].image.getpixel((1, 1)) == (0, 160, 0) and by_id["f2"].text.startswith("shape 2")
    assert by_id["txt"].image is None
    assert [d.meta["score"] for d in out] == sorted((d.meta["score"] for d in out), reverse=True)


# ----------------------------------------------------------------------------- CLI


def test_bank_cli_build_and_search_coco_mini(native, tmp_path):
    from evals.cli.bank import bank_app

    ann = COCO_MINI / "annotations" / "captions_val2017.json"
    if not ann.is_file():
        pytest.skip("shared COCO-mini data not present")
    enc = native.save(tmp_path / "enc.safetensors")
    runner = CliRunner()
    res = runner.invoke(bank_app, ["build", "--docs", str(ann), "--image-root", str(COCO_MINI / "val2017"),
                                   "--encoder", f"native:{enc}", "--out", str(tmp_path / "bank"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["count"] == 120 and summary["dim"] == 16
    caption = json.loads(ann.read_text())["annotations"][0]["caption"].strip()
    res = runner.invoke(bank_app, ["search", str(tmp_path / "bank"), "--encoder", f"native:{enc}",
                                   "--text", caption, "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)["hits"]
    assert len(hits) == 3 and hits[0]["image"].endswith(".jpg")
    bank = MemoryBank.load(tmp_path / "bank")
    s, i = bank.search(native.encode_text([caption]), 3)
    assert [h["row"] for h in hits] == i[0].tolist()
    # a different encoder is refused with a one-line error naming both fingerprints
    torch.manual_seed(5)
    other = NativeDualEncoder(SMALL).save(tmp_path / "other.safetensors")
    res = runner.invoke(bank_app, ["search", str(tmp_path / "bank"), "--encoder", f"native:{other}", "--text", "x"])
    assert res.exit_code == 2 and "was built with encoder" in res.output


def test_bank_cli_jsonl_errors(native, tmp_path):
    from evals.cli.bank import bank_app

    enc = native.save(tmp_path / "enc.safetensors")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "hello"}\n{"id": "b"}\n')
    res = CliRunner().invoke(bank_app, ["build", "--docs", str(docs), "--encoder", f"native:{enc}", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "docs.jsonl:2: a document needs 'text' or 'image'" in res.output
    docs.write_text('{"id": "a", "text": "hello"}\n{"caption": "world", "source": "x"}\n')
    res = CliRunner().invoke(bank_app, ["build", "--docs", str(docs), "--encoder", f"native:{enc}", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    bank = MemoryBank.load(tmp_path / "c")
    assert bank.record(1) == {"id": "2", "text": "world", "image": None, "image_base": None, "has_text": True,
                              "has_image": False, "meta": {"source": "x"}}


def _coco_train_root(root: Path, n: int = 6) -> Path:
    """COCO's official layout: annotations/captions_train2014.json + train2014/*.jpg (two captions per image)."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    images, anns = [], []
    for i in range(n):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.new("RGB", (40 + 4 * i, 32), (40 * i, 255 - 40 * i, 90)).save(root / "train2014" / name)
        images.append({"id": i, "file_name": name, "width": 40 + 4 * i, "height": 32})
        anns += [{"id": 10 * i + j, "image_id": i, "caption": f" shape {i} picture {j} "} for j in range(2)]
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_bank_build_from_the_official_coco_layout_with_an_hf_clip_folder(tmp_path):
    from evals.cli.bank import bank_app
    from test_encoder import _tiny_hf_clip

    root = _coco_train_root(tmp_path / "coco")
    _tiny_hf_clip(tmp_path / "clip")
    runner = CliRunner()
    res = runner.invoke(bank_app, ["build", "--coco-root", str(root), "--encoder", str(tmp_path / "clip"),
                                   "--out", str(tmp_path / "bank"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["count"] == 12 and summary["dim"] == 24 and summary["encoder"].startswith("hf-clip:")
    bank = MemoryBank.load(tmp_path / "bank")
    rec = bank.record(3)
    assert rec["id"] == "11" and rec["text"] == "shape 1 picture 1" and rec["image"] == "COCO_train2014_000000000001.jpg"
    assert bank.doc(3).image.size == (44, 32)  # images resolve under train2014/
    res = runner.invoke(bank_app, ["build", "--coco-root", str(root), "--encoder", str(tmp_path / "clip"),
                                   "--out", str(tmp_path / "small"), "--limit", "5", "--json"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["count"] == 5
    # one line naming the missing file and the official layout
    res = runner.invoke(bank_app, ["build", "--coco-root", str(root), "--split", "val2014", "--encoder",
                                   str(tmp_path / "clip"), "--out", str(tmp_path / "b2")])
    assert res.exit_code == 2 and "captions_val2014.json" in res.output and "official layout" in res.output
    res = runner.invoke(bank_app, ["build", "--encoder", str(tmp_path / "clip"), "--out", str(tmp_path / "b3")])
    assert res.exit_code == 2 and "--coco-root" in res.output
