"""Image-editing metrics: InstructPix2Pix's CLIP similarities and MagicBrush's protocol.

InstructPix2Pix (Brooks et al. 2023, `metrics/clip_similarity.py`; CLIP ViT-L/14 there):
- `clip_directional_similarity`: cos(E_I(out) - E_I(in), E_T(out caption) - E_T(in caption)),
  from unit-norm embeddings, with `F.cosine_similarity` (eps 1e-8) as the reference does: a zero
  direction (output identical to input, or identical captions) scores 0, and is counted in
  `extra`. Note their image preprocessing is a bicubic squash to 224 (no crop): the encoder's choice.
- `clip_image_similarity`: cos(E_I(in), E_I(out)).

MagicBrush (Zhang et al. 2023, `evaluation/image_eval.py`):
- "L1": `nn.L1Loss` between `ToTensor` images in [0,1] (mean over pixels and channels);
- "L2 (MSE)": what MagicBrush calls L2 is `nn.MSELoss`, a mean SQUARED error, not a norm;
  both after converting to RGB and resizing the generated image to the target's size with PIL
  (`gen.resize(gt.size)`, whose default filter for RGB is bicubic; we name it explicitly);
- CLIP-I (ViT-B/32, generated vs GT image), CLIP-T (generated image vs the GT local caption):
  `clip_score.clip_i` / `clip_score.clip_t`; DINO: `dino_similarity` with a `DinoEncoder`;
- final-turn (the last turn of each session; in MagicBrush the iteratively edited image) and
  all-turn (every turn, each edited independently from the GT input): `turn_settings`.
Every mean metric comes back as a `MetricResult` with per-sample scores and a bootstrap CI.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch.nn.functional as F
from PIL import Image

from evals.metrics.clip_score import (
    ImagesOrEmb,
    ImageTextEncoder,
    TextsOrEmb,
    clip_i,
    clip_t,
    embed_images,
    embed_texts,
)
from evals.metrics.result import MetricResult, mean_result

__all__ = [
    "clip_directional_similarity", "clip_image_similarity", "clip_i", "clip_t", "dino_similarity",
    "pixel_distance_pair", "pixel_distances", "final_turn_indices", "turn_settings",
]

ZERO_DIRECTION = 1e-8  # F.cosine_similarity's eps: below this a direction has no angle


def clip_directional_similarity(
    src_images: ImagesOrEmb,
    out_images: ImagesOrEmb,
    src_captions: TextsOrEmb,
    out_captions: TextsOrEmb,
    encoder: ImageTextEncoder | None = None,
    *,
    seed: int = 0,
) -> MetricResult:
    """InstructPix2Pix's directional CLIP similarity, per sample then averaged."""
    i0 = embed_images(src_images, encoder, "source images")
    i1 = embed_images(out_images, encoder, "output images")
    t0 = embed_texts(src_captions, encoder, "source captions")
    t1 = embed_texts(out_captions, encoder, "output captions")
    n = {i0.shape[0], i1.shape[0], t0.shape[0], t1.shape[0]}
    if len(n) != 1:
        raise ValueError(f"directional similarity needs equal counts of source/output images and captions, "
                         f"got {i0.shape[0]}, {i1.shape[0]}, {t0.shape[0]}, {t1.shape[0]}")
    if i0.shape[1] != t0.shape[1]:
        raise ValueError(f"image and text embeddings differ in dimension: {i0.shape[1]} vs {t0.shape[1]}")
    d_img, d_txt = i1 - i0, t1 - t0
    sim = F.cosine_similarity(d_img, d_txt, dim=1, eps=ZERO_DIRECTION).numpy()
    return mean_result("CLIP-dir", sim, seed=seed,
                       n_zero_image_direction=int((d_img.norm(dim=1) < ZERO_DIRECTION).sum()),
                       n_zero_text_direction=int((d_txt.norm(dim=1) < ZERO_DIRECTION).sum()))


def clip_image_similarity(
    src_images: ImagesOrEmb, out_images: ImagesOrEmb, encoder: ImageTextEncoder | None = None, *, seed: int = 0,
) -> MetricResult:
    """InstructPix2Pix's image similarity cos(E_I(in), E_I(out)): how much of the input survives."""
    return clip_i(out_images, src_images, encoder, name="CLIP-img", seed=seed)


def dino_similarity(generated: ImagesOrEmb, references: ImagesOrEmb, dino_encoder=None, *, seed: int = 0
                    ) -> MetricResult:
    """MagicBrush's DINO: mean cos of DINO ViT-S/16 CLS features, generated vs GT (`evals.metrics.dino`)."""
    return clip_i(generated, references, dino_encoder, name="DINO", seed=seed)


