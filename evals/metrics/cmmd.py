"""CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): the MMD between CLIP image embeddings of
two image sets, as google-research's `cmmd` computes it.

- Embeddings: CLIP ViT-L/14@336px (the named encoder `clip-vit-l-14-336`, or any open_clip /
  HF CLIP encoder `evals.encoders` resolves), L2-normalised. Preprocessing as `cmmd/io_util.py` and
  `cmmd/embedding.py`: center-crop the largest square, PIL bicubic resize (antialiased) to the
  network's resolution (336), x/255, CLIP mean/std.
- Distance as `cmmd/distance.py`: Gaussian RBF kernel exp(-||a-b||^2 / (2 sigma^2)) with sigma = 10,
  the minimum-variance (biased, V-statistic) estimator mean(K_xx) + mean(K_yy) - 2 mean(K_xy),
  times 1000. Computed here in float64, in row blocks (memory O(block x N)).
- CI: percentile bootstrap over the generated embeddings (the reference fixed), exact for each
  resample: the kernel blocks are computed once and every resample's weights applied to them.
Lower is better. Unlike FID, CMMD needs no covariance, so its value does not depend on N's size
relative to the dimension.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evals.metrics.image_features import FeatureNet, net_features
from evals.metrics.result import MetricResult

SIGMA = 10.0
SCALE = 1000.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BLOCK = 2048


def cmmd_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def transform(im: Image.Image) -> torch.Tensor:
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean) / std

    return transform


def _tower(encoder: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(pixels [B,3,S,S] -> unit-norm image embeddings, S) of an open_clip or transformers CLIP encoder."""
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "visual") and hasattr(model, "encode_image"):  # open_clip
        size = model.visual.image_size
        return (lambda x: model.encode_image(x, normalize=True)), int(size[0] if isinstance(size, tuple) else size)
    if model is not None and hasattr(model, "get_image_features"):  # transformers CLIPModel
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model.get_image_features(pixel_values=x)
            return F.normalize((out if isinstance(out, torch.Tensor) else out.pooler_output).float(), dim=-1)
        return forward, int(model.config.vision_config.image_size)
    raise ValueError(f"CMMD needs a CLIP encoder (open_clip or an HF CLIP folder), got {type(encoder).__name__}")


def cmmd_net(encoder: Any) -> FeatureNet:
    forward, size = _tower(encoder)
    device = getattr(encoder, "device", torch.device("cpu"))
    fingerprint = encoder.fingerprint() if hasattr(encoder, "fingerprint") else type(encoder).__name__
    return FeatureNet("CLIP", str(fingerprint), cmmd_transform(size), forward, torch.device(device),
                      f"cmmd: center crop, PIL bicubic {size}x{size}, CLIP mean/std")


def _kernel_block(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.exp(-d2 / (2.0 * SIGMA ** 2))


def _weighted_kernel_means(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """For each row r of the weight matrices [R, n]: wa[r]^T K(a, b) wb[r] (weights sum to 1)."""
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    out = np.zeros(wa.shape[0])
    for s in range(0, a.shape[0], _BLOCK):
        k = _kernel_block(a[s:s + _BLOCK], b, a_sq[s:s + _BLOCK], b_sq)
        out += np.einsum("rb,rb->r", wa[:, s:s + _BLOCK], (k @ wb.T).T)
    return out


def mmd(x, y) -> float:
    """CMMD's distance of two embedding sets: 1000 x (mean K_xx + mean K_yy - 2 mean K_xy), RBF sigma 10."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ux, uy = np.full((1, x.shape[0]), 1.0 / x.shape[0]), np.full((1, y.shape[0]), 1.0 / y.shape[0])
    k = _weighted_kernel_means(x, x, ux, ux) + _weighted_kernel_means(y, y, uy, uy) \
        - 2.0 * _weighted_kernel_means(x, y, ux, uy)
    return float(SCALE * k[0])


def cmmd_from_embeddings(generated, reference, *, bootstrap: int = 0, seed: int = 0) -> MetricResult:
    y, x = np.asarray(generated, np.float64), np.asarray(reference, np.float64)
    for arr, what in ((y, "generated"), (x, "reference")):
        if arr.ndim != 2 or arr.shape[0] < 1 or not np.all(np.isfinite(arr)):
            raise ValueError(f"CMMD: {what} embeddings must be a finite non-empty [N, D] array, got {arr.shape}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"CMMD: embedding dims differ (generated {y.shape[1]}, reference {x.shape[1]})")
    n = y.shape[0]
    # row 0: the estimate (uniform weights); rows 1..: bootstrap resamples of the generated set
    wy = np.full((1 + bootstrap, n), 1.0 / n)
    rng = np.random.default_rng(seed)
    for r in range(1, 1 + bootstrap):
        wy[r] = np.bincount(rng.integers(0, n, n), minlength=n) / n
    ux = np.full((1, x.shape[0]), 1.0 / x.shape[0])
    k_xx = _weighted_kernel_means(x, x, ux, ux)[0]
    k_yy = _weighted_kernel_means(y, y, wy, wy)
    k_xy = _weighted_kernel_means(y, x, wy, np.repeat(ux, 1 + bootstrap, 0))
    values = SCALE * (k_xx + k_yy - 2.0 * k_xy)
    ci = tuple(float(v) for v in np.quantile(values[1:], [0.025, 0.975])) if bootstrap > 0 else None
    return MetricResult("CMMD", float(values[0]), ci, n, None,
                        {"sigma": SIGMA, "scale": SCALE, "n_ref": int(x.shape[0]), "bootstrap": bootstrap,
                         "estimator": "minimum-variance (biased) MMD^2, as google-research cmmd"},
                        higher_is_better=False)


def compute_cmmd(generated, reference, net: FeatureNet, *, batch_size: int = 32, resolution: int | None = None,
                 bootstrap: int = 0, seed: int = 0) -> MetricResult:
    """CMMD of generated images against reference images (folders, lists of paths / PIL images, or embeddings)."""
    emb = [x if isinstance(x, np.ndarray) else net_features(x, net, batch_size=batch_size, resolution=resolution)
           for x in (generated, reference)]
    res = cmmd_from_embeddings(emb[0], emb[1], bootstrap=bootstrap, seed=seed)
    res.extra.update(encoder=net.id, preprocess=net.preprocess, resolution=resolution)
    res.set_inputs = {"features": emb[0], "ref_features": emb[1]}  # the run keeps both sets (verification)
    return res
