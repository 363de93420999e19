"""The tidy table of finished runs: one row per (run, task, metric), with each task's
protocol and setting columns, and the sweeps (a setting varied, everything else equal) in it.

Works on pandas 2.x and 3.x: grouping keys are built value by value (pandas 3 keeps missing
values missing through astype(str), which made "a | b".join fail on a base run beside a sweep).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from reports import protocol
from reports.format import finite, is_missing, recorded_direction
from reports.rundata import load_metrics, load_task_config

# Columns collect_runs() and leaderboard() own; every other column is a run setting.
FIXED_COLUMNS = [
    "run", "model", "checkpoint", "step", "task", "task_name", "metric", "value",
    "ci_low", "ci_high", "n", "n_samples", "n_failures", "settings_hash", "run_dir",
    "higher_is_better", "task_version", "split", "candidates", "k", "shots", "resolution",
    "limit", "decoding", "status", "status_note",
]
LEADERBOARD_COLUMNS = ["source", "scale", "unit", "rank", "citation", "notes", "comparable", "protocol"]


_STEP_RE = re.compile(r"(?:step|global_step|checkpoint|ckpt|iter|iteration)[-_=]?(\d+)$", re.IGNORECASE)


# ---------------------------------------------------------------- collecting runs

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"generation": {"cfg_scale": 3}} -> {"generation.cfg_scale": 3}; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps(v, sort_keys=True)  # hashable, so runs can be grouped by it
        else:
            out[key] = v
    return out


def model_info(*candidates: Any) -> tuple[str, str, int | None]:
    """(model, checkpoint, step) from metrics.json run.model or config.json model.

    A checkpoint path ending in step-1000 (or ckpt_1000 …) names its model after the parent
    folder, so the checkpoints of one training run share a model name and form a sweep.
    """
    for c in candidates:
        if c is None or c == "":
            continue
        step = None
        if isinstance(c, dict):
            checkpoint = str(c.get("path") or c.get("checkpoint") or c.get("name") or "")
            name = c.get("name")
            step = c.get("step")
        else:
            checkpoint, name = str(c), None
        parts = [p for p in re.split(r"[\\/]", checkpoint.rstrip("/\\")) if p]
        match = _STEP_RE.search(parts[-1]) if parts else None
        if step is None and match:
            step = int(match.group(1))
        if not name:
            name = parts[-2] if match and len(parts) >= 2 else (parts[-1] if parts else checkpoint)
        try:
            step = int(step) if step is not None else None
        except (TypeError, ValueError):
            step = None
        return str(name), checkpoint, step
    return "", "", None


def _run_labels(paths: list[Path]) -> list[str]:
    """Folder names; the parent joins in for sweep points (cfg_scale=3 of which sweep?), and the
    paths as given where two runs would still share a label."""
    names = []
    for p in paths:
        r = p.resolve()
        names.append(f"{r.parent.name}/{r.name}" if "=" in r.name and r.parent.name else (r.name or str(p)))
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def task_status(entry: dict[str, Any] | None) -> tuple[str, str]:
    """(status, why) of one task of a run: "complete", "partial" (some samples failed or a
    requested metric is missing), "failed" (no metric value at all) or "in progress" (a task
    folder without a metrics.json entry). Only complete rows are ranked."""
    if entry is None:
        return "in progress", "no metrics.json entry yet (still running, or stopped before scoring)"
    n = entry.get("n_samples")
    failed = entry.get("n_failed", len(entry.get("failures") or []))
    of = f"{failed} of {n} samples failed" if n is not None else f"{failed} samples failed"
    values = [finite(m.get("value")) for m in (entry.get("metrics") or {}).values() if isinstance(m, dict)]
    missing = entry.get("missing_metrics") if isinstance(entry.get("missing_metrics"), dict) else {}
    if not any(v is not None for v in values):
        why = [of] if failed else []
        why += [f"{k}: {v}" for k, v in missing.items()] or ["no metric was computed"]
        return "failed", "; ".join(why)
    if failed:
        return "partial", of
    if missing:
        return "partial", "not computed: " + ", ".join(missing)
    return "complete", ""


def _task_rows(label: str, run_dir: Path, run_meta: dict[str, Any], task: str, entry: dict[str, Any] | None
               ) -> list[dict[str, Any]]:
    cfg = load_task_config(run_dir, task) or {}
    spec = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    overrides = cfg.get("overrides") if isinstance(cfg.get("overrides"), dict) else {}
    model, checkpoint, step = model_info(run_meta.get("model"), cfg.get("model"))
    status, note = task_status(entry)
    entry = entry or {}
    man = protocol.manifest(entry, cfg)
    gen = spec.get("generation") if isinstance(spec.get("generation"), dict) else {}
    limit = flatten(overrides).get("limit")  # --limit / --set limit=; a spec's own limit (FID-30K) is its protocol
    metrics = {n: m for n, m in (entry.get("metrics") or {}).items() if finite(m.get("value")) is not None}
    # a task without a single value still gets a row: a failed run is listed, never dropped
    rows = []
    for name, m in (metrics or {"": {}}).items():
        ci = m.get("ci") or [None, None]
        rows.append({
            "run": label, "model": model, "checkpoint": checkpoint, "step": step,
            "task": task, "task_name": str(spec.get("name") or task), "metric": name,
            "value": _float(m.get("value")), "ci_low": _float(ci[0]), "ci_high": _float(ci[1]),
            "n": m.get("n", entry.get("n_samples")), "n_samples": entry.get("n_samples"),
            "n_failures": len(entry.get("failures") or []),
            "settings_hash": entry.get("config_hash") or cfg.get("hash"),
            "run_dir": str(run_dir), "higher_is_better": recorded_direction(m),
            "task_version": man.get("task version"), "split": man.get("split"),
            "candidates": man.get("candidates"), "k": man.get("k"), "shots": man.get("shots"),
            "resolution": man.get("resolution"), "limit": limit, "decoding": gen.get("decoding"),
            "status": status, "status_note": note,
            "_overrides": flatten(overrides), "_spec": flatten(spec),
        })
    return rows


def collect_runs(paths: Iterable[Path | str]) -> pd.DataFrame:
    """One row per (run, task, metric); settings columns from each task's config overrides; a task
    without a metric value (failed, in progress) gets one row with metric "". Every path must be a
    run, finished or started (reports.rundata.discover_runs picks them)."""
    paths = [Path(p) for p in paths]
    rows: list[dict[str, Any]] = []
    for run_dir, label in zip(paths, _run_labels(paths)):
        data = load_metrics(run_dir, started=True)
        for task, entry in data["tasks"].items():
            rows += _task_rows(label, run_dir, data.get("run") or {}, task, entry)
        for task in _unfinished_tasks(run_dir, data["tasks"]):
            rows += _task_rows(label, run_dir, data.get("run") or {}, task, None)
    # A column per overridden key; runs that did not override it get the spec's own value,
    # so a sweep's default point still lines up with the overridden ones.
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["_overrides"] if k not in keys]
    for r in rows:
        over, spec = r.pop("_overrides"), r.pop("_spec")
        for k in keys:
            col = k if k not in FIXED_COLUMNS + LEADERBOARD_COLUMNS else f"overrides.{k}"
            r[col] = over[k] if k in over else spec.get(k)
    df = pd.DataFrame(rows, columns=None if rows else FIXED_COLUMNS)
    df["step"] = df["step"].astype("Int64")
    df["n"] = pd.to_numeric(df["n"], errors="coerce").astype("Int64")
    df["higher_is_better"] = df["higher_is_better"].astype(object)
    return df


def _unfinished_tasks(run_dir: Path, finished: dict[str, Any]) -> list[str]:
    """Task folders of a run (they hold config.json) that metrics.json does not list yet."""
    return [p.name for p in sorted(Path(run_dir).iterdir())
            if p.is_dir() and p.name not in finished and (p / "config.json").is_file()]


def _float(x: Any) -> float:
    v = finite(x)
    return math.nan if v is None else v


def settings_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in FIXED_COLUMNS and c not in LEADERBOARD_COLUMNS]


# ---------------------------------------------------------------- sweeps (for the plots)

@dataclass
class Sweep:
    """One metric of one task as a setting varies, everything else held equal."""
    task: str
    metric: str
    axis: str
    series: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (label, rows sorted by axis)


def _number(v: Any) -> float | None:
    """A setting's value as a number when it is one (also "3.0" from a --set on the CLI)."""
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()  # numpy scalar
    if is_missing(v):
        return None
    return finite(v)


