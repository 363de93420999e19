"""FID feature extraction: images (folders, files, PIL images, uint8 tensors) -> network features.

- `Extractor`: a feature network and its name ("inception" is the FID network and gives "FID";
  any other name gives "FD-<name>") and id (a fingerprint used in cache keys).
- `inception_extractor(weights)`: the FID Inception from a local file (its id = the file's hash).
- `iter_features` / `extract_features` / `image_stats`: batch by batch, each image resized on its
  own (optional `square_resize` first, then the protocol's resize to the network input).
Image files are decoded with PIL and converted to RGB, as both reference tools do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from evals.metrics.fid_resize import check_protocol, check_uint8_batch, preprocess, square_resize
from evals.metrics.fid_stats import FeatureStats
from evals.metrics.inception import INPUT_SIZE, WEIGHTS_FILENAME, FIDInceptionV3, find_weights, load_fid_inception

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
INCEPTION_NAME = "inception"


# --------------------------------------------------------------------------------------------
# image inputs


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly in `directory`, sorted by name (pytorch-fid's extensions)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder not found: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {d}")
    return files



def _to_uint8_chw(item, resolution: int | None) -> torch.Tensor:
    """One image (path, PIL image or uint8 [3,H,W] tensor) -> uint8 [3,H,W]."""
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as im:
                img = im.convert("RGB")  # forces the full decode, so truncated files fail here
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ValueError(f"cannot read image {item}: {e}") from e
    elif isinstance(item, Image.Image):
        img = item.convert("RGB")
    elif isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 in [0,255], got dtype {item.dtype}")
        if item.dim() != 3 or item.shape[0] != 3:
            raise ValueError(f"image tensors must be RGB [3,H,W], got shape {tuple(item.shape)}")
        if resolution is None:
            return item
        img = Image.fromarray(item.permute(1, 2, 0).cpu().numpy())
    else:
        raise TypeError(f"unsupported image type {type(item).__name__}; use a path, PIL image or uint8 tensor")
    if resolution is not None:
        img = square_resize(img, resolution)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _image_items(images) -> Sequence:
    """Normalise the accepted image inputs to a sequence of single images (or a 4-D batch)."""
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        check_uint8_batch(images)
        if images.shape[0] == 0:
            raise ValueError("no images given")
        return images
    if isinstance(images, Image.Image):
        return [images]
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


# --------------------------------------------------------------------------------------------
# feature extractors


@dataclass
class Extractor:
    """A feature network and how to name it. `name` "inception" means the FID network (-> "FID");
    anything else gives "FD-<name>". The module receives float32 [N,3,S,S] in [-1,1] (S =
    `input_size`, resized per the protocol) and returns [N,D]; it does its own normalisation."""

    module: nn.Module
    name: str
    input_size: int = INPUT_SIZE
    id: str = ""  # fingerprint for cache keys and compatibility checks

    def __post_init__(self) -> None:
        if self.name == INCEPTION_NAME and getattr(self.module, "name", None) != INCEPTION_NAME:
            raise ValueError(f"extractor name {INCEPTION_NAME!r} is reserved for the FID Inception network")
        if not self.id:
            self.id = f"{self.name}:{module_fingerprint(self.module)}"


def fid_name(extractor_name: str | None = None) -> str:
    """"FID" for the Inception network, "FD-<name>" in any other feature space."""
    return "FID" if extractor_name in (None, INCEPTION_NAME) else f"FD-{extractor_name}"


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_WEIGHTS_HASH: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_HASH:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _WEIGHTS_HASH[key] = h.hexdigest()[:16]
    return _WEIGHTS_HASH[key]


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        protocol: str = "pytorch-fid") -> Extractor:
    """The FID network from a local weights file; its id is the file's content hash. Protocol "clean"
    uses clean-fid's own network, NVIDIA's TorchScript file (`evals.metrics.cleanfid`)."""
    if protocol == "clean":
        from evals.metrics.cleanfid import load_cleanfid_inception

        net = load_cleanfid_inception(weights, device)
        return Extractor(net, INCEPTION_NAME, INPUT_SIZE, f"cleanfid-inception:{_file_sha256(net.weights_path)}")
    path = find_weights(weights)
    return Extractor(load_fid_inception(path, device), INCEPTION_NAME, INPUT_SIZE,
                     f"{WEIGHTS_FILENAME.removesuffix('.pth')}:{_file_sha256(path)}")


def get_extractor(feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                  weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  protocol: str = "pytorch-fid") -> Extractor:
    if isinstance(feature_extractor, Extractor):
        return feature_extractor
    if feature_extractor is None:
        return inception_extractor(weights, device, protocol)
    if isinstance(feature_extractor, FIDInceptionV3):
        return Extractor(feature_extractor.eval(), INCEPTION_NAME)
    name = extractor_name or getattr(feature_extractor, "name", None)
    if not name:
        raise ValueError("a custom feature_extractor needs a name (extractor_name=...): its score is 'FD-<name>'")
    return Extractor(feature_extractor.eval(), name, int(getattr(feature_extractor, "input_size", INPUT_SIZE)))


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def iter_features(images, extractor: Extractor, *, protocol: str = "pytorch-fid", batch_size: int = 50,
                  resolution: int | None = None) -> Iterator[np.ndarray]:
    """Features of `images` (folder, uint8 tensor, or list of paths / PIL images / uint8 tensors),
    batch by batch, as float64 [B,D]. Images may differ in size: each is resized on its own."""
    check_protocol(protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _image_items(images)
    device = _module_device(extractor.module)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # Resize on the network's device (the clean protocol resizes with PIL on the CPU regardless).
        if isinstance(chunk, torch.Tensor) and resolution is None:
            x = preprocess(chunk.to(device), protocol, extractor.input_size)
        else:  # one at a time: sizes may differ, and resizing is per image anyway
            x = torch.cat([preprocess(_to_uint8_chw(it, resolution).to(device).unsqueeze(0), protocol,
                                      extractor.input_size) for it in chunk])
        with torch.no_grad():
            out = extractor.module(x.to(device))
        out = out.detach().float().cpu().flatten(1).double().numpy()
        if not np.all(np.isfinite(out)):
            last = start + len(chunk) - 1
            raise ValueError(f"{extractor.name} features of images {start}..{last} contain NaN or inf")
        yield out


def extract_features(images, extractor: Extractor, **kwargs) -> np.ndarray:
    return np.concatenate(list(iter_features(images, extractor, **kwargs)))


def _meta(extractor: Extractor, protocol: str, **more) -> dict[str, Any]:
    return {"protocol": protocol, "extractor": extractor.id, "extractor_name": extractor.name, **more}


def image_stats(images, extractor: Extractor, *, protocol: str = "pytorch-fid", batch_size: int = 50,
                resolution: int | None = None, keep_features: bool = False, meta: dict | None = None) -> FeatureStats:
    stats: FeatureStats | None = None
    for feats in iter_features(images, extractor, protocol=protocol, batch_size=batch_size, resolution=resolution):
        if stats is None:
            stats = FeatureStats(feats.shape[1], keep_features=keep_features,
                                 meta={**_meta(extractor, protocol, resolution=resolution), **(meta or {})})
        stats.update(feats)
    if stats is None:
        raise ValueError("no images given")
    return stats



def image_set_fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """Hash of the sorted (file name, size, mtime) triples: changes when any file does."""
    h = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]

