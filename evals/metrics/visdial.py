"""Visual dialog (VisDial v1.0) ranking metrics, as the challenge's evaluation defines them.

Each round ranks its 100 candidate answers by the model's score (higher = better, rank 1 = best).
Sparse metrics over every round, from the rank of the ground-truth answer: R@1, R@5, R@10, mean
rank and MRR. NDCG over the densely annotated rounds (one per image in val): DCG of the top-k
ranked answers against their relevance, k = the number of answers with non-zero relevance,
divided by the DCG of the ideal order (visdial-challenge-starter-pytorch, visdialch/metrics.py).
R@k, MRR and NDCG are in percent (the papers' scale: CM3leon's NDCG 22.6), mean rank in ranks.
Ties in the scores are broken by the candidate's index (a stable sort), so a run is reproducible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .result import MetricResult, bootstrap_ci

SPARSE_NAMES = ("R@1", "R@5", "R@10", "mean_rank", "MRR")
NAMES = ("NDCG",) + SPARSE_NAMES


def scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    """[N, options] scores -> [N, options] ranks, 1 for the highest score."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, order.shape[1] + 1)[None].repeat(len(order), 0), axis=1)
    return ranks


def ndcg(scores: Sequence[float], relevance: Sequence[float]) -> float:
    """NDCG@k of one round, k = the number of candidates with non-zero relevance."""
    rel = np.asarray(relevance, dtype=np.float64)
    k = int((rel != 0).sum())
    if k == 0:
        raise ValueError("NDCG needs at least one candidate with non-zero relevance")
    discounts = np.log2(np.arange(k) + 2.0)
    ranked = np.argsort(scores_to_ranks(np.asarray(scores)[None])[0], kind="stable")[:k]
    ideal = np.sort(rel)[::-1][:k]
    return float((rel[ranked] / discounts).sum() / (ideal / discounts).sum())


def _result(name: str, values: np.ndarray, seed: int, **extra) -> MetricResult:
    ci = bootstrap_ci(values, seed=seed) if len(values) > 1 else None
    return MetricResult(name, float(values.mean()), ci, len(values), values, extra=dict(extra))


def visdial_metrics(scores: Sequence[Sequence[float]], gt_index: Sequence[int],
                    dense: Sequence[tuple[int, Sequence[float]]] = (), *, seed: int = 0) -> dict[str, MetricResult]:
    """`scores[i]`: round i's candidate scores; `gt_index[i]`: its ground-truth candidate;
    `dense`: (round index, relevance per candidate) for the densely annotated rounds."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or len(s) != len(gt_index):
        raise ValueError(f"expected one row of candidate scores per round, got {s.shape} for {len(gt_index)} rounds")
    gt_rank = scores_to_ranks(s)[np.arange(len(s)), np.asarray(gt_index, dtype=np.int64)].astype(np.float64)
    out = {f"R@{k}": _result(f"R@{k}", (gt_rank <= k).astype(np.float64) * 100, seed) for k in (1, 5, 10)}
    out["mean_rank"] = _result("mean_rank", gt_rank, seed)
    out["MRR"] = _result("MRR", 100.0 / gt_rank, seed)
    if dense:
        values = np.asarray([ndcg(s[i], rel) for i, rel in dense]) * 100
        out["NDCG"] = _result("NDCG", values, seed, rounds="the densely annotated round of each image")
    return out
