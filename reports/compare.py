"""Regression verdicts between two runs, for CI: per (task, metric) delta with a CI of the delta.

What a CI job can trust:
- Every metric read is first verified against the run's samples (reports/verify.py: a mean of
  the per-sample scores, FD recomputed from the saved features, BLEU/METEOR recomputed from the
  predictions); a value nothing supports is an error naming it (exit 2).
- Direction comes from `higher_is_better` recorded in metrics.json (the metric table declares
  it; the engine writes it). Never from the name. --direction only fills in a direction a run
  did not record (overriding a recorded one is refused); a metric with none gets the verdict
  "unknown", which fails unless its value is unchanged.
- A metric or task missing on either side, or whose value is null/NaN, is "missing": a failure
  (exit 1) unless --allow-missing. Two runs with nothing in common fail too.
- Failed samples count: each task gets a "failures" row (lower is better), so 150 of 300
  samples failing is a regression even when the 150 that finished score as before.
- Paired runs (the same sample ids: the same prompts and selection) get the CI of the delta from
  a paired bootstrap over the shared samples, and the delta beside it is computed on the SAME
  samples: for mean metrics from the per-sample differences, for set metrics (FID/FD) from the
  saved features with the linearised paired bootstrap of reports/paired.py. Unpaired runs fall
  back to combining the two runs' own CIs, and without any CI the tolerance alone decides; the
  method column and the note say which.
- A regression is a worsening beyond the tolerance (default 0) whose CI lies wholly on the worse
  side of zero; --tolerance names must name a metric of the runs.
- Runs measured under different protocols (task version, split, n, candidates, k, shots,
  resolution, data, metric options) are refused unless --force; the Markdown lists what differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evals import runs
from evals.metrics.result import bootstrap_ci
from reports import protocol
from reports import paired
from reports.errors import CompareRefused, InconsistentRun, ReportError
from reports.format import direction_arrow, finite, fmt, md_cell, metric_label, recorded_direction, shown
from reports.persample import mean_scale, per_sample
from reports.rundata import load_metrics, load_samples, load_task_config
from reports.verify import verify_task

Z95 = 1.959963984540054
FAILURES = "failures"  # the per-task row counting failed samples
TASK_ROW = "(task)"  # the metric column of a verdict about a whole task (missing on one side)
FAILING = ("regression", "missing", "unknown")


@dataclass
class Verdict:
    task: str
    metric: str
    base: float | None
    new: float | None
    delta: float | None            # new - base, in the metric's units (paired: over the matched samples)
    ci_low: float | None           # 95 % CI of the delta; None when unknown
    ci_high: float | None
    ci_method: str                 # "paired bootstrap" | "paired bootstrap (linearised)" | "run CIs" | "count" | "none"
    n_paired: int                  # samples matched by id (paired bootstrap only)
    tolerance: float
    higher_is_better: bool | None  # None: the runs did not record it
    verdict: str                   # "regression" | "improvement" | "same" | "missing" | "unknown"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    base_dir: Path
    new_dir: Path
    verdicts: list[Verdict] = field(default_factory=list)
    protocol_diffs: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)
    forced: bool = False
    allow_missing: bool = False

    @property
    def refused(self) -> bool:
        return bool(self.protocol_diffs) and not self.forced

    @property
    def n_compared(self) -> int:
        """Metric rows with a value on both sides (the failures rows do not count)."""
        return sum(v.metric not in (FAILURES, TASK_ROW) and v.base is not None and v.new is not None
                   for v in self.verdicts)

    def failing(self) -> list[Verdict]:
        bad = ("regression", "unknown") if self.allow_missing else FAILING
        return [v for v in self.verdicts if v.verdict in bad]

    def passed(self) -> bool:
        return not self.refused and self.n_compared > 0 and not self.failing()

    def exit_code(self) -> int:
        """compare's contract: 0 no regression, 1 a failing row (or nothing compared), 2 refused."""
        return 2 if self.refused else 0 if self.passed() else 1

    def verdict(self) -> str:
        """The overall verdict in one word: "no regression", "regression", "failed" or "refused"."""
        if self.refused:
            return "refused"
        if self.passed():
            return "no regression"
        return "regression" if any(v.verdict == "regression" for v in self.verdicts) else "failed"

    def to_json(self) -> dict[str, Any]:
        """One object: the overall verdict, the exit code, the headline, the protocol differences
        and every row."""
        return {"verdict": self.verdict(), "exit_code": self.exit_code(), "headline": _headline(self),
                "base": str(self.base_dir), "new": str(self.new_dir),
                "protocol_differences": [{"task": t, "field": k, "base": a, "new": b}
                                         for t, diffs in self.protocol_diffs.items() for k, a, b in diffs],
                "forced": self.forced, "rows": [v.to_dict() for v in self.verdicts]}


