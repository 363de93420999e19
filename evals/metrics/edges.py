"""Canny edge maps and edge F1: the condition of structure-guided generation and its
controllability score, as ControlNet++ measures it for Canny (eval/eval.py, eval/eval_edge.py).

Edges are kornia's Canny with ControlNet++'s fixed thresholds (low 0.1, high 0.2, 5x5 Gaussian,
sigma 1, hysteresis) on the image in [0, 1], saved as an 8-bit map (0 or 255). The condition is the
edge map of the source image brought to the model's square resolution (short side resized,
center crop: cm3leon.vq.preprocess, the VQ's own view of it); controllability is the binary F1 of
the generated image's edges against the condition's, pixel by pixel, averaged over samples
(torchmetrics' BinaryF1Score per sample; no edges in either map scores 0).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import MetricUnavailable
from .result import MetricResult, bootstrap_ci

CANNY = {"low_threshold": 0.1, "high_threshold": 0.2, "kernel_size": 5, "sigma": 1.0}  # ControlNet++'s


def square(image: Image.Image, resolution: int) -> Image.Image:
    """The image as the VQ sees it at `resolution`: short side resized, center crop, RGB."""
    from cm3leon.vq import preprocess, to_pil

    return to_pil(preprocess(image, resolution))[0]


def canny_edges(image: Image.Image) -> Image.Image:
    """An 8-bit edge map ('L', 0 or 255) of an RGB image, ControlNet++'s kornia Canny."""
    try:
        from kornia.filters import canny
    except ImportError:
        raise MetricUnavailable("Canny edges need kornia (pip install kornia)") from None
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)[None] / 255.0
    k, s = CANNY["kernel_size"], CANNY["sigma"]
    with torch.no_grad():
        edges = canny(x, CANNY["low_threshold"], CANNY["high_threshold"], (k, k), (s, s))[1]
    return Image.fromarray((edges[0, 0].numpy() * 255).astype(np.uint8), "L")  # torchvision's to_pil_image


def condition_image(image: Image.Image, resolution: int) -> Image.Image:
    """The model's condition: the edge map of the source at its resolution, as an RGB image."""
    return canny_edges(square(image, resolution)).convert("RGB")


def edge_f1_pair(generated: Image.Image, condition_edges: Image.Image) -> float:
    """Binary F1 of the generated image's edges against the condition's edge map (same size)."""
    pred = np.asarray(canny_edges(generated)) == 255
    gt = np.asarray(condition_edges.convert("L")) == 255
    if pred.shape != gt.shape:
        raise ValueError(f"edge maps of different sizes: {pred.shape} and {gt.shape}")
    tp = float((pred & gt).sum())
    wrong = float((pred ^ gt).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def edge_f1(generated: list[Image.Image], sources: list[Image.Image], *, seed: int = 0) -> MetricResult:
    """Mean edge F1 (percent) over samples: each source's condition at its output's size."""
    values = np.asarray([edge_f1_pair(g, canny_edges(square(s, g.width))) for g, s in zip(generated, sources)])
    if len(values) == 0:
        raise MetricUnavailable("edge F1 needs at least one generated image")
    values = values * 100
    ci = bootstrap_ci(values, seed=seed) if len(values) > 1 else None
    return MetricResult("edge_F1", float(values.mean()), ci, len(values), values,
                        extra={"detector": "kornia.filters.canny", **CANNY})
