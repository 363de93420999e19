"""Leaderboards: one tidy DataFrame across run folders, with published baselines beside it.

Units: collect_runs() holds what metrics.json holds; `leaderboard()` puts every measured value
on its metric's display scale (reports.format.family: captioning metrics x100, as the papers
print them), named in the `unit` column, so it sits beside the published rows. baselines.csv
keeps the paper's numbers verbatim (already on that scale), plus the protocol each number was
measured under (split, n, resolution, candidates, k, shots) where the paper states it.

Every measured row carries its protocol (columns split, n_samples, candidates, k, shots,
resolution, task_version, limit, decoding) and its status (complete / partial / failed /
in progress). A measured row that does not match the published protocol of its task/metric,
or that ran on a --limit subset or with a decoding mode that changes the sampled tokens, gets
comparable=False and a footnote naming what differs. Only complete rows are ranked (`rank`);
the others are listed below them, marked, never dropped.

Works on pandas 2.x and 3.x (no astype(str) on columns that may hold missing values, no
chained assignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports.baselines import BASELINE_COLUMNS, BASELINES_CSV, PROTOCOL_COLUMNS, load_baselines  # noqa: F401
from reports.baselines import own_gaps, protocol_gaps  # noqa: F401 - the leaderboard's public names
from reports.errors import ReportError
from reports.format import canonical_metric, direction_arrow, family, fmt, fmt_ci, is_missing, metric_label
from reports.runtable import (  # noqa: F401 - re-exported: the leaderboard's public names
    FIXED_COLUMNS, LEADERBOARD_COLUMNS, Sweep, collect_runs, find_sweeps, flatten, model_info, settings_columns,
)

__all__ = ["ReportError", "BASELINES_CSV", "FIXED_COLUMNS", "LEADERBOARD_COLUMNS", "Sweep", "collect_runs",
           "leaderboard", "load_baselines", "pivot", "find_sweeps", "model_info", "flatten", "display_table",
           "entry_label", "settings_columns", "protocol_gaps", "TaskTable", "task_tables"]

# ---------------------------------------------------------------- comparability with the papers

def _protocol_text(r: dict[str, Any]) -> str:
    parts = []
    for col, fmt_ in (("split", "{}"), ("n_samples", "n={}"), ("candidates", "{} cand."), ("k", "k={}"),
                      ("shots", "{}-shot"), ("resolution", "{} px")):
        v = r.get(col)
        if not is_missing(v):
            parts.append(fmt_.format(fmt(v)))
    return ", ".join(parts)


def _mark_comparability(measured: pd.DataFrame, pub: pd.DataFrame) -> pd.DataFrame:
    comparable, notes = [], []
    for r, note in zip(measured.to_dict("records"), measured["notes"]):
        rows = pub[(pub["task"] == r["task"]) & (pub["metric"] == r["metric"])] if not pub.empty else pub
        gaps = (protocol_gaps(r, rows) if not rows.empty else []) + own_gaps(r, rows)
        comparable.append(not gaps if not (rows.empty and not gaps) else None)
        if gaps:
            note = "; ".join(x for x in (note, "† not the published protocol: " + ", ".join(gaps)) if x)
        notes.append(note)
    return measured.assign(comparable=pd.Series(comparable, index=measured.index, dtype=object), notes=notes)


# ---------------------------------------------------------------- the leaderboard

def _sort_key(value: float, hib: Any) -> float:
    if is_missing(value):
        return math.inf
    return -value if hib is True else value if hib is False else math.inf


def _group(source: str, status: Any) -> int:
    """Row blocks within a task/metric: complete measured rows (ranked), the other measured
    rows (partial, failed, in progress: listed, never ranked), then the published rows."""
    if source != "measured":
        return 2
    return 0 if status in ("complete", None) or is_missing(status) else 1


def leaderboard(df: pd.DataFrame, baselines: bool = True, baselines_path: Path = BASELINES_CSV) -> pd.DataFrame:
    """Measured rows (source="measured", on the display scale) then published ones.

    Within each task/metric: complete measured rows best first (direction as recorded; a metric
    without one keeps its order) with their `rank`, then the measured rows that are not complete
    (status partial / failed / in progress; no rank), then the published rows best first.
    """
    measured = df.copy()
    measured["metric"] = [canonical_metric(m) for m in measured["metric"]]
    measured["source"] = "measured"
    scale = pd.Series([family(m).factor for m in measured["metric"]], index=measured.index, dtype=float)
    for col in ("value", "ci_low", "ci_high"):
        measured[col] = measured[col].astype(float) * scale
    measured["scale"] = scale
    measured["citation"] = ""
    measured["notes"] = [f"{st}: {why}" if st not in ("complete", None) and not is_missing(st) else ""
                         for st, why in zip(measured.get("status", [None] * len(measured)),
                                            measured.get("status_note", [""] * len(measured)))]
    measured["protocol"] = [_protocol_text(r) for r in measured.to_dict("records")]
    pub = load_baselines(baselines_path, with_protocol=True) if baselines else pd.DataFrame()
    measured = _mark_comparability(measured, pub)
    parts = [measured]
    if baselines:
        pub = pub.rename(columns={"source": "citation", "n": "n_samples"})
        pub["source"] = "published"
        pub["scale"] = 1.0
        pub["run"] = ""
        pub["ci_low"] = math.nan
        pub["ci_high"] = math.nan
        pub["comparable"] = None
        pub["status"] = "published"
        pub["protocol"] = [_protocol_text(r) for r in pub.to_dict("records")]
        parts.append(pub)
    # object columns on both sides: concat then never drops all-NA columns' dtypes (pandas 2 warns)
    frames = [p.astype(object) for p in parts if not p.empty] or [measured.astype(object)]
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    if "n" in out:
        out["n"] = pd.to_numeric(out["n"], errors="coerce").astype("Int64")
    lead = ["source", "model", "run", "task", "metric", "value", "ci_low", "ci_high", "n"]
    out = out[[c for c in lead if c in out] + [c for c in out.columns if c not in lead]]
    for c in ("task", "metric", "run", "model"):
        out[c] = ["" if is_missing(v) else str(v) for v in out[c]]
    for c in ("value", "ci_low", "ci_high", "scale"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    direction = _directions(out)
    out["higher_is_better"] = pd.Series(direction, index=out.index, dtype=object)
    out["unit"] = [family(m).unit for m in out["metric"]]
    out["_src"] = [_group(s, st) for s, st in zip(out["source"], out.get("status", [None] * len(out)))]
    out["_key"] = [_sort_key(v, h) for v, h in zip(out["value"], direction)]
    out["_blank"] = [m == "" for m in out["metric"]]  # a failed task's row without a metric: last
    out = out.sort_values(["task", "_blank", "metric", "_src", "_key"], kind="stable", na_position="last")
    out["rank"] = _ranks(out)
    return out.drop(columns=["_src", "_key", "_blank"]).reset_index(drop=True)


def _ranks(out: pd.DataFrame) -> pd.Series:
    """1, 2, ... over the complete measured rows of each task/metric with a value and a
    recorded direction (ties share a rank); missing elsewhere."""
    ranks: list[Any] = []
    last: dict[tuple[str, str], tuple[float, int, int]] = {}
    for t, m, g, k in zip(out["task"], out["metric"], out["_src"], out["_key"]):
        if g != 0 or not math.isfinite(k):
            ranks.append(pd.NA)
            continue
        key, count = last.get((t, m), (math.nan, 0, 0))[0], last.get((t, m), (math.nan, 0, 0))[1] + 1
        rank = last[(t, m)][2] if k == key else count
        last[(t, m)] = (k, count, rank)
        ranks.append(rank)
    return pd.Series(ranks, index=out.index, dtype="Int64")


def _directions(out: pd.DataFrame) -> list[bool | None]:
    """Each row's direction; a row without one takes what another row of its task/metric
    recorded (a published row tells the direction of a measured run made before it was recorded)."""
    known: dict[tuple[str, str], bool] = {}
    for t, m, h in zip(out["task"], out["metric"], out.get("higher_is_better", [None] * len(out))):
        if isinstance(h, bool):
            known.setdefault((t, m), h)
    return [h if isinstance(h, bool) else known.get((t, m))
            for t, m, h in zip(out["task"], out["metric"], out.get("higher_is_better", [None] * len(out)))]


def entry_label(row: Any) -> str:
    """What a leaderboard row is called: the model, and the run it came from when measured."""
    if row.get("source") == "measured" and row.get("run") and row.get("run") != row.get("model"):
        return f"{row['model']} [{row['run']}]" if row.get("model") else str(row["run"])
    return str(row.get("model") or row.get("run") or "")


def pivot(lb: pd.DataFrame, marks: bool = False) -> pd.DataFrame:
    """source x entry rows, one "task / metric" column each; measured rows above published.
    marks=True: formatted cells, with "†" on values not measured under the published protocol."""
    if lb.empty:
        return pd.DataFrame()
    recs = lb.to_dict("records")
    t = pd.DataFrame({
        "source": [r["source"] for r in recs], "entry": [entry_label(r) for r in recs],
        "column": [f"{r['task']} / {r['metric']}" for r in recs],
        "value": [(fmt(r["value"]) + (" †" if r.get("comparable") is False else "")) if marks else r["value"]
                  for r in recs]})
    p = t.pivot_table(index=["source", "entry"], columns="column", values="value", aggfunc="first", sort=False)
    order = {"measured": 0, "published": 1}
    p = p.iloc[sorted(range(len(p)), key=lambda i: order.get(p.index[i][0], 2))]
    p.columns.name = None
    return p.fillna("") if marks else p


def display_table(lb: pd.DataFrame) -> pd.DataFrame:
    """The long table with formatted numbers, for Markdown, LaTeX and HTML."""
    rows = [{
        "source": r["source"], "model": r.get("model", ""), "run": r.get("run", ""),
        "task": r["task"], "metric": r["metric"],
        "value": fmt(r["value"]) + (" †" if r.get("comparable") is False else ""),
        "95% CI": fmt_ci(r.get("ci_low"), r.get("ci_high")), "n": fmt(r.get("n")),
        "protocol": r.get("protocol") or "",
        "notes": "; ".join(x for x in (str(r.get("notes") or ""), str(r.get("citation") or "")) if x),
    } for r in lb.to_dict("records")]
    cols = ["source", "model", "run", "task", "metric", "value", "95% CI", "n", "protocol", "notes"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- one table per task

@dataclass
class TaskTable:
    """One task's leaderboard: a row per run or published entry, a column per metric."""
    task: str
    headers: list[str]
    rows: list[list[str]]
    classes: list[str]  # per row: "measured complete", "measured partial", ..., "published"
    numeric: set[int] = field(default_factory=set)  # column indices right-aligned