# ---------------------------------------------------------------- options

def _parse_pairs(items: list[str], option: str, expect: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise ReportError(f"{option} {item!r}: expected {expect}")
        out.append((key.strip(), value.strip()))
    return out


def parse_tolerances(items: list[str]) -> dict[str, float]:
    """["FID=0.5", "vqav2/accuracy=1"] -> {"FID": 0.5, "vqav2/accuracy": 1.0}."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        tol = finite(value) if sep else None
        if not sep or not key.strip() or tol is None or tol < 0:
            raise ReportError(f"--tolerance {item!r}: expected METRIC=x or TASK/METRIC=x with x >= 0")
        out[key.strip()] = tol
    return out


def parse_directions(items: list[str]) -> dict[str, bool]:
    """["t2i_rank=lower", "vqav2/accuracy=higher"]: for runs that did not record a direction."""
    words = {"higher": True, "lower": False}
    out = {}
    for key, value in _parse_pairs(items, "--direction", "METRIC=higher|lower or TASK/METRIC=higher|lower"):
        if value.lower() not in words:
            raise ReportError(f"--direction {key}={value}: expected higher or lower")
        out[key] = words[value.lower()]
    return out


def _lookup(table: dict[str, Any], task: str, metric: str, default: Any) -> Any:
    """TASK/METRIC beats METRIC beats "*"; names match case-insensitively."""
    low = {k.lower(): v for k, v in table.items()}
    for key in (f"{task}/{metric}".lower(), metric.lower(), "*"):
        if key in low:
            return low[key]
    return default


def tolerance_for(tolerances: dict[str, float], task: str, metric: str) -> float:
    return float(_lookup(tolerances, task, metric, 0.0))


# ---------------------------------------------------------------- per-sample scores

def _run_ci_delta(b: dict[str, Any], n: dict[str, Any], delta: float) -> tuple[float, float] | None:
    """Normal approximation from two independent 95 % CIs."""
    try:
        (bl, bh), (nl, nh) = b["ci"], n["ci"]
        se = math.hypot((float(bh) - float(bl)) / (2 * Z95), (float(nh) - float(nl)) / (2 * Z95))
    except (KeyError, TypeError, ValueError):
        return None
    return (delta - Z95 * se, delta + Z95 * se) if math.isfinite(se) else None


def _with_set_ci(entry: dict[str, Any], saved: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    """A set metric's entry with its own 95 % CI from its saved features when it records none."""
    ci = paired.run_ci(metric, saved) if entry.get("ci") is None and saved is not None else None
    return {**entry, "ci": list(ci)} if ci is not None else entry


# ---------------------------------------------------------------- option names

def _metric_names(base: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    """{task: {metric: recorded direction (None: not recorded)}} over both runs, plus failures."""
    out: dict[str, dict[str, bool | None]] = {}
    for data in (base, new):
        for task, entry in data["tasks"].items():
            names = out.setdefault(task, {})
            for metric, m in (entry.get("metrics") or {}).items():
                hib = recorded_direction(m)
                names[metric] = hib if names.get(metric) is None else names[metric]
    for names in out.values():
        names[FAILURES] = False  # the per-task row of failed samples: lower is better
    return out


def _matches(key: str, names: dict[str, dict[str, bool | None]]) -> list[tuple[str, str]]:
    """(task, metric) pairs a TASK/METRIC, METRIC or "*" key names (case-insensitive)."""
    k = key.lower()
    return [(t, m) for t, ms in names.items() for m in ms
            if k == "*" or k == m.lower() or k == f"{t}/{m}".lower()]


def check_option_names(tolerances: dict[str, float], directions: dict[str, bool], base: dict[str, Any],
                       new: dict[str, Any]) -> None:
    """--tolerance / --direction keys must name a metric of the runs, and --direction only a metric
    whose direction neither run recorded (a recorded direction is part of the metric's definition)."""
    names = _metric_names(base, new)
    known = sorted({m for ms in names.values() for m in ms})
    for option, table in (("--tolerance", tolerances), ("--direction", directions)):
        for key in table:
            if not _matches(key, names):
                raise ReportError(f"{option} {key}: no such metric in these runs (metrics: {', '.join(known)})")
    for key, hib in directions.items():
        recorded = [(t, m) for t, m in _matches(key, names) if names[t][m] is not None]
        if recorded:
            t, m = recorded[0]
            raise ReportError(f"--direction {key}: {t}/{m} records higher_is_better={names[t][m]} in metrics.json; "
                              "--direction only fills in a direction a run did not record")


# ---------------------------------------------------------------- verdicts

def _decide(delta: float, ci: tuple[float, float] | None, hib: bool | None, tol: float) -> str:
    if hib is None:
        return "same" if delta == 0 else "unknown"
    worse = -delta if hib else delta  # > 0 when the new run is worse
    if ci is None:
        worse_sig = better_sig = True
    else:  # the CI of the delta lies wholly on one side of zero
        worse_sig = ci[1] < 0 if hib else ci[0] > 0
        better_sig = ci[0] > 0 if hib else ci[1] < 0
    if worse > tol and worse_sig:
        return "regression"
    if -worse > tol and better_sig:
        return "improvement"
    return "same"


class _Task:
    """One task of both runs: entries, samples (read once) and the options of the comparison."""

    def __init__(self, cmp: Comparison, task: str, be: dict[str, Any], ne: dict[str, Any],
                 opts: dict[str, Any]) -> None:
        self.cmp, self.task, self.be, self.ne, self.opts = cmp, task, be, ne, opts
        self.bs = load_samples(cmp.base_dir, task)
        self.ns = load_samples(cmp.new_dir, task)
        verify_task(cmp.base_dir, task, be, self.bs)
        verify_task(cmp.new_dir, task, ne, self.ns)

    def direction(self, metric: str, bm: dict[str, Any] | None, nm: dict[str, Any] | None) -> tuple[bool | None, str]:
        given = _lookup(self.opts["directions"], self.task, metric, None)
        if given is not None:
            return given, "direction from --direction"
        b, n = recorded_direction(bm), recorded_direction(nm)
        if b is not None and n is not None and b != n:
            raise InconsistentRun(f"{self.task}/{metric}: base records higher_is_better={b}, new {n}; "
                                  "the two runs disagree on the metric's definition")
        hib = b if b is not None else n
        return hib, "" if hib is not None else "higher_is_better not recorded (give --direction)"

    def failures(self) -> Verdict:
        def count(entry: dict[str, Any], samples: list[dict[str, Any]]) -> int:
            ids = {str(f.get("id")) for f in entry.get("failures") or [] if isinstance(f, dict)}
            ids |= {str(s["id"]) for s in samples if s.get("failure")}
            return len(ids)

        b, n = count(self.be, self.bs), count(self.ne, self.ns)
        tol = tolerance_for(self.opts["tolerances"], self.task, FAILURES)
        verdict = _decide(float(n - b), None, False, tol)
        total = self.ne.get("n_samples")
        note = f"{n} of {total} samples failed in the new run" if n and total else ""
        return Verdict(self.task, FAILURES, b, n, float(n - b), None, None, "count", 0, tol, False, verdict, note)

    def metric(self, metric: str) -> Verdict:
        bm, nm = (self.be.get("metrics") or {}).get(metric), (self.ne.get("metrics") or {}).get(metric)
        hib, note = self.direction(metric, bm, nm)
        tol = tolerance_for(self.opts["tolerances"], self.task, metric)
        bv, nv = finite((bm or {}).get("value")), finite((nm or {}).get("value"))
        if bv is None or nv is None:
            side = " and ".join(s for s, m, v in (("base", bm, bv), ("new", nm, nv)) if v is None)
            why = "absent" if (bm is None or nm is None) and side != "base and new" else "null/NaN or absent"
            return Verdict(self.task, metric, bv, nv, None, None, None, "none", 0, tol, hib, "missing",
                           f"no value in the {side} run ({why})")
        delta, ci, method, n_paired, how = self._delta(metric, bm, nm, bv, nv)
        note = "; ".join(x for x in (how, note) if x)
        return Verdict(self.task, metric, bv, nv, delta, ci[0] if ci else None, ci[1] if ci else None, method,
                       n_paired, tol, hib, _decide(delta, ci, hib, tol), note)

    def _delta(self, metric: str, bm: dict[str, Any], nm: dict[str, Any], bv: float, nv: float
               ) -> tuple[float, tuple[float, float] | None, str, int, str]:
        if paired.set_metric(metric) is not None:
            return self._set_delta(metric, bm, nm, bv, nv)
        bp, np_ = per_sample(self.bs, metric), per_sample(self.ns, metric)
        # the scale of a run whose value is not 0 (a 0 from a collapsed model fits any scale)
        scales = [(s, v) for s, v in ((mean_scale(bm, bp), bv), (mean_scale(nm, np_), nv)) if s is not None]
        scale = next((s for s, v in scales if v != 0), scales[0][0] if scales else None)
        ids = sorted(bp.keys() & np_.keys())
        if scale is not None and bp and np_ and len(ids) >= 2:
            d = np.array([np_[i] - bp[i] for i in ids])
            lo, hi = bootstrap_ci(d, n_resamples=self.opts["n_resamples"], seed=self.opts["seed"])
            delta = scale * float(d.mean())  # over the same samples as its CI
            note = ""
            if len(ids) < max(len(bp), len(np_)):
                note = (f"paired on {len(ids)} of {max(len(bp), len(np_))} samples; delta over those "
                        f"(the recorded values differ by {nv - bv:+.4g})")
            return delta, (scale * lo, scale * hi), "paired bootstrap", len(ids), note
        if scale is not None and bp and np_:
            note = "unpaired (too few samples matched by id); "
        elif bp and np_:
            if _run_ci_delta(bm, nm, nv - bv) is None and len(ids) >= 2:
                return self._corpus_delta(bp, np_, ids, bv, nv)
            note = "a corpus metric; "
        else:
            note = "no per-sample scores; "
        return self._unpaired(nv - bv, bm, nm, note)

    def _corpus_delta(self, bp: dict[str, float], np_: dict[str, float], ids: list[str], bv: float, nv: float
                      ) -> tuple[float, tuple[float, float] | None, str, int, str]:
        """A corpus metric without CIs (METEOR): the paired bootstrap of its per-sample (segment)
        scores, its spread rescaled by corpus value / segment mean (an approximation, said so)."""
        d = np.array([np_[i] - bp[i] for i in ids])
        seg = abs(float(np.mean([bp[i] for i in ids]))) + abs(float(np.mean([np_[i] for i in ids])))
        ratio = (abs(bv) + abs(nv)) / seg if seg > 0 else 1.0
        lo, hi = bootstrap_ci(d, n_resamples=self.opts["n_resamples"], seed=self.opts["seed"])
        delta, mid = nv - bv, float(d.mean())
        ci = (delta + ratio * (lo - mid), delta + ratio * (hi - mid))
        return delta, ci, "paired bootstrap (segment scores)", len(ids), \
            f"a corpus metric: CI from its per-sample scores x {ratio:.3g} (corpus / segment mean)"

    def _unpaired(self, delta: float, bm: dict[str, Any], nm: dict[str, Any], note: str
                  ) -> tuple[float, tuple[float, float] | None, str, int, str]:
        ci = _run_ci_delta(bm, nm, delta)
        if ci is not None:
            return delta, ci, "run CIs", 0, note + "CI of the delta from the two runs' own CIs"
        return delta, None, "none", 0, note + "no CI: decided on the tolerance alone"

    def _set_delta(self, metric: str, bm: dict[str, Any], nm: dict[str, Any], bv: float, nv: float
                   ) -> tuple[float, tuple[float, float] | None, str, int, str]:
        """FID/FD: the linearised paired bootstrap over shared prompts (reports/paired.py) when both
        runs saved their features against the same reference; else the runs' own CIs."""
        fb = runs.read_features(self.cmp.base_dir / self.task, metric)
        fn = runs.read_features(self.cmp.new_dir / self.task, metric)
        if fb is None or fn is None:
            return self._unpaired(nv - bv, bm, nm, "unpaired (no saved features); ")
        got = paired.paired_set_delta(metric, fb, fn, n_resamples=self.opts["n_resamples"], seed=self.opts["seed"])
        if isinstance(got, str):
            return self._unpaired(nv - bv, _with_set_ci(bm, fb, metric), _with_set_ci(nm, fn, metric),
                                  f"unpaired ({got}); ")
        note = ""
        if got.n < max(len(fb["ids"]), len(fn["ids"])):
            note = (f"paired on {got.n} of {max(len(fb['ids']), len(fn['ids']))} samples; delta over those "
                    f"(the recorded values differ by {nv - bv:+.4g})")
        return got.delta, got.ci, "paired bootstrap (linearised)", got.n, note


def _absent_task(task: str, be: dict[str, Any] | None, ne: dict[str, Any] | None) -> list[Verdict]:
    """A task only one run has: each of its metrics is missing on the other side."""
    side, present = ("base", ne) if be is None else ("new", be)
    out = []
    for metric, m in ((present or {}).get("metrics") or {}).items():
        v = finite(m.get("value"))
        b, n = (None, v) if be is None else (v, None)
        out.append(Verdict(task, metric, b, n, None, None, None, "none", 0, 0.0, recorded_direction(m), "missing",
                           f"task absent in the {side} run"))
    return out or [Verdict(task, TASK_ROW, None, None, None, None, None, "none", 0, 0.0, None, "missing",
                           f"task absent in the {side} run")]


def _shared_metrics(entry: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The task entry with only the metrics both runs have a value for: how a metric missing on one
    side was measured is no protocol difference (its row says "missing", exit 1)."""
    mine, theirs = entry.get("metrics") or {}, other.get("metrics") or {}
    keep = {m: e for m, e in mine.items()
            if finite(e.get("value")) is not None and finite((theirs.get(m) or {}).get("value")) is not None}
    return {**entry, "metrics": keep}


def compare(base_dir: Path | str, new_dir: Path | str, tolerances: dict[str, float] | None = None, *,
            directions: dict[str, bool] | None = None, allow_missing: bool = False, force: bool = False,
            n_resamples: int = 2000, seed: int = 0) -> Comparison:
    cmp = Comparison(Path(base_dir), Path(new_dir), forced=force, allow_missing=allow_missing)
    base, new = load_metrics(cmp.base_dir), load_metrics(cmp.new_dir)
    opts = {"tolerances": tolerances or {}, "directions": directions or {}, "n_resamples": n_resamples,
            "seed": seed}
    check_option_names(opts["tolerances"], opts["directions"], base, new)
    tasks = list(base["tasks"]) + [t for t in new["tasks"] if t not in base["tasks"]]
    for task in tasks:
        be, ne = base["tasks"].get(task), new["tasks"].get(task)
        if be is not None and ne is not None:
            bm, nm = _shared_metrics(be, ne), _shared_metrics(ne, be)
            diffs = protocol.differences(protocol.manifest(bm, load_task_config(cmp.base_dir, task)),
                                         protocol.manifest(nm, load_task_config(cmp.new_dir, task)))
            if diffs:
                cmp.protocol_diffs[task] = diffs
    if cmp.refused:
        return cmp
    for task in tasks:
        be, ne = base["tasks"].get(task), new["tasks"].get(task)
        if be is None or ne is None:
            run_dir, entry = (cmp.new_dir, ne) if be is None else (cmp.base_dir, be)
            verify_task(run_dir, task, entry, load_samples(run_dir, task))
            cmp.verdicts += _absent_task(task, be, ne)
            continue
        t = _Task(cmp, task, be, ne, opts)
        base_names = list(be.get("metrics") or {})
        names = base_names + [m for m in ne.get("metrics") or {} if m not in base_names]
        cmp.verdicts += [t.metric(m) for m in names]
        cmp.verdicts.append(t.failures())
    return cmp


def compare_runs(base_dir: Path | str, new_dir: Path | str, tolerances: dict[str, float] | None = None,
                 **kwargs: Any) -> list[Verdict]:
    """The verdicts; runs with different protocols raise CompareRefused unless force=True."""
    cmp = compare(base_dir, new_dir, tolerances, **kwargs)
    if cmp.refused:
        raise CompareRefused(refusal_message(cmp))
    return cmp.verdicts


def refusal_message(cmp: Comparison) -> str:
    parts = [f"{task}: {protocol.describe(d)}" for task, d in cmp.protocol_diffs.items()]
    return ("the runs were not measured under the same protocol (" + " | ".join(parts)
            + "); compare them anyway with --force")


# ---------------------------------------------------------------- Markdown

def _headline(cmp: Comparison) -> str:
    if cmp.refused:
        return "⛔ refused: different protocols"
    counts = {k: sum(v.verdict == k for v in cmp.verdicts) for k in FAILING}
    if counts["regression"]:
        return "❌ regression"
    if cmp.n_compared == 0:
        return "❌ nothing compared (no metric has a value in both runs)"
    bad = [f"{n} {k}" for k, n in counts.items() if n and (k != "missing" or not cmp.allow_missing)]
    return f"❌ failed: {', '.join(bad)}" if bad else "✅ no regression"


def to_markdown(result: Comparison | list[Verdict], base_dir: Path | str | None = None,
                new_dir: Path | str | None = None) -> str:
    cmp = result if isinstance(result, Comparison) else Comparison(Path(str(base_dir)), Path(str(new_dir)),
                                                                    list(result))
    counts = {k: sum(v.verdict == k for v in cmp.verdicts)
              for k in ("regression", "improvement", "same", "missing", "unknown")}
    lines = [f"### cm3eval compare: {_headline(cmp)}", "",
             f"base `{md_cell(str(base_dir or cmp.base_dir))}` → new `{md_cell(str(new_dir or cmp.new_dir))}`; "
             + ", ".join(f"{n} {k}" for k, n in counts.items() if n), ""]
    if cmp.protocol_diffs:
        lines += ["#### Protocol differences" + (" (compared anyway: --force)" if cmp.forced else ""), "",
                  "| task | field | base | new |", "|---|---|---|---|"]
        lines += [f"| {md_cell(t)} | {md_cell(k)} | {md_cell(fmt(a))} | {md_cell(fmt(b))} |"
                  for t, diffs in cmp.protocol_diffs.items() for k, a, b in diffs]
        lines.append("")
    if cmp.verdicts:
        lines += ["| task | metric | base | new | Δ | 95% CI of Δ | tolerance | verdict | note |",
                  "|---|---|---:|---:|---:|---|---:|---|---|"]
    for v in cmp.verdicts:  # on the metric's display scale (reports.format.family), named in the metric cell
        def show(x: Any, m: str = v.metric) -> str:
            return fmt(shown(m, x))

        ci = f"[{show(v.ci_low)}, {show(v.ci_high)}] ({v.ci_method})" if v.ci_low is not None else "–"
        delta = f"{shown(v.metric, v.delta):+.4g}" if v.delta is not None else "–"
        verdict = f"**{v.verdict.upper()}**" if v.verdict in FAILING else v.verdict
        lines.append(f"| {md_cell(v.task)} | {md_cell(metric_label(v.metric))} {direction_arrow(v.higher_is_better)} | "
                     f"{show(v.base)} | {show(v.new)} | {delta} | {md_cell(ci)} | {show(v.tolerance) or '0'} | "
                     f"{verdict} | {md_cell(v.note)} |")
    lines += ["", "A regression is a metric worse by more than its tolerance with the CI of the delta "
              "excluding zero (↑ higher is better, ↓ lower is better, as recorded in metrics.json; ? not "
              "recorded). Missing metrics and unknown directions fail unless allowed."]
    return "\n".join(lines) + "\n"
