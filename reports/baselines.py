"""The published numbers (baselines.csv) and how a measured row's protocol departs from them.

baselines.csv keeps each paper's number verbatim (on the display scale of reports.format:
captioning x100 as printed), its direction, and the protocol it was measured under (split, n,
resolution, candidates, k, shots) where the paper states it. The leaderboard marks rows with
these deviations; the report lists them at the top of the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.errors import ReportError
from reports.format import fmt, is_missing

BASELINES_CSV = Path(__file__).with_name("baselines.csv")
BASELINE_COLUMNS = ["model", "task", "metric", "value", "source", "notes"]
PROTOCOL_COLUMNS = ["split", "n", "resolution", "candidates", "k", "shots"]  # in baselines.csv


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


def own_gaps(row: dict[str, Any], published: pd.DataFrame | None = None) -> list[str]:
    """Deviations a row carries whatever the papers state: a --limit subset of the split (when
    the papers' rows state no n to compare with; protocol_gaps compares it otherwise) and a
    decoding mode that changes the sampled tokens."""
    gaps = []
    limit = None if is_missing(row.get("limit")) else _whole(row.get("limit"))
    stated_n = published is not None and "n" in published and any(not is_missing(v) for v in published["n"])
    if limit is not None and not stated_n:
        gaps.append(f"n={fmt(row.get('n_samples'))}: a --limit {limit} subset (published: the whole split)")
    decoding = row.get("decoding")
    if not is_missing(decoding) and decoding not in ("", "ar"):
        gaps.append(f"decoding {decoding} (published: ar)")
    return gaps


def deviations(row: dict[str, Any], published: pd.DataFrame) -> list[str]:
    """Every deviation of a measured row (a collect_runs() record) from the published protocol
    of its task and metric, plus the ones it carries whatever the papers state."""
    if published.empty:
        return own_gaps(row)
    rows = published[(published["task"] == row["task"]) & (published["metric"] == row["metric"])]
    return (protocol_gaps(row, rows) if not rows.empty else []) + own_gaps(row, rows)
