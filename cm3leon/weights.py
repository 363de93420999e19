"""Safe reading of weight files: safetensors, or torch files with weights_only=True, with one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file; a truncated file is a clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(e)})") from None
    return tensors, meta


def read_sharded_safetensors(folder: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    """A folder's weights as one file (`single`) or as shards listed in an HF-style `index` JSON."""
    if (folder / single).is_file():
        return read_safetensors(folder / single)[0]
    index_path = folder / index
    if not index_path.is_file():
        raise FileNotFoundError(f"no weights in {folder}: looked for {single} and {index}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map' object): {_first_line(e)}") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (folder / shard).resolve()
        if folder.resolve() not in shard_path.parents:
            raise ValueError(f"{index_path}: shard {shard!r} points outside {folder}")
        part = read_safetensors(shard_path)[0]
        expected = {k for k, v in weight_map.items() if v == shard}
        if not expected <= set(part):
            raise ValueError(f"{shard_path}: missing tensor(s) {sorted(expected - set(part))[:3]} listed in {index}")
        tensors.update(part)
    return tensors


def torch_load_weights(path: str | Path) -> Any:
    """torch.load with weights_only=True: a pickle that is more than plain tensors is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: not a plain-weights checkpoint (torch.load weights_only=True: {_first_line(e)}); "
            "re-save its state_dict as plain tensors or safetensors in a trusted environment") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def load_strict(model: nn.Module, state_dict: dict[str, Any], source: str, what: str = "the model") -> None:
    """load_state_dict with one-line errors naming the file and the tensor; NaN/Inf weights refused."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    for names, label in ((missing, "missing"), (unexpected, "unexpected")):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise ValueError(f"{source}: {label} tensor(s) {', '.join(names[:3])}{more} for {what}")
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {name} is a {type(value).__name__}, not a tensor")
        if value.shape != own[name].shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, the config expects {tuple(own[name].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{source}: tensor {name} holds NaN or Inf")
    model.load_state_dict(state_dict, strict=True)
