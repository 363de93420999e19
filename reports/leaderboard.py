"""Leaderboards: one tidy DataFrame across run folders, with published baselines beside it.

Units: every value here is what metrics.json holds, except in `leaderboard()`, which puts
measured CIDEr on the paper's scale (x100) so it can sit beside the published rows; that
table says so in its `scale` column. baselines.csv keeps the paper's numbers verbatim, so
the file can be checked against the paper line by line, plus the protocol each number was
measured under (split, n, resolution, candidates, k, shots) where the paper states it.

Every measured row carries its protocol (columns split, n_samples, candidates, k, shots,
resolution, task_version); a measured row that does not match the published protocol of
its task/metric gets comparable=False and a footnote naming what differs.

Works on pandas 2.x and 3.x (no astype(str) on columns that may hold missing values, no
chained assignment).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from reports.errors import ReportError
from reports.format import canonical_metric, fmt, fmt_ci, is_missing
from reports.runtable import (  # noqa: F401 - re-exported: the leaderboard's public names
    FIXED_COLUMNS, LEADERBOARD_COLUMNS, Sweep, collect_runs, find_sweeps, flatten, model_info, settings_columns,
)

__all__ = ["ReportError", "BASELINES_CSV", "FIXED_COLUMNS", "LEADERBOARD_COLUMNS", "Sweep", "collect_runs",
           "leaderboard", "load_baselines", "pivot", "find_sweeps", "model_info", "flatten", "display_table",
           "entry_label", "settings_columns", "protocol_gaps"]

BASELINES_CSV = Path(__file__).with_name("baselines.csv")
BASELINE_COLUMNS = ["model", "task", "metric", "value", "source", "notes"]
PROTOCOL_COLUMNS = ["split", "n", "resolution", "candidates", "k", "shots"]  # in baselines.csv

# Measured metric -> factor that puts it on the published scale. pycocoevalcap returns
# CIDEr as ~1.2; papers print 120.
DISPLAY_SCALE = {"CIDEr": 100.0}


# ---------------------------------------------------------------- baselines

def load_baselines(path: Path = BASELINES_CSV, *, with_protocol: bool = False) -> pd.DataFrame:
    """The published numbers; with_protocol adds higher_is_better and the protocol columns."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{path}: malformed CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in BASELINE_COLUMNS if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    values = pd.to_numeric(df["value"], errors="coerce")
    if values.isna().any():
        bad = df.loc[values.isna(), "model"].tolist()
        raise ReportError(f"{path}: non-numeric value for {bad}")
    df["value"] = values.astype(float)
    if not with_protocol:
        return df[BASELINE_COLUMNS]
    hib = df["higher_is_better"] if "higher_is_better" in df.columns else pd.Series([""] * len(df))
    bad = sorted(set(hib) - {"true", "false"})
    if bad:
        raise ReportError(f"{path}: higher_is_better must be true or false for every row, not {bad}")
    df["higher_is_better"] = [h == "true" for h in hib]
    for c in PROTOCOL_COLUMNS:
        df[c] = [_protocol_value(c, v) for v in (df[c] if c in df.columns else [""] * len(df))]
    return df[BASELINE_COLUMNS + ["higher_is_better"] + PROTOCOL_COLUMNS]


def _protocol_value(col: str, v: str) -> Any:
    if v == "":
        return None
    return v if col == "split" else int(float(v))


# ---------------------------------------------------------------- comparability with the papers

def _protocol_text(r: dict[str, Any]) -> str:
    parts = []
    for col, fmt_ in (("split", "{}"), ("n_samples", "n={}"), ("candidates", "{} cand."), ("k", "k={}"),
                      ("shots", "{}-shot"), ("resolution", "{} px")):
        v = r.get(col)
        if not is_missing(v):
            parts.append(fmt_.format(fmt(v)))
    return ", ".join(parts)


def _whole(v: Any) -> Any:
    """30000.0 (a number column with gaps is float) -> 30000, so values read the same."""
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def protocol_gaps(row: dict[str, Any], published: pd.DataFrame) -> list[str]:
    """What in a measured row's protocol differs from the published rows of its task/metric:
    another split or resolution, fewer samples, or a candidates/k/shots value no paper row used.
    Fields a paper did not state are not held against the row."""
    gaps = []
    checks = (("split", "split", "split {} (published: {})"), ("n", "n_samples", "n={} (published: {})"),
              ("resolution", "resolution", "resolution {} (published: {})"),
              ("candidates", "candidates", "{} candidates (published: {})"),
              ("k", "k", "k={} retrieved (published: {})"), ("shots", "shots", "{}-shot (published: {})"))
    for pub_col, col, text in checks:
        known = sorted({_whole(v) for v in published[pub_col] if not is_missing(v)}, key=str)
        mine = None if is_missing(row.get(col)) else _whole(row.get(col))
        if not known:
            continue
        if mine is None:
            gaps.append(text.format("not recorded", "/".join(map(str, known))))
        elif pub_col == "n":
            if int(mine) < min(known):
                gaps.append(text.format(int(mine), min(known)))
        elif str(mine) not in {str(v) for v in known}:
            gaps.append(text.format(mine, "/".join(map(str, known))))
    return gaps


def _mark_comparability(measured: pd.DataFrame, pub: pd.DataFrame) -> pd.DataFrame:
    comparable, notes = [], []
    for r, note in zip(measured.to_dict("records"), measured["notes"]):
        rows = pub[(pub["task"] == r["task"]) & (pub["metric"] == r["metric"])] if not pub.empty else pub
        gaps = protocol_gaps(r, rows) if not rows.empty else []
        comparable.append(not gaps if not rows.empty else None)
        if gaps:
            note = "; ".join(x for x in (note, "† not the published protocol: " + ", ".join(gaps)) if x)
        notes.append(note)
    return measured.assign(comparable=pd.Series(comparable, index=measured.index, dtype=object), notes=notes)


# ---------------------------------------------------------------- the leaderboard

def _sort_key(value: float, hib: Any) -> float:
    if is_missing(value):
        return math.inf
    return -value if hib is True else value if hib is False else math.inf


def leaderboard(df: pd.DataFrame, baselines: bool = True, baselines_path: Path = BASELINES_CSV) -> pd.DataFrame:
    """Measured rows (source="measured", CIDEr x100) then published ones (source="published").

    Within each task/metric measured rows come first, each group best first (direction as
    recorded; a metric without one keeps its order); the two are never interleaved.
    """
    measured = df.copy()
    measured["metric"] = [canonical_metric(m) for m in measured["metric"]]
    measured["source"] = "measured"
    scale = pd.Series([DISPLAY_SCALE.get(m, 1.0) for m in measured["metric"]], index=measured.index, dtype=float)
    for col in ("value", "ci_low", "ci_high"):
        measured[col] = measured[col].astype(float) * scale
    measured["scale"] = scale
    measured["citation"] = ""
    measured["notes"] = [f"x{s:g} to match published {m}" if s != 1 else "" for s, m in zip(scale, measured["metric"])]
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
    out["_src"] = [0 if s == "measured" else 1 for s in out["source"]]
    out["_key"] = [_sort_key(v, h) for v, h in zip(out["value"], direction)]
    out = out.sort_values(["task", "metric", "_src", "_key"], kind="stable", na_position="last")
    return out.drop(columns=["_src", "_key"]).reset_index(drop=True)


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
