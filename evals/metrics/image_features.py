"""Images -> features through a network that takes PIL images (DINOv2, CLIP): the one loop they share.

A `FeatureNet` is a name, an id (fingerprint for caches), a per-image `transform` (PIL RGB ->
float [3,S,S]) and a batched `forward` ([B,3,S,S] -> [B,D]). `iter_net_features` reads each image
(path, PIL image or uint8 [3,H,W] tensor) as RGB, applies the optional square resize of the task
(`fid_resize.square_resize`, so every feature space sees the pixels FID sees), the net's transform,
and yields float64 feature batches. `net_stats` streams them into `FeatureStats` (mergeable, the
reference side cached on disk like FID's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from evals.metrics.fid_features import image_set_fingerprint, list_images
from evals.metrics.fid_resize import square_resize
from evals.metrics.fid_stats import FeatureStats, cache_path, load_cached


@dataclass
class FeatureNet:
    name: str  # e.g. "DINOv2" (FD-DINOv2), "CLIP ViT-L/14@336"
    id: str  # fingerprint: network + weights file hash
    transform: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    preprocess: str  # how images become inputs, recorded in results and cache keys


def image_items(images) -> Sequence[Any]:
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


def open_rgb(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3:
            raise ValueError(f"image tensors must be uint8 [3,H,W], got {item.dtype} {tuple(item.shape)}")
        return Image.fromarray(item.permute(1, 2, 0).cpu().numpy())
    try:
        with Image.open(item) as im:
            return im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"cannot read image {item}: {e}") from e


def iter_net_features(images, net: FeatureNet, *, batch_size: int = 32, resolution: int | None = None
                      ) -> Iterator[np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = image_items(images)
    for start in range(0, len(items), batch_size):
        pils = [open_rgb(it) for it in items[start:start + batch_size]]
        if resolution is not None:
            pils = [square_resize(im, resolution) for im in pils]
        x = torch.stack([net.transform(im) for im in pils]).to(net.device)
        with torch.no_grad():
            out = net.forward(x).detach().float().cpu().double().numpy()
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{net.name} features of images {start}..{start + len(pils) - 1} contain NaN or inf")
        yield out


def net_features(images, net: FeatureNet, **kwargs) -> np.ndarray:
    return np.concatenate(list(iter_net_features(images, net, **kwargs)))


def net_stats(images, net: FeatureNet, *, batch_size: int = 32, resolution: int | None = None,
              keep_features: bool = False, meta: dict | None = None) -> FeatureStats:
    stats: FeatureStats | None = None
    for feats in iter_net_features(images, net, batch_size=batch_size, resolution=resolution):
        if stats is None:
            stats = FeatureStats(feats.shape[1], keep_features=keep_features,
                                 meta={"preprocess": net.preprocess, "extractor": net.id, "extractor_name": net.name,
                                       "resolution": resolution, **(meta or {})})
        stats.update(feats)
    assert stats is not None  # image_items refuses an empty input
    return stats


def cached_net_stats(images, net: FeatureNet, cache_dir: str | os.PathLike | None = None, *,
                     batch_size: int = 32, resolution: int | None = None, keep_features: bool = False
                     ) -> FeatureStats:
    """Reference statistics from the cache when its key (image set, resolution, preprocessing, network)
    matches, else computed and saved (the FID reference cache, `fid_stats.cache_path`)."""
    files = [Path(f) for f in image_items(images)]
    key = {"fingerprint": image_set_fingerprint(files), "resolution": resolution, "preprocess": net.preprocess,
           "extractor": net.id}
    path = cache_path(key, cache_dir)
    cached = load_cached(path, key, len(files), keep_features)
    if cached is not None:
        return cached
    stats = net_stats(files, net, batch_size=batch_size, resolution=resolution, keep_features=keep_features, meta=key)
    stats.save(path)
    return stats
