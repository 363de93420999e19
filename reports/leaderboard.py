"""Leaderboards: one tidy DataFrame across run folders, with published baselines beside it.

Also the run-folder readers the other report modules share (docs/INTERFACES.md, "Run folder").

Units: every value here is what metrics.json holds, except in `leaderboard()`, which puts
measured CIDEr on the paper's scale (x100) so it can sit beside the published rows; that
table says so in its `scale` column. baselines.csv keeps the paper's numbers verbatim, so
the file can be checked against the paper line by line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

BASELINES_CSV = Path(__file__).with_name("baselines.csv")
BASELINE_COLUMNS = ["model", "task", "metric", "value", "source", "notes"]

# Measured metric -> factor that puts it on the published scale. pycocoevalcap returns
# CIDEr as ~1.2; papers print 120.
DISPLAY_SCALE = {"CIDEr": 100.0}

# Spellings the metric modules might use -> the name baselines.csv uses.
_METRIC_ALIASES = {
    "fid": "FID", "fid-30k": "FID", "fid30k": "FID",
    "cider": "CIDEr", "cider-d": "CIDEr", "cider_d": "CIDEr",
    "accuracy": "accuracy", "acc": "accuracy", "vqa_accuracy": "accuracy",
    "vqa-accuracy": "accuracy", "vqa accuracy": "accuracy", "vqa_acc": "accuracy",
    "ndcg": "NDCG",
}

# Columns collect_runs() and leaderboard() own; every other column is a run setting.
FIXED_COLUMNS = [
    "run", "model", "checkpoint", "step", "task", "task_name", "metric", "value",
    "ci_low", "ci_high", "n", "n_samples", "n_failures", "settings_hash", "run_dir",
]
LEADERBOARD_COLUMNS = ["source", "scale", "citation", "notes"]

_STEP_RE = re.compile(r"(?:step|global_step|checkpoint|ckpt|iter|iteration)[-_=]?(\d+)$", re.IGNORECASE)


class ReportError(Exception):
    """Bad input to a report; the message is one line and names the file."""


# ---------------------------------------------------------------- run-folder readers

def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a run, checked for the fields the reports use."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (no such directory)")
    path = run_dir / "metrics.json"
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ReportError(f"{path}: expected an object with a 'tasks' object")
    if data.get("run") is not None and not isinstance(data["run"], dict):
        raise ReportError(f"{path}: 'run' must be an object")
    for task, entry in data["tasks"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics", {}), dict):
            raise ReportError(f"{path}: tasks.{task}.metrics must be an object")
        for name, m in entry.get("metrics", {}).items():
            if not isinstance(m, dict) or "value" not in m:
                raise ReportError(f"{path}: tasks.{task}.metrics.{name} must be an object with a 'value'")
            ci = m.get("ci")
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2):
                raise ReportError(f"{path}: tasks.{task}.metrics.{name}.ci must be [low, high] or null")
        if not isinstance(entry.get("failures", []), list):
            raise ReportError(f"{path}: tasks.{task}.failures must be a list")
    return data


def load_task_config(run_dir: Path, task: str) -> dict[str, Any] | None:
    """TASK/config.json, or None when the run has none (the settings columns stay empty)."""
    path = Path(run_dir) / task / "config.json"
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def load_samples(run_dir: Path, task: str) -> list[dict[str, Any]]:
    """All sample lines of a task, every rank, sorted by index.

    A last line without its newline is a write cut off by a kill (the engine appends and
    flushes line by line), so it is skipped; a malformed complete line is an error.
    """
    files = sorted((Path(run_dir) / task / "samples").glob("rank-*.jsonl"))
    samples: list[dict[str, Any]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReportError(f"{path}: cannot read ({e})") from None
        lines = text.split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == len(lines):  # no trailing newline: cut-off write
                    continue
                raise ReportError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ReportError(f"{path}:{lineno}: a sample line must be a JSON object")
            samples.append(obj)
    samples.sort(key=lambda s: (_as_int(s.get("index")), str(s.get("id"))))
    return samples


def _as_int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 1 << 62


# ---------------------------------------------------------------- metric names and directions

def canonical_metric(name: str) -> str:
    return _METRIC_ALIASES.get(str(name).strip().lower(), str(name))


def lower_is_better(metric: str) -> bool:
    """FID, FD-<encoder>, KID and pixel distances go down when a model gets better."""
    upper = str(metric).strip().upper()
    return upper.startswith(("FID", "FD", "KID")) or upper in {"L1", "L2", "MSE", "LPIPS"}


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
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [p.resolve().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def collect_runs(paths: Iterable[Path | str]) -> pd.DataFrame:
    """One row per (run, task, metric); settings columns from each task's config overrides."""
    paths = [Path(p) for p in paths]
    rows: list[dict[str, Any]] = []
    for run_dir, label in zip(paths, _run_labels(paths)):
        data = load_metrics(run_dir)
        run_meta = data.get("run") or {}
        for task, entry in data["tasks"].items():
            cfg = load_task_config(run_dir, task) or {}
            spec = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
            overrides = cfg.get("overrides") if isinstance(cfg.get("overrides"), dict) else {}
            model, checkpoint, step = model_info(run_meta.get("model"), cfg.get("model"))
            failures = entry.get("failures") or []
            for name, m in (entry.get("metrics") or {}).items():
                ci = m.get("ci") or [None, None]
                rows.append({
                    "run": label, "model": model, "checkpoint": checkpoint, "step": step,
                    "task": task, "task_name": str(spec.get("name") or task), "metric": name,
                    "value": _float(m.get("value")), "ci_low": _float(ci[0]), "ci_high": _float(ci[1]),
                    "n": m.get("n", entry.get("n_samples")), "n_samples": entry.get("n_samples"),
                    "n_failures": len(failures),
                    "settings_hash": entry.get("config_hash") or cfg.get("hash"),
                    "run_dir": str(run_dir),
                    "_overrides": flatten(overrides), "_spec": flatten(spec),
                })
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
    return df


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


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
    if isinstance(v, bool) or v is None or v is pd.NA:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def find_sweeps(df: pd.DataFrame) -> list[Sweep]:
    """Settings (and the checkpoint step) that take several numeric values across runs
    or tasks of one spec while model and every other setting stay the same."""
    if df.empty:
        return []
    if "source" in df.columns:
        df = df[df["source"] == "measured"]
    settings = settings_columns(df)
    sweeps: list[Sweep] = []
    for axis in settings + ["step"]:
        others = ["model"] + [c for c in settings if c != axis] + ([] if axis == "step" else ["checkpoint"])
        for (task, metric), rows in df.groupby(["task_name", "metric"], sort=False):
            xs = rows[axis].map(_number)
            rows = rows[xs.notna()].assign(_x=xs[xs.notna()].astype(float))
            if rows["_x"].nunique() < 2:
                continue
            key = rows[others].astype(str).agg(" | ".join, axis=1) if others else pd.Series("", index=rows.index)
            sweep = Sweep(str(task), str(metric), axis)
            for _, group in rows.groupby(key, sort=False):
                if group["_x"].nunique() >= 2:
                    label = _series_label(group.iloc[0], others, rows)
                    sweep.series.append((label, group.sort_values("_x")))
            if sweep.series:
                sweeps.append(sweep)
    return sweeps


