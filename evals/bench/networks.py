"""`cm3eval bench metrics` part 3: each metric network's feature extraction beside a plain forward.

For every network a metric runs images through (FID's Inception, clean-fid's protocol on it,
FD-DINOv2's ViT, CMMD's CLIP), the same synthetic images go (a) through our whole extraction
(`fid_features.iter_features` / `image_features.iter_net_features`: decode-free PIL/uint8 input,
the protocol's resize and normalisation, batching, float64 features) and (b) as ready tensors
straight into the network's forward, batch for batch. `ratio` = plain time / extraction time (1.0:
extraction costs nothing beyond the forward). The two are interleaved, repeated, and the medians
taken, since the machine may be shared. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch


def _images(n: int, size: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pair(extract: Callable[[], Any], plain: Callable[[], Any], n: int, repeats: int) -> dict[str, Any]:
    extract(), plain()  # warm-up (allocator, kernels)
    ext_t, plain_t = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load
        ext_t.append(_time(extract))
        plain_t.append(_time(plain))
    e, p = statistics.median(ext_t), statistics.median(plain_t)
    return {"images": n, "extract_images_per_s": n / e, "forward_images_per_s": n / p, "ratio": p / e,
            "extract_s": ext_t, "forward_s": plain_t}


def _inception(images: list, batch: int, repeats: int, device: torch.device, protocol: str) -> dict[str, Any]:
    from evals.metrics import fid_features as ff
    from evals.metrics.fid_resize import preprocess
    from evals.metrics.inception import FIDInceptionV3

    net = FIDInceptionV3().eval().to(device)
    ext = ff.Extractor(net, ff.INCEPTION_NAME)
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    ready = [preprocess(torch.stack(tensors[i:i + batch]), protocol).to(device) for i in range(0, len(images), batch)]

    def plain() -> None:
        with torch.no_grad():
            for x in ready:
                net(x).cpu()

    return _pair(lambda: list(ff.iter_features(images, ext, protocol=protocol, batch_size=batch)), plain, len(images),
                 repeats)


def _net(name: str, net: Any, images: list, batch: int, repeats: int) -> dict[str, Any]:
    from evals.metrics.image_features import iter_net_features

    ready = [torch.stack([net.transform(im) for im in images[i:i + batch]]).to(net.device)
             for i in range(0, len(images), batch)]

    def plain() -> None:
        with torch.no_grad():
            for x in ready:
                net.forward(x).cpu()

    return _pair(lambda: list(iter_net_features(images, net, batch_size=batch)), plain, len(images), repeats)


def _dinov2(arch: str, device: torch.device) -> Any:
    import timm

    from evals.metrics import fd_dinov2 as D
    from evals.metrics.image_features import FeatureNet

    model = timm.create_model(D.TIMM_ARCH[arch], pretrained=False, img_size=D.INPUT_SIZE, num_classes=0)
    return FeatureNet(D.NAME, "bench", D.dgm_eval_transform(), model.eval().to(device), device, D.PREPROCESS)


def _clip(arch: str, device: torch.device) -> Any:
    import open_clip

    from evals.metrics.cmmd import cmmd_transform
    from evals.metrics.image_features import FeatureNet

    model = open_clip.create_model(arch, pretrained=None).eval().to(device)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple) else size)
    return FeatureNet("CLIP", "bench", cmmd_transform(size), lambda x: model.encode_image(x, normalize=True), device,
                      "cmmd")


def run_network_bench(n_images: int = 16, batch: int = 8, repeats: int = 3, image_size: int = 256,
                      dinov2_arch: str = "vits14", clip_arch: str = "ViT-B-32", device: str = "cpu") -> dict[str, Any]:
    dev = torch.device(device)
    images = _images(n_images, image_size, 0)
    out: dict[str, Any] = {"device": str(dev), "image_size": image_size, "batch": batch, "repeats": repeats,
                           "torch_threads": torch.get_num_threads()}
    with torch.inference_mode(False):
        out["inception (pytorch-fid)"] = _inception(images, batch, repeats, dev, "pytorch-fid")
        out["inception (clean)"] = _inception(images, batch, repeats, dev, "clean")
        out[f"dinov2-{dinov2_arch}"] = _net("dinov2", _dinov2(dinov2_arch, dev), images, batch, repeats)
        try:
            out[f"clip {clip_arch}"] = _net("clip", _clip(clip_arch, dev), images, batch, repeats)
        except ImportError:
            out[f"clip {clip_arch}"] = {"skipped": "open_clip is not installed"}
    ratios = [v["ratio"] for v in out.values() if isinstance(v, dict) and "ratio" in v]
    out["min_ratio"] = min(ratios)
    return out
