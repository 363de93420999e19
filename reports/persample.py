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


def agrees(value: float, expected: float, scale: float) -> bool:
    """value == expected up to float rounding (relative), and on the x100 scale up to the
    2-decimal rounding of the official VQA number. Relative, so a collapsed model's tiny scores
    (1e-9) do not pass for a mean of anything near zero."""
    return math.isclose(value, expected, rel_tol=1e-6, abs_tol=0.005 if scale == 100.0 else 1e-12)


def mean_scale(entry: dict[str, Any], per: dict[str, float]) -> float | None:
    """The factor from mean per-sample score to the recorded value (1, or 100 for a percentage
    like VQA accuracy) when the value is such a mean; else None (BLEU is a corpus score, not a
    mean, and says so with extra.corpus_level)."""
    value = finite(entry.get("value"))
    if not per or value is None or (entry.get("extra") or {}).get("corpus_level"):
        return None
    mean = math.fsum(per.values()) / len(per)
    for s in (1.0, 100.0):
        if agrees(value, s * mean, s):
            return s
    return None
