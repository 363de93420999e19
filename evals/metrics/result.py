"""The value every metric returns: a number, its bootstrap CI, the per-sample scores behind it,
and its direction (`higher_is_better`), which reports and `compare` read instead of guessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MetricResult:
    name: str
    value: float
    ci: tuple[float, float] | None = None
    n: int = 0
    per_sample: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # True: larger is better (accuracy, CIDEr, CLIPScore); False: smaller is (FID, L1, mean rank).
    # None only until scoring.score_task sets it from the metric table.
    higher_is_better: bool | None = None
    # A set metric (FD, CMMD, PRDC's recall and coverage) has no per-sample scores; these are its
    # inputs instead: {"features": [n, d] generated rows in sample order, and the reference: "ref_mu" +
    # "ref_sigma" (Fréchet) or "ref_features" (rows); "ids" when the rows are a subset of the task's
    # samples (a category)}. The run saves them (evals.runs.write_features, as
    # extra["features_file"] or the metric's name) so compare and verify recompute the value.
    set_inputs: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: NaN (a metric that could not be computed, e.g. SPICE without its models) becomes null."""
        value = float(self.value)
        out: dict[str, Any] = {"value": value if np.isfinite(value) else None, "n": int(self.n)}
        ci_ok = self.ci is not None and all(np.isfinite(c) for c in self.ci)
        out["ci"] = [float(self.ci[0]), float(self.ci[1])] if ci_ok else None
        if self.higher_is_better is not None:
            out["higher_is_better"] = bool(self.higher_is_better)
        if self.extra:
            out["extra"] = self.extra
        return out


def bootstrap_ci(
    per_sample: np.ndarray,
    *,
    statistic=np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over samples; seeded so reports are reproducible."""
    x = np.asarray(per_sample, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array of per-sample scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci: per-sample scores contain NaN or inf")
    rng = np.random.default_rng(seed)
    # resample in chunks so memory stays ~40 MB even for 200k-question VQA sets
    chunk = max(1, min(n_resamples, 5_000_000 // x.size))
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_resamples - start), x.size))
        if statistic is np.mean:
            stats[start:start + len(idx)] = x[idx].mean(axis=1)  # vectorised fast path
        else:
            stats[start:start + len(idx)] = [statistic(x[row]) for row in idx]
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_result(name: str, per_sample, *, scale: float = 1.0, seed: int = 0,
                higher_is_better: bool | None = None, **extra) -> MetricResult:
    """A mean-type metric: value = scale * mean(per_sample), with its bootstrap CI on the same scale."""
    x = np.asarray(per_sample, dtype=np.float64)
    lo, hi = bootstrap_ci(x, seed=seed)
    return MetricResult(name, float(scale * x.mean()), (scale * lo, scale * hi), int(x.size), x, dict(extra),
                        higher_is_better)