def _series_label(row: pd.Series, others: list[str], rows: pd.DataFrame) -> str:
    """Name a line by the held-equal settings that differ between lines (or by the model)."""
    varying = [c for c in others if rows[c].astype(str).nunique() > 1]
    parts = [f"{c}={row[c]}" if c != "model" else str(row[c]) for c in varying]
    return ", ".join(parts) or str(row["model"]) or "run"


# ---------------------------------------------------------------- baselines and the leaderboard

def load_baselines(path: Path = BASELINES_CSV) -> pd.DataFrame:
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"model": str, "task": str, "metric": str, "source": str, "notes": str})
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
    df["notes"] = df["notes"].fillna("")
    return df[BASELINE_COLUMNS]


def leaderboard(df: pd.DataFrame, baselines: bool = True, baselines_path: Path = BASELINES_CSV) -> pd.DataFrame:
    """Measured rows (source="measured", CIDEr x100) then published ones (source="published").

    Within each task/metric measured rows come first, each group best first; the two
    are never interleaved.
    """
    measured = df.copy()
    measured["metric"] = measured["metric"].map(canonical_metric)
    measured["source"] = "measured"
    scale = measured["metric"].map(DISPLAY_SCALE).fillna(1.0).astype(float)
    for col in ("value", "ci_low", "ci_high"):
        measured[col] = measured[col].astype(float) * scale
    measured["scale"] = scale
    measured["citation"] = ""
    measured["notes"] = [f"x{s:g} to match published {m}" if s != 1 else ""
                         for s, m in zip(scale, measured["metric"])]
    parts = [measured]
    if baselines:
        pub = load_baselines(baselines_path).rename(columns={"source": "citation"})
        pub["source"] = "published"
        pub["scale"] = 1.0
        pub["run"] = ""
        pub["ci_low"] = math.nan
        pub["ci_high"] = math.nan
        parts.append(pub)
    out = pd.concat([p for p in parts if not p.empty] or [measured], ignore_index=True)
    lead = ["source", "model", "run", "task", "metric", "value", "ci_low", "ci_high", "n"]
    out = out[[c for c in lead if c in out] + [c for c in out.columns if c not in lead]]
    for c in ("task", "metric", "run", "model"):
        out[c] = out[c].fillna("").astype(str)
    out["_src"] = (out["source"] != "measured").astype(int)
    out["_key"] = [v if lower_is_better(m) else -v for v, m in zip(out["value"], out["metric"])]
    out = out.sort_values(["task", "metric", "_src", "_key"], kind="stable", na_position="last")
    return out.drop(columns=["_src", "_key"]).reset_index(drop=True)


