"""Regression verdicts between two runs, for CI: per (task, metric) delta with a CI of the delta.

The CI comes from a paired bootstrap over the samples both runs scored (matched by sample
id), which cancels the per-sample difficulty both runs share and so is much tighter than
two independent CIs. Without per-sample scores (FID has none) it falls back to combining
the two runs' own CIs, and without any CI it decides on the tolerance alone; the verdict
says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals.metrics.result import bootstrap_ci
from reports.leaderboard import ReportError, fmt, load_metrics, load_samples, lower_is_better

Z95 = 1.959963984540054


@dataclass
class Verdict:
    task: str
    metric: str
    base: float | None
    new: float | None
    delta: float | None            # new - base, in the metric's units
    ci_low: float | None           # 95 % CI of the delta; None when unknown
    ci_high: float | None
    ci_method: str                 # "paired bootstrap" | "run CIs" | "none"
    n_paired: int                  # samples matched by id (paired bootstrap only)
    tolerance: float
    higher_is_better: bool
    verdict: str                   # "regression" | "improvement" | "same" | "missing"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_tolerances(items: list[str]) -> dict[str, float]:
    """["FID=0.5", "vqav2/accuracy=1"] -> {"FID": 0.5, "vqav2/accuracy": 1.0}."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        try:
            tol = float(value)
        except ValueError:
            tol = math.nan
        if not sep or not key or not math.isfinite(tol) or tol < 0:
            raise ReportError(f"--tolerance {item!r}: expected METRIC=x or TASK/METRIC=x with x >= 0")
        out[key.strip()] = tol
    return out


def tolerance_for(tolerances: dict[str, float], task: str, metric: str) -> float:
    """TASK/METRIC beats METRIC beats "*"; metric names match case-insensitively; default 0."""
    low = {k.lower(): v for k, v in tolerances.items()}
    for key in (f"{task}/{metric}".lower(), metric.lower(), "*"):
        if key in low:
            return low[key]
    return 0.0


