"""Precision, recall, density and coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020), in any feature space.

The estimators of the `prdc` package (`compute_prdc(real, fake, nearest_k)`), computed in row
blocks so memory stays O(block x N) instead of the package's full N x N distance matrices:
- radius of a point = distance to its k-th nearest neighbour in its own set (itself excluded);
- precision = share of fake points inside some real point's ball;
- recall = share of real points inside some fake point's ball;
- density = (1/k) x mean over fake points of the number of real balls holding it;
- coverage = share of real points whose nearest fake point is inside their ball.
Comparisons are strict (`<`), as in the package. Distances in float64 ((x-y)^2 expanded, as
sklearn's `euclidean_distances`). The CI of each value is a percentile bootstrap over the samples
it averages (fake points for precision and density, real points for recall and coverage), the
other set held fixed.
"""

from __future__ import annotations

import numpy as np

from evals.metrics.result import MetricResult, bootstrap_ci

NAMES = ("precision", "recall", "density", "coverage")
_BLOCK = 1024  # rows per distance block: 1024 x N float64


def _as_features(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"prdc: {what} features must be a non-empty [N, D] array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"prdc: {what} features contain NaN or inf")
    return a


def _distances(x: np.ndarray, y: np.ndarray, x_sq: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    d2 = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _radii(x: np.ndarray, sq: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row."""
    out = np.empty(x.shape[0])
    for s in range(0, x.shape[0], _BLOCK):
        d = _distances(x[s:s + _BLOCK], x, sq[s:s + _BLOCK], sq)
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = 0.0  # self-distance exactly 0, as sklearn
        out[s:s + _BLOCK] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def prdc_per_sample(real, fake, nearest_k: int = 5) -> dict[str, np.ndarray]:
    """The per-sample indicators behind each value: precision/density per fake point, recall/coverage per real point."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"prdc: feature dims differ (real {r.shape[1]}, fake {f.shape[1]})")
    if nearest_k < 1 or nearest_k >= min(r.shape[0], f.shape[0]):
        raise ValueError(f"prdc: nearest_k={nearest_k} needs more than k samples per set "
                         f"(real {r.shape[0]}, fake {f.shape[0]})")
    r_sq, f_sq = (r * r).sum(1), (f * f).sum(1)
    r_rad, f_rad = _radii(r, r_sq, nearest_k), _radii(f, f_sq, nearest_k)
    in_real_balls = np.zeros(f.shape[0])  # per fake point: how many real balls hold it
    recalled = np.zeros(r.shape[0], dtype=bool)
    covered = np.zeros(r.shape[0], dtype=bool)
    for s in range(0, r.shape[0], _BLOCK):
        d = _distances(r[s:s + _BLOCK], f, r_sq[s:s + _BLOCK], f_sq)  # [block real, all fake]
        in_real_balls += (d < r_rad[s:s + _BLOCK, None]).sum(0)
        recalled[s:s + _BLOCK] = (d < f_rad[None, :]).any(1)
        covered[s:s + _BLOCK] = d.min(1) < r_rad[s:s + _BLOCK]
    return {"precision": (in_real_balls > 0).astype(np.float64), "recall": recalled.astype(np.float64),
            "density": in_real_balls / nearest_k, "coverage": covered.astype(np.float64)}


def compute_prdc(real, fake, nearest_k: int = 5, *, space: str = "", seed: int = 0,
                 n_resamples: int = 1000) -> dict[str, MetricResult]:
    """{precision, recall, density, coverage} as MetricResults (all higher is better), with bootstrap CIs.

    `space` names the feature space (e.g. "inception", "dinov2-vitl14"); it is recorded in `extra`.
    `per_sample` is set only for the fake-side values (one entry per generated sample)."""
    per = prdc_per_sample(real, fake, nearest_k)
    n_real, n_fake = per["recall"].size, per["precision"].size
    out = {}
    for name in NAMES:
        x = per[name]
        ci = bootstrap_ci(x, seed=seed, n_resamples=n_resamples) if n_resamples > 0 else None
        fake_side = name in ("precision", "density")
        out[name] = MetricResult(name, float(x.mean()), ci, n_fake, x if fake_side else None,
                                 {"nearest_k": nearest_k, "space": space, "n_real": n_real, "n_fake": n_fake,
                                  "ci_over": "generated samples" if fake_side else "reference samples"},
                                 higher_is_better=True)
        if not fake_side:  # recall and coverage are functions of both whole sets: the run keeps them, once
            out[name].set_inputs = {"features": _as_features(fake, "fake"), "ref_features": _as_features(real, "real")}
            out[name].extra["features_file"] = "PRDC"
    return out