def _key_str(v: Any) -> str:
    """A cell as grouping text; missing values (None, NaN, NA) all read "-", on pandas 2 and 3."""
    return "-" if is_missing(v) else str(v)


def _group_keys(rows: pd.DataFrame, cols: list[str]) -> list[str]:
    return [" | ".join(_key_str(v) for v in values) for values in rows[cols].itertuples(index=False, name=None)]


def find_sweeps(df: pd.DataFrame) -> list[Sweep]:
    """Settings (and the checkpoint step) that take several numeric values across runs
    or tasks of one spec while model and every other setting stay the same."""
    if df.empty:
        return []
    if "source" in df.columns:
        df = df[df["source"] == "measured"]
    df = df[df["metric"] != ""]  # a failed task's placeholder row has no value to plot
    settings = settings_columns(df)
    sweeps: list[Sweep] = []
    for axis in settings + ["step"]:
        others = ["model"] + [c for c in settings if c != axis] + ([] if axis == "step" else ["checkpoint"])
        for (task, metric), rows in df.groupby(["task_name", "metric"], sort=False):
            xs = [_number(v) for v in rows[axis]]
            keep = [x is not None for x in xs]
            rows = rows[keep].assign(_x=[x for x in xs if x is not None])
            if rows["_x"].nunique() < 2:
                continue
            keys = _group_keys(rows, others)
            sweep = Sweep(str(task), str(metric), axis)
            for key in dict.fromkeys(keys):
                group = rows[[k == key for k in keys]]
                if group["_x"].nunique() >= 2:
                    label = _series_label(group.iloc[0], others, rows)
                    sweep.series.append((label, group.sort_values("_x", kind="stable")))
            if sweep.series:
                sweeps.append(sweep)
    return sweeps


def _series_label(row: pd.Series, others: list[str], rows: pd.DataFrame) -> str:
    """Name a line by the held-equal settings that differ between lines (or by the model)."""
    varying = [c for c in others if len({_key_str(v) for v in rows[c]}) > 1]
    parts = [f"{c}={_key_str(row[c])}" if c != "model" else str(row[c]) for c in varying]
    return ", ".join(parts) or str(row["model"]) or "run"


