"""The value every metric returns: a number, its bootstrap CI, and the per-sample scores behind it."""

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

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": float(self.value), "n": int(self.n)}
        out["ci"] = [float(self.ci[0]), float(self.ci[1])] if self.ci is not None else None
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
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    if statistic is np.mean:
        stats = x[idx].mean(axis=1)  # vectorised fast path
    else:
        stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_result(name: str, per_sample, *, scale: float = 1.0, seed: int = 0, **extra) -> MetricResult:
    """A mean-type metric: value = scale * mean(per_sample), with its bootstrap CI on the same scale."""
    x = np.asarray(per_sample, dtype=np.float64)
    lo, hi = bootstrap_ci(x, seed=seed)
    return MetricResult(name, float(scale * x.mean()), (scale * lo, scale * hi), int(x.size), x, dict(extra))