def pixel_distance_pair(generated: Image.Image, target: Image.Image, *, resize: bool = True) -> tuple[float, float]:
    """(L1, MSE) of one pair on [0,1] RGB pixels; the generated image is resized to the target's size."""
    gen, tgt = generated.convert("RGB"), target.convert("RGB")
    if gen.size != tgt.size:
        if not resize:
            raise ValueError(f"generated image is {gen.size[0]}x{gen.size[1]} but the target is "
                             f"{tgt.size[0]}x{tgt.size[1]} and resizing is off")
        gen = gen.resize(tgt.size, Image.Resampling.BICUBIC)
    d = np.asarray(gen, dtype=np.float64) / 255.0 - np.asarray(tgt, dtype=np.float64) / 255.0
    return float(np.abs(d).mean()), float((d * d).mean())


def pixel_distances(
    generated: Sequence[Image.Image], targets: Sequence[Image.Image], *, resize: bool = True, seed: int = 0,
) -> dict[str, MetricResult]:
    """MagicBrush's "L1" and "L2 (MSE)" over pairs (lower is better)."""
    if len(generated) != len(targets) or not generated:
        raise ValueError(f"pixel distances need equal, non-zero numbers of generated and target images, "
                         f"got {len(generated)} and {len(targets)}")
    pairs = []
    for i, (g, t) in enumerate(zip(generated, targets)):
        try:
            pairs.append(pixel_distance_pair(g, t, resize=resize))
        except ValueError as e:
            raise ValueError(f"sample {i}: {e}") from None
    per = np.asarray(pairs, dtype=np.float64)
    return distance_results(per[:, 0], per[:, 1], seed=seed, resized=resize)


def distance_results(l1: np.ndarray, mse: np.ndarray, *, seed: int = 0, resized: bool = True
                     ) -> dict[str, MetricResult]:
    """Wrap per-sample L1 / MSE arrays (e.g. computed streaming with `pixel_distance_pair`) as results."""
    resize_note = "generated resized to target size (PIL bicubic)" if resized else "no resizing"
    return {
        "L1": mean_result("L1", l1, seed=seed, definition="mean |gen - gt| on [0,1] RGB (nn.L1Loss)",
                          preprocessing=resize_note),
        "L2 (MSE)": mean_result("L2 (MSE)", mse, seed=seed,
                                definition="mean (gen - gt)^2 on [0,1] RGB (nn.MSELoss; MagicBrush calls it L2)",
                                preprocessing=resize_note),
    }


def final_turn_indices(session_ids: Sequence[Hashable], turns: Sequence[int]) -> np.ndarray:
    """Indices of the last turn of each session, in order of first appearance of the session."""
    if len(session_ids) != len(turns):
        raise ValueError(f"session_ids and turns differ in length: {len(session_ids)} vs {len(turns)}")
    last: dict[Hashable, tuple[int, int]] = {}
    seen: set[tuple[Hashable, int]] = set()
    for i, (s, t) in enumerate(zip(session_ids, turns)):
        if (s, int(t)) in seen:
            raise ValueError(f"session {s!r} has turn {t} twice")
        seen.add((s, int(t)))
        if s not in last or int(t) > last[s][0]:
            last[s] = (int(t), i)
    return np.array([i for _, i in last.values()], dtype=np.int64)


def turn_settings(result: MetricResult, session_ids: Sequence[Hashable], turns: Sequence[int], *, seed: int = 0
                  ) -> dict[str, MetricResult]:
    """{"final_turn": ..., "all_turn": ...} of one per-sample mean metric over multi-turn samples.

    Use this when one set of outputs serves both settings. MagicBrush's own final-turn numbers
    come from iteratively edited images (turn k edits the model's turn k-1 output), which are
    different images from the all-turn (independent) ones: score those with a separate call.
    """
    if result.per_sample is None:
        raise ValueError(f"{result.name}: turn settings need per-sample scores")
    per = np.asarray(result.per_sample, dtype=np.float64)
    if per.size != len(session_ids):
        raise ValueError(f"{result.name}: {per.size} per-sample scores but {len(session_ids)} session ids")
    if not np.isclose(result.value, per.mean()):
        raise ValueError(f"{result.name}: value is not the plain mean of its per-sample scores; cannot re-aggregate")
    idx = final_turn_indices(session_ids, turns)
    return {
        "final_turn": mean_result(result.name, per[idx], seed=seed, **{**result.extra, "turns": "final"}),
        "all_turn": mean_result(result.name, per, seed=seed, **{**result.extra, "turns": "all"}),
    }