def _per_sample(samples: list[dict[str, Any]], metric: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        per = s.get("per_sample")
        v = per.get(metric) if isinstance(per, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and s.get("id") is not None:
            out[str(s["id"])] = float(v)
    return out


def _unit_scale(value: float, per: dict[str, float]) -> float | None:
    """The factor from mean per-sample score to the metric value (1, or 100 for a
    percentage like VQA accuracy); None when the metric is not such a mean (e.g. BLEU)."""
    if not per or not math.isfinite(value):
        return None
    mean = float(np.mean(list(per.values())))
    for s in (1.0, 100.0):  # metrics.json values may be rounded (VQA: 2 decimals)
        if math.isclose(value, s * mean, rel_tol=0.01, abs_tol=0.01 * s):
            return s
    return None


def _entry(data: dict[str, Any], task: str, metric: str) -> dict[str, Any] | None:
    return ((data["tasks"].get(task) or {}).get("metrics") or {}).get(metric)


def _value(m: dict[str, Any] | None) -> float | None:
    try:
        v = float(m["value"]) if m is not None else None
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) else None


def _run_ci_delta(b: dict[str, Any], n: dict[str, Any], delta: float) -> tuple[float, float] | None:
    """Normal approximation from two independent 95 % CIs."""
    try:
        (bl, bh), (nl, nh) = b["ci"], n["ci"]
        se = math.hypot((float(bh) - float(bl)) / (2 * Z95), (float(nh) - float(nl)) / (2 * Z95))
    except (KeyError, TypeError, ValueError):
        return None
    return (delta - Z95 * se, delta + Z95 * se) if math.isfinite(se) else None


def compare_runs(base_dir: Path | str, new_dir: Path | str, tolerances: dict[str, float] | None = None, *,
                 n_resamples: int = 2000, seed: int = 0) -> list[Verdict]:
    tolerances = tolerances or {}
    base_dir, new_dir = Path(base_dir), Path(new_dir)
    base, new = load_metrics(base_dir), load_metrics(new_dir)
    sample_cache: dict[tuple[Path, str], list[dict[str, Any]]] = {}

    def samples(run_dir: Path, task: str) -> list[dict[str, Any]]:
        if (run_dir, task) not in sample_cache:
            sample_cache[(run_dir, task)] = load_samples(run_dir, task)
        return sample_cache[(run_dir, task)]

    pairs: list[tuple[str, str]] = []
    for data in (base, new):
        for task, entry in data["tasks"].items():
            pairs += [(task, m) for m in (entry.get("metrics") or {}) if (task, m) not in pairs]

    verdicts = []
    for task, metric in pairs:
        bm, nm = _entry(base, task, metric), _entry(new, task, metric)
        bv, nv = _value(bm), _value(nm)
        hib = not lower_is_better(metric)
        tol = tolerance_for(tolerances, task, metric)
        if bv is None or nv is None:
            where = "base" if bv is None else "new"
            verdicts.append(Verdict(task, metric, bv, nv, None, None, None, "none", 0, tol, hib, "missing",
                                    f"no value in the {where} run"))
            continue
        delta = nv - bv
        ci, method, n_paired, note = None, "none", 0, ""
        bp, np_ = _per_sample(samples(base_dir, task), metric), _per_sample(samples(new_dir, task), metric)
        ids = sorted(bp.keys() & np_.keys())
        scale = _unit_scale(bv, bp) or _unit_scale(nv, np_)
        if len(ids) >= 2 and scale is not None:
            d = np.array([np_[i] - bp[i] for i in ids])
            lo, hi = bootstrap_ci(d, n_resamples=n_resamples, seed=seed)
            ci, method, n_paired = (scale * lo, scale * hi), "paired bootstrap", len(ids)
            if len(ids) < max(len(bp), len(np_)):
                note = f"paired on {len(ids)} of {max(len(bp), len(np_))} samples"
        else:
            if len(ids) >= 2:
                note = "per-sample scores do not average to the metric; "
            elif bp or np_:
                note = "too few samples matched by id; "
            else:
                note = "no per-sample scores; "
            ci = _run_ci_delta(bm, nm, delta)
            if ci is not None:
                method, note = "run CIs", note + "CI of the delta from the two runs' CIs"
            else:
                note += "no CI: decided on the tolerance alone"
        worse = -delta if hib else delta  # > 0 when the new run is worse
        if ci is None:
            worse_sig = better_sig = True
        else:  # the CI of the delta lies wholly on one side of zero
            worse_sig = ci[1] < 0 if hib else ci[0] > 0
            better_sig = ci[0] > 0 if hib else ci[1] < 0
        if worse > tol and worse_sig:
            verdict = "regression"
        elif -worse > tol and better_sig:
            verdict = "improvement"
        else:
            verdict = "same"
        verdicts.append(Verdict(task, metric, bv, nv, delta, ci[0] if ci else None, ci[1] if ci else None,
                                method, n_paired, tol, hib, verdict, note))
    return verdicts


def has_regression(verdicts: list[Verdict]) -> bool:
    return any(v.verdict == "regression" for v in verdicts)


def _md(x: Any) -> str:
    """A Markdown table cell: no pipes, no HTML, no code spans breaking out."""
    s = "" if x is None else str(x)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "'"), ("\n", " ")):
        s = s.replace(a, b)
    return s


def to_markdown(verdicts: list[Verdict], base_dir: Path | str, new_dir: Path | str) -> str:
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("regression", "improvement", "same", "missing")}
    head = "❌ regression" if counts["regression"] else "✅ no regression"
    lines = [f"### cm3eval compare: {head}", "",
             f"base `{_md(base_dir)}` → new `{_md(new_dir)}`; "
             + ", ".join(f"{n} {k}" for k, n in counts.items() if n), "",
             "| task | metric | base | new | Δ | 95% CI of Δ | tolerance | verdict | note |",
             "|---|---|---:|---:|---:|---|---:|---|---|"]
    for v in verdicts:
        ci = f"[{fmt(v.ci_low)}, {fmt(v.ci_high)}] ({v.ci_method})" if v.ci_low is not None else "–"
        arrow = "↑" if v.higher_is_better else "↓"
        delta = f"{v.delta:+.4g}" if v.delta is not None else "–"
        verdict = f"**{v.verdict.upper()}**" if v.verdict == "regression" else v.verdict
        lines.append(f"| {_md(v.task)} | {_md(v.metric)} {arrow} | {fmt(v.base)} | {fmt(v.new)} | {delta} | "
                     f"{_md(ci)} | {fmt(v.tolerance) or '0'} | {verdict} | {_md(v.note)} |")
    lines += ["", "A regression is a metric worse by more than its tolerance with the CI of the delta "
              "excluding zero (↑ higher is better, ↓ lower is better)."]
    return "\n".join(lines) + "\n"
