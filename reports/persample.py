"""Per-sample scores of a task and how they relate to the metric recorded in metrics.json."""

from __future__ import annotations

import math
from typing import Any

from reports.format import finite


def per_sample(samples: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """{sample id: score} over the samples that finished without a failure."""
    out: dict[str, float] = {}
    for s in samples:
        per = s.get("per_sample")
        v = finite(per.get(metric)) if isinstance(per, dict) and not s.get("failure") else None
        if v is not None:
            out[str(s["id"])] = v
    return out


def mean_scale(entry: dict[str, Any], per: dict[str, float]) -> float | None:
    """The factor from mean per-sample score to the recorded value (1, or 100 for a percentage
    like VQA accuracy) when the value is such a mean; else None (BLEU is a corpus score, not a
    mean). The tolerance covers 2-decimal rounding on the x100 scale."""
    value = finite(entry.get("value"))
    if not per or value is None:
        return None
    mean = math.fsum(per.values()) / len(per)
    for s in (1.0, 100.0):
        if math.isclose(value, s * mean, rel_tol=1e-6, abs_tol=6e-5 * s):
            return s
    return None