def _primary_metric(rows: pd.DataFrame, metrics: list[str]) -> str:
    """The metric a task's rows are ranked by: the one the papers report, else the first with
    a recorded direction, else the first."""
    published = [m for m in metrics if ((rows["metric"] == m) & (rows["source"] == "published")).any()]
    directed = [m for m in metrics if any(isinstance(h, bool) for h in rows.loc[rows["metric"] == m,
                                                                                  "higher_is_better"])]
    return (published or directed or metrics or [""])[0]


def _cell(r: dict[str, Any]) -> str:
    return fmt(r["value"]) + (" †" if r.get("comparable") is False else "")


def _entries(rows: pd.DataFrame, primary: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(source, entry label) -> its first row (of the primary metric when it has one), formatted
    cells per metric and notes, in the frame's order of the primary metric."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    ranked = rows.assign(_other=[m != primary for m in rows["metric"]]).sort_values("_other", kind="stable")
    for r in ranked.to_dict("records"):
        e = entries.setdefault((r["source"], entry_label(r)), {"row": r, "cells": {}, "notes": []})
        if r["metric"]:
            e["cells"][r["metric"]] = _cell(r)
        notes = r.get("notes") if r["source"] == "measured" else r.get("citation")
        e["notes"] += [p for p in str(notes or "").split("; ") if p and p not in e["notes"]]
    return entries


def task_tables(lb: pd.DataFrame) -> list[TaskTable]:
    """The leaderboard() frame as one table per task: complete runs ranked by the task's primary
    metric, then the other runs (marked), then the papers; a column per metric headed by its name,
    scale and direction arrow; the row's status, rank and notes (deviations)."""
    tables = []
    measured = set(lb.loc[lb["source"] == "measured", "task"])
    for task, rows in lb.groupby("task", sort=False):
        if measured and task not in measured:  # the papers' other tasks: in the long table only
            continue
        metrics = [m for m in dict.fromkeys(rows["metric"]) if m]
        primary = _primary_metric(rows, metrics)
        order = ([primary] if primary else []) + [m for m in metrics if m != primary]
        hib = {m: next((h for h in rows.loc[rows["metric"] == m, "higher_is_better"] if isinstance(h, bool)), None)
               for m in order}
        headers = ["model", "run", "status", "rank", *(f"{metric_label(m)} {direction_arrow(hib[m])}" for m in order),
                   "protocol deviations and notes"]
        out, classes = [], []
        entries = _entries(rows, primary)
        for (source, _), e in sorted(entries.items(), key=lambda kv: _group(kv[0][0], kv[1]["row"].get("status"))):
            r = e["row"]
            status = str(r.get("status") or ("published" if source == "published" else "complete"))
            rank = r.get("rank") if r.get("metric") == primary else None
            out.append([str(r.get("model") or ""), str(r.get("run") or ""), status,
                        "" if rank is None or is_missing(rank) else str(int(rank)),
                        *(e["cells"].get(m, "") for m in order), "; ".join(e["notes"])])
            classes.append(source if source == "published" else f"measured {status.replace(' ', '-')}")
        tables.append(TaskTable(str(task), headers, out, classes, set(range(3, 4 + len(order)))))
    return tables