def entry_label(row: pd.Series) -> str:
    """What a leaderboard row is called: the model, and the run it came from when measured."""
    if row.get("source") == "measured" and row.get("run") and row.get("run") != row.get("model"):
        return f"{row['model']} [{row['run']}]" if row.get("model") else str(row["run"])
    return str(row.get("model") or row.get("run") or "")


def pivot(lb: pd.DataFrame) -> pd.DataFrame:
    """source x entry rows, one "task / metric" column each; measured rows above published."""
    if lb.empty:
        return pd.DataFrame()
    t = lb.assign(entry=lb.apply(entry_label, axis=1), column=lb["task"] + " / " + lb["metric"])
    p = t.pivot_table(index=["source", "entry"], columns="column", values="value", aggfunc="first", sort=False)
    order = {"measured": 0, "published": 1}
    p = p.iloc[sorted(range(len(p)), key=lambda i: order.get(p.index[i][0], 2))]
    p.columns.name = None
    return p


# ---------------------------------------------------------------- writers

def fmt(v: Any) -> str:
    """A number for a table cell: 4 significant digits, no scientific notation below 1e6."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def fmt_ci(lo: Any, hi: Any) -> str:
    if fmt(lo) == "" or fmt(hi) == "":
        return ""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def display_table(lb: pd.DataFrame) -> pd.DataFrame:
    """The long table with formatted numbers, for Markdown and HTML."""
    rows = [{
        "source": r["source"], "model": r.get("model", ""), "run": r.get("run", ""),
        "task": r["task"], "metric": r["metric"], "value": fmt(r["value"]),
        "95% CI": fmt_ci(r.get("ci_low"), r.get("ci_high")), "n": fmt(r.get("n")),
        "notes": "; ".join(x for x in (str(r.get("notes") or ""), str(r.get("citation") or "")) if x),
    } for _, r in lb.iterrows()]
    return pd.DataFrame(rows, columns=["source", "model", "run", "task", "metric", "value", "95% CI", "n", "notes"])


def to_markdown(lb: pd.DataFrame) -> str:
    def md(df: pd.DataFrame, **kw: Any) -> str:
        return df.to_markdown(**kw) if not df.empty else "_(none)_"

    p = pivot(lb)
    piv = p.map(fmt).reset_index() if not p.empty else p
    parts = ["# Leaderboard", "",
             "Measured rows come from the run folders; published rows are copied from papers "
             "(reports/baselines.csv) and were not measured here. Measured CIDEr is shown x100 "
             "(the papers' scale).", "", md(piv, index=False), ""]
    table = display_table(lb)
    for source in ("measured", "published"):
        sub = table[table["source"] == source].drop(columns=["source"])
        if source == "published":
            sub = sub.drop(columns=["run", "95% CI", "n"])
        parts += [f"## {source.capitalize()}", "", md(sub, index=False), ""]
    return "\n".join(parts)


def write_leaderboard(lb: pd.DataFrame, out_dir: Path, formats: Iterable[str] = ("csv", "md", "html")) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in formats:
        path = out_dir / f"leaderboard.{f}"
        if f == "csv":
            lb.to_csv(path, index=False)
        elif f == "md":
            path.write_text(to_markdown(lb), encoding="utf-8")
        elif f == "html":
            from reports.html import render_leaderboard_html  # html imports this module
            path.write_text(render_leaderboard_html(lb), encoding="utf-8")
        else:
            raise ValueError(f"unknown leaderboard format {f!r} (csv, md, html)")
        written.append(path)
    return written
