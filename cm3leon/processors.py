"""Logits processors: guidance, CD-K, top-k, and inverse-CDF sampling with top-p.

Every function is a pure tensor function of logits (and given uniforms), with no host reads, so
the sampler's decode step can run them inside one captured graph.
"""

from __future__ import annotations

import torch

def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                   image_cond: torch.Tensor | None = None, image_scale: float | None = None) -> torch.Tensor:
    """CFG: uncond + s·(cond − uncond); editing: uncond + s_img·(img − uncond) + s_txt·(full − img)."""
    if image_cond is not None and image_scale is not None:
        return uncond + image_scale * (image_cond - uncond) + scale * (cond - image_cond)
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def cdk_candidate_mask(expert_probs: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K's plausible set: V = {w : p_exp(w) >= alpha · (k-th largest p_exp)}."""
    kth = expert_probs.topk(min(k, expert_probs.shape[-1]), dim=-1).values[..., -1:]
    return expert_probs >= alpha * kth


def cdk_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """log p_exp − log p_ama on CD-K's plausible set, −inf elsewhere."""
    log_exp = torch.log_softmax(expert_logits, dim=-1)
    log_ama = torch.log_softmax(amateur_logits, dim=-1)
    keep = cdk_candidate_mask(log_exp.exp(), alpha, k)
    score = log_exp - log_ama
    # an expert token the amateur rules out entirely (−inf) is maximally "contrastive"; keep it finite
    score = torch.where(torch.isfinite(score), score, log_exp + 1e4)
    return score.masked_fill(~keep, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _inverse_cdf(sorted_probs: torch.Tensor, order: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick order[j] where the row's (already nucleus-masked) sorted CDF first exceeds u·total."""
    cdf = sorted_probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    # never land on a zero-probability tail token through rounding at the top of the CDF
    # (clamp_min: a row without any positive mass — broken logits, raised after the batch — stays in range)
    idx = torch.minimum(idx, (sorted_probs > 0).sum(-1, keepdim=True) - 1).clamp_min(0)
    return order.gather(-1, idx).squeeze(-1)


def _nucleus(sorted_probs: torch.Tensor, top_p: float | None) -> torch.Tensor:
    if top_p is None or top_p >= 1.0:
        return sorted_probs
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
    return sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Inverse-CDF sampling with one given uniform per row; top-p over the sorted distribution."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    return _inverse_cdf(_nucleus(sorted_probs, top_p), order, uniforms)


# float32's unit roundoff: k summed probabilities are off by at most ~k of these, in any order
_U32 = 2.0 ** -24


def sample_top_p_prefiltered(logits: torch.Tensor, uniforms: torch.Tensor, top_p: float,
                             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_from_logits` through the k most likely tokens instead of a sort of the vocabulary.

    Returns (tokens, exact): `exact[i]` proves row i got the very token the full sort gives. The
    top-k values are put in the full sort's order (probability down, id up, as a stable sort
    ties), so their CDF prefix is the same sums; it is exact when every nucleus token is strictly
    more likely than the k-th (so no tie at the cut can swap a token in) and the mass before the
    k-th reaches top_p with a margin of float32's worst-case rounding of k terms (so no token past k
    re-enters the nucleus by rounding)."""
    probs = torch.softmax(logits.float(), dim=-1)
    vals, ids = probs.topk(k, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    vals, order = vals.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    kept = _nucleus(vals, top_p)
    before_last = vals[:, :-1].sum(-1) if k > 1 else torch.zeros_like(vals[:, 0])
    smallest_kept = kept.masked_fill(kept <= 0, float("inf")).min(-1).values
    # the margin covers this sum's rounding and the full sort's (`before` of any later token is at
    # least before_last less both sums' errors), so no token past k can fall back under top_p
    exact = (smallest_kept > vals[:, -1]) & (before_last >= top_p + 4 * k * _U32)
    return _inverse_cdf(kept, ids, uniforms), exact
