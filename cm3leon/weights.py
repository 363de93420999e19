"""Safe reading of weight files: safetensors (headers, whole files, streamed shards) and torch files
with weights_only=True, with one-line errors.

Loading a large checkpoint never holds more than one tensor of it beyond the model being filled:
`stream_into` copies tensor by tensor from memory-mapped files into parameters that already live on
the target device in the target dtype. Headers are read (and checked) before anything is allocated.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import Cm3evalError


class CheckpointError(Cm3evalError, ValueError):
    """A checkpoint file or folder that cannot be used as it is (one line: file, what, why)."""


class CheckpointNotFoundError(Cm3evalError, FileNotFoundError):
    """A checkpoint file that is not where it was looked for (one line: where, how to get it)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- safetensors headers
# safetensors dtype names -> torch dtypes; integer and bool weights are refused for decoders
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # a 100 MB JSON header would describe millions of tensors: corrupt


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name ("BF16", "F32", "I64", ...)
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # byte range inside the file's data section

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("F") or self.dtype == "BF16"


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0  # file size
    data_start: int = 0  # where the data section begins (8 + header length)


def read_header(path: str | Path) -> SafetensorsHeader:
    """The JSON header of a safetensors file: names, dtypes, shapes. Reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            raw = json.loads(f.read(n))
        meta = raw.pop("__metadata__", None) or {}
        tensors = {k: TensorInfo(str(v["dtype"]), tuple(int(d) for d in v["shape"]),
                                 (int(v["data_offsets"][0]), int(v["data_offsets"][1]))) for k, v in raw.items()}
        for name, info in tensors.items():
            if info.offsets[1] > size - 8 - n or info.offsets[0] > info.offsets[1]:
                raise ValueError(f"tensor {name} lies past the end of the file")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(e)})") from None
    return SafetensorsHeader(path, tensors, dict(meta), size, 8 + n)


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one (small) safetensors file; a truncated file is a clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(e)})") from None
    return tensors, meta


def shard_headers(folder: Path, single: str, index: str) -> list[SafetensorsHeader]:
    """The headers of a folder's weights: one file (`single`) or the shards an HF-style `index` lists."""
    if (folder / single).is_file():
        return [read_header(folder / single)]
    index_path = folder / index
    if not index_path.is_file():
        raise CheckpointNotFoundError(f"no weights in {folder}: looked for {single} and {index}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map' object): {_first_line(e)}") from None
    headers = []
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = (folder / shard).resolve()
        if folder.resolve() not in shard_path.parents:
            raise CheckpointError(f"{index_path}: shard {shard!r} points outside {folder}")
        header = read_header(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        if not expected <= set(header.tensors):
            missing = sorted(expected - set(header.tensors))[:3]
            raise CheckpointError(f"{shard_path}: missing tensor(s) {missing} listed in {index}")
        headers.append(header)
    return headers


def iter_safetensors(path: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, each a zero-copy view of the memory-mapped file (CPU, the file's
    dtype). Each view keeps the map alive; its pages are released from this process's RSS once the
    caller asks for the next one (they refault from the file if the view is used again), so reading
    a shard costs about one tensor of resident memory."""
    header = read_header(path)
    names = list(header.tensors) if names is None else list(names)
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if header.nbytes > 0 else None
    try:
        for name in names:
            info = header.tensors[name]
            if info.dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info.dtype}, which cannot be loaded")
            start, end = header.data_start + info.offsets[0], header.data_start + info.offsets[1]
            dtype = SAFETENSORS_DTYPES[info.dtype]
            if end - start != info.numel * torch.empty((), dtype=dtype).element_size():
                raise CheckpointError(f"{path}: tensor {name}: {end - start} bytes for shape {info.shape} {info.dtype}")
            with warnings.catch_warnings():  # a read-only map: the view is never written
                warnings.simplefilter("ignore", UserWarning)
                view = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=start) if info.numel else \
                    torch.empty(0, dtype=dtype)
            yield name, view.view(info.shape)
            del view
            page = mmap.PAGESIZE
            lo = start - start % page
            if end > lo and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)  # drop the consumed pages from RSS
    finally:
        # never mm.close(): torch.frombuffer keeps a reference to the map, not a buffer export, so
        # closing would leave live views dangling; the map is unmapped when its last view dies
        del mm


# ----------------------------------------------------------------------------- torch files
def torch_load_weights(path: str | Path, *, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: a pickle that is more than plain tensors is refused, never run.
    `mmap`: tensors stay in the file until touched (large consolidated checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: not a plain-weights checkpoint (torch.load weights_only=True: {_first_line(e)}); "
            "re-save its state_dict as plain tensors or safetensors in a trusted environment") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


# ----------------------------------------------------------------------------- checks and copies
def _check_names(expected: Any, found: Any, source: str, what: str) -> None:
    """The same tensor names on both sides, or one line naming the first few that differ."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    for names, label in ((missing, "missing"), (unexpected, "unexpected")):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise CheckpointError(f"{source}: {label} tensor(s) {', '.join(names[:3])}{more} for {what}")


def check_against(model_shapes: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], source: str,
                  what: str = "the model", where: dict[str, Path] | None = None) -> None:
    """Names, shapes and dtypes of a checkpoint's tensors against the model's, before any allocation.
    `where`: the file each tensor is in, named in its error."""
    _check_names(model_shapes, found, source, what)
    for name, info in found.items():
        file = (where or {}).get(name, source)
        if not info.is_float:
            raise CheckpointError(f"{file}: tensor {name} is {info.dtype}; decoder weights must be floating point "
                                  "(an integer tensor would be cast silently)")
        if info.shape != tuple(model_shapes[name]):
            raise CheckpointError(f"{file}: tensor {name} has shape {info.shape}, the config expects "
                                  f"{tuple(model_shapes[name])}")


_FINITE_CHUNK = 1 << 24  # elements per isfinite() slice: a 16 MB mask at most


def copy_checked(dst: torch.Tensor, value: torch.Tensor, name: str, source: str) -> None:
    """dst.copy_(value) (dtype cast + device move in one step) after refusing NaN/Inf and integer values."""
    if not value.is_floating_point():
        raise CheckpointError(f"{source}: tensor {name} is {value.dtype}; decoder weights must be floating point")
    if tuple(value.shape) != tuple(dst.shape):
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the config expects {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(value)
        # checked on the destination (the GPU when there is one), in slices so no full-size mask exists
        flat = dst.reshape(-1)
        for i in range(0, flat.numel(), _FINITE_CHUNK):
            if not bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()):
                raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf")


def stream_into(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str,
                rename: Callable[[str], str | None] = lambda k: k) -> set[str]:
    """Copy (name, tensor) pairs into the model's parameters one at a time; returns the names filled.
    `rename` maps a checkpoint name to the model's (None: not a decoder tensor, skipped)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    for key, value in tensors:
        name = rename(key)
        if name is None:
            continue
        if name not in params:
            raise CheckpointError(f"{source}: unexpected tensor {key} for the decoder")
        copy_checked(params[name].data, value, key, source)
        filled.add(name)
        del value  # the host copy (if any) goes before the next tensor is read
    return filled


def load_strict(model: nn.Module, state_dict: dict[str, Any], source: str, what: str = "the model") -> None:
    """load_state_dict with one-line errors naming the file and the tensor; NaN/Inf weights refused."""
    own = model.state_dict()
    _check_names(own, state_dict, source, what)
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {name} is a {type(value).__name__}, not a tensor")
        if value.shape != own[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, the config expects {tuple(own[name].shape)}")
        if own[name].is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} is {value.dtype}; weights must be floating point")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf")
    model.load_state_dict(state_dict, strict=True)
