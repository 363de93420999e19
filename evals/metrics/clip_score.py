"""CLIP-space metrics: CLIPScore, CLIP-I, CLIP-T and text->image rank accuracy.

Every function takes its inputs either as raw items plus an `encoder` (any object with
`encode_image(list[PIL.Image]) -> Tensor[N,D]` and `encode_text(list[str]) -> Tensor[N,D]`,
the `DualEncoder` protocol) or as precomputed embeddings (a 2-D Tensor). Embeddings are
re-normalised here, so cosine similarity is exact whatever the encoder returns. Which CLIP
(ViT-B/32 for MagicBrush, ViT-L/14 for InstructPix2Pix and torchmetrics' default) and its
image preprocessing are the encoder's business, not the metric's.

CLIPScore, two conventions (both are "CLIPScore" in papers; compare only like with like):
- Hessel et al. 2021 (`scale=2.5, clamp="sample"`, the default): per image-caption pair
  w * max(cos, 0) with w = 2.5, then the mean. Range [0, 2.5].
- torchmetrics `CLIPScore` (`scale=100, clamp="mean"`): 100 * cos per pair, averaged, and
  only the MEAN is clamped at 0: max(mean(100 * cos), 0). Range [0, 100]. With any negative
  cosine the two conventions differ by more than the factor 100 / 2.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from evals.metrics.result import MetricResult, bootstrap_ci, mean_result

ENCODE_BATCH = 64  # items per encoder call: bounds memory, does not change any number


class ImageTextEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor: ...


ImagesOrEmb = Sequence[Image.Image] | torch.Tensor
TextsOrEmb = Sequence[str] | torch.Tensor


def _check_emb(emb: torch.Tensor, what: str) -> torch.Tensor:
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{what}: expected embeddings of shape [N, D] with N > 0, got {tuple(emb.shape)}")
    emb = emb.detach().to("cpu", torch.float64)
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    norms = emb.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: an embedding is all zeros (cosine undefined)")
    return emb / norms


def embed_images(images: ImagesOrEmb, encoder: ImageTextEncoder | None, what: str = "images") -> torch.Tensor:
    """[N,D] unit-norm float64 image embeddings from images (needs `encoder`) or from embeddings."""
    if isinstance(images, torch.Tensor):
        return _check_emb(images, what)
    if encoder is None:
        raise ValueError(f"{what}: got images but no encoder; pass an encoder or precomputed embeddings")
    images = list(images)
    if not images:
        raise ValueError(f"{what}: no images")
    chunks = [encoder.encode_image(images[i:i + ENCODE_BATCH]) for i in range(0, len(images), ENCODE_BATCH)]
    return _check_emb(torch.cat([torch.as_tensor(c) for c in chunks]), what)


def embed_texts(texts: TextsOrEmb, encoder: ImageTextEncoder | None, what: str = "texts") -> torch.Tensor:
    """[N,D] unit-norm float64 text embeddings from strings (needs `encoder`) or from embeddings."""
    if isinstance(texts, torch.Tensor):
        return _check_emb(texts, what)
    if isinstance(texts, str):
        raise ValueError(f"{what}: expected a list of strings, got one string")
    if encoder is None:
        raise ValueError(f"{what}: got strings but no encoder; pass an encoder or precomputed embeddings")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what}: no texts")
    chunks = [encoder.encode_text(texts[i:i + ENCODE_BATCH]) for i in range(0, len(texts), ENCODE_BATCH)]
    return _check_emb(torch.cat([torch.as_tensor(c) for c in chunks]), what)


def _same_n(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what_a} and {what_b} differ in number: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what_a} and {what_b} embeddings differ in dimension: {a.shape[1]} vs {b.shape[1]}")


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of two unit-norm [N,D] tensors, as float64 numpy."""
    return (a * b).sum(dim=1).clamp(-1.0, 1.0).numpy()


def clip_score(
    images: ImagesOrEmb,
    captions: TextsOrEmb,
    encoder: ImageTextEncoder | None = None,
    *,
    scale: float = 2.5,
    clamp: Literal["sample", "mean"] = "sample",
    seed: int = 0,
) -> MetricResult:
    """CLIPScore of image i against caption i (see the module docstring for the two conventions).

    `per_sample` holds the per-pair scores on the chosen scale: clamped at 0 for
    clamp="sample", raw (possibly negative) scale * cos for clamp="mean".
    """
    if clamp not in ("sample", "mean"):
        raise ValueError(f"clamp must be 'sample' (Hessel et al.) or 'mean' (torchmetrics), got {clamp!r}")
    img = embed_images(images, encoder)
    txt = embed_texts(captions, encoder, "captions")
    _same_n(img, txt, "images", "captions")
    cos = paired_cosine(img, txt)
    convention = "hessel" if clamp == "sample" else "torchmetrics"
    if clamp == "sample":
        return mean_result("CLIPScore", scale * np.maximum(cos, 0.0), seed=seed, scale_w=scale, convention=convention,
                           n_negative=int((cos < 0).sum()))
    per = scale * cos
    lo, hi = bootstrap_ci(per, seed=seed)
    value = max(float(per.mean()), 0.0)
    return MetricResult("CLIPScore", value, (max(lo, 0.0), max(hi, 0.0)), int(per.size), per,
                        {"scale_w": scale, "convention": convention, "n_negative": int((cos < 0).sum())})


def clip_i(
    generated: ImagesOrEmb, references: ImagesOrEmb, encoder: ImageTextEncoder | None = None, *,
    name: str = "CLIP-I", seed: int = 0,
) -> MetricResult:
    """Mean cos(E_I(generated_i), E_I(reference_i)) (MagicBrush's CLIP-I; DINO too, with a DINO encoder)."""
    gen = embed_images(generated, encoder, "generated images")
    ref = embed_images(references, encoder, "reference images")
    _same_n(gen, ref, "generated images", "reference images")
    return mean_result(name, paired_cosine(gen, ref), seed=seed)


def clip_t(
    generated: ImagesOrEmb, captions: TextsOrEmb, encoder: ImageTextEncoder | None = None, *,
    name: str = "CLIP-T", seed: int = 0,
) -> MetricResult:
    """Mean cos(E_I(generated_i), E_T(caption_i)), unscaled and unclamped (MagicBrush: the GT local caption)."""
    gen = embed_images(generated, encoder, "generated images")
    txt = embed_texts(captions, encoder, "captions")
    _same_n(gen, txt, "generated images", "captions")
    return mean_result(name, paired_cosine(gen, txt), seed=seed)


def rank_pools(n: int, pool_size: int, seed: int = 0) -> np.ndarray:
    """[n, pool_size] candidate indices: column 0 is the sample itself, the rest distinct others.

    Deterministic from `seed`; row i never repeats i and never repeats an index.
    """
    if pool_size < 2:
        raise ValueError(f"pool_size must be at least 2, got {pool_size}")
    if n < pool_size:
        raise ValueError(f"rank accuracy among {pool_size} candidates needs at least {pool_size} samples, got {n}; "
                         f"pass pool_size <= {n}")
    rng = np.random.default_rng(seed)
    pools = np.empty((n, pool_size), dtype=np.int64)
    for i in range(n):
        others = rng.choice(n - 1, size=pool_size - 1, replace=False)
        pools[i, 0] = i
        pools[i, 1:] = others + (others >= i)  # skip i itself: map [0, n-1) onto [0, n) \ {i}
    return pools


def t2i_rank_accuracy(
    captions: TextsOrEmb,
    generated: ImagesOrEmb,
    encoder: ImageTextEncoder | None = None,
    *,
    pool_size: int = 100,
    ks: Sequence[int] = (1, 5, 10),
    seed: int = 0,
) -> dict[str, MetricResult]:
    """Rank each caption's own generated image among `pool_size` candidates (itself + others) by cosine.

    Returns {"t2i_R@k": ...} in percent (per-sample 0/100 hits), and "t2i_rank" (mean 1-based rank).
    A tie with a distractor counts against the sample, so a constant encoder scores ~0, not 100.
    """
    txt = embed_texts(captions, encoder, "captions")
    img = embed_images(generated, encoder, "generated images")
    _same_n(txt, img, "captions", "generated images")
    if any(k < 1 or k > pool_size for k in ks):
        raise ValueError(f"every k must be in [1, pool_size={pool_size}], got {list(ks)}")
    pools = rank_pools(txt.shape[0], pool_size, seed)
    ranks = np.empty(txt.shape[0], dtype=np.int64)
    for start in range(0, txt.shape[0], 256):  # chunks: [c, pool, D] gathers stay small
        idx = torch.from_numpy(pools[start:start + 256])
        sims = torch.einsum("cd,cmd->cm", txt[start:start + 256], img[idx])
        own = sims[:, :1]
        ranks[start:start + 256] = 1 + (sims[:, 1:] >= own).sum(dim=1).numpy()
    extra: dict[str, Any] = {"pool_size": pool_size, "pool_seed": seed, "unit": "percent"}
    out = {f"t2i_R@{k}": mean_result(f"t2i_R@{k}", (ranks <= k).astype(np.float64), scale=100.0, seed=seed, **extra)
           for k in ks}
    out["t2i_rank"] = mean_result("t2i_rank", ranks.astype(np.float64), seed=seed, pool_size=pool_size, pool_seed=seed)
    return out

