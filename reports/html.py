"""Self-contained HTML pages from Jinja2 templates (reports/templates/, autoescaped).

Self-contained: one file that opens anywhere, with inline CSS, inline SVG plots and images
as base64 data URIs (downscaled to a cap). Everything that came from a run folder or a
command line reaches the page through the template engine's autoescaping; the data block
is JSON escaped for a <script> element (`tojson`). A strict Content-Security-Policy allows
exactly the page's own inline style and script, by their sha256 hashes, and images from
data: URIs; nothing else (no network, no other script).

This module renders; it never reads a run folder except through reports.rundata, and it
does not import reports.leaderboard (the leaderboard page's view is built by publish.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

from markupsafe import Markup

from evals import runs
from evals.provenance import flatten  # the one dotted-key flattening (config diffs use it too)
from reports import protocol
from reports.baselines import deviations, load_baselines
from reports.format import direction_word, family, finite, fmt, fmt_ci, metric_label, recorded_direction
from evals.records import REPORT_SAMPLES
from reports.images import DEFAULT_IMAGE_MAX_SIDE, ImageEmbedder
from reports.runtable import collect_runs, find_sweeps
from reports.samples import SampleView, build_card, card_factors
from reports.rundata import load_metrics, load_samples, load_task_config
from reports.svg import Chart, Point, Series, line_chart

TEMPLATES = Path(__file__).with_name("templates")
DEFAULT_MAX_SAMPLES = REPORT_SAMPLES  # the samples whose reference, candidates and documents were saved
MAX_FAILURES_SHOWN = 50


@lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _asset(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def csp(css: str, script: str | None) -> str:
    """Only this page's own style and script (by hash), images from data: URIs, nothing else."""
    scripts = _sha256(script) if script else "'none'"
    return (f"default-src 'none'; img-src data:; style-src {_sha256(css)}; script-src {scripts}; "
            "base-uri 'none'; form-action 'none'")


def _tab_rules(n: int) -> str:
    """CSS that shows panel i while tab i's radio is checked (tabs work without script)."""
    return "".join(f"#tab-{i}:checked~#panel-{i}{{display:block}}"
                   f"#tab-{i}:checked~.tab-labels label[for=tab-{i}]{{background:#fff;font-weight:600}}"
                   for i in range(n))


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: what the templates' `tojson` writes (< > & ' as \\u escapes)."""
    from jinja2.utils import htmlsafe_json_dumps

    return str(htmlsafe_json_dumps(_json_safe(obj), sort_keys=True))


def render_page(template: str, *, title: str, data: Any = None, script: bool = False, n_tabs: int = 0,
                **context: Any) -> str:
    css = _asset("report.css") + _tab_rules(n_tabs)
    js = _asset("report.js") if script else None
    return environment().get_template(template).render(
        title=title, csp=csp(css, js), css=Markup(css), script=Markup(js) if js else None,
        data=_json_safe(data), **context)


# ---------------------------------------------------------------- metrics tables and plots

def _metric_cells(m: dict[str, Any], name: str) -> tuple[str, str]:
    """(value, CI) on the metric family's scale; a metric that was not computed says why."""
    fam = family(name)
    v = finite(m.get("value"))
    if v is None:
        reason = (m.get("extra") or {}).get("reason") if isinstance(m.get("extra"), dict) else None
        return ("not computed" + (f": {reason}" if reason else ""), "")
    ci = m.get("ci") or [None, None]
    lo, hi = finite(ci[0]), finite(ci[1])
    scale = fam.factor
    return fmt(v * scale), fmt_ci(lo * scale if lo is not None else None, hi * scale if hi is not None else None)


def metric_families(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows grouped by metric family, each group headed by its scale (one scale per family)."""
    groups: dict[str, dict[str, Any]] = {}
    for task, entry in data["tasks"].items():
        for name, m in (entry.get("metrics") or {}).items():
            fam = family(name)
            key = fam.name.split(":")[0]  # metrics without a family share one "other: as recorded" group
            g = groups.setdefault(key, {"label": f"{key}: {fam.scale}", "rows": []})
            value, ci = _metric_cells(m, name)
            g["rows"].append([task, name, value, ci, fmt(m.get("n")), direction_word(recorded_direction(m))])
    return list(groups.values())


def _task_metric_rows(entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in (entry.get("metrics") or {}).items():
        value, ci = _metric_cells(m, name)
        rows.append([name, value, ci, fmt(m.get("n")), direction_word(recorded_direction(m)), family(name).scale])
    return rows


def breakdowns(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """VQA's per-answer-type and per-question-type accuracy tables, as metrics.json holds them."""
    tables = []
    for name, m in (entry.get("metrics") or {}).items():
        extra = m.get("extra") if isinstance(m.get("extra"), dict) else {}
        for key, label in (("per_answer_type", "answer type"), ("per_question_type", "question type")):
            per = extra.get(key)
            if isinstance(per, dict) and per:
                rows = [[str(t), fmt(v.get("value")) if isinstance(v, dict) else fmt(v),
                         fmt(v.get("n")) if isinstance(v, dict) else ""] for t, v in per.items()]
                tables.append({"title": f"{name} by {label}", "headers": [label, f"{name} ({family(name).unit or 'as recorded'})", "n"],
                               "rows": rows})
    return tables


def charts(df: Any) -> list[Chart]:
    """One line chart per sweep found in a collect_runs() / leaderboard() frame, on the metric's
    display scale (a leaderboard() frame is on it already: its `scale` column says so)."""
    out = []
    for sw in find_sweeps(df):
        factor = 1.0 if "scale" in df.columns else family(sw.metric).factor

        def y(v: Any) -> float | None:
            v = finite(v)
            return None if v is None else v * factor

        series = []
        for label, rows in sw.series:
            pts = [Point(float(r["_x"]), y(r["value"]) if y(r["value"]) is not None else math.nan, y(r["ci_low"]),
                         y(r["ci_high"]),
                         tip=f"{r['run']} {r['task']}: {sw.axis}={r['_x']:g} → {sw.metric} {fmt(y(r['value']))}")
                   for r in rows.to_dict("records")]
            series.append(Series(label, pts))
        first = sw.series[0][1]
        hib = next((h for h in first.get("higher_is_better", []) if isinstance(h, bool)), None)
        better = {True: " ↑ better", False: " ↓ better", None: ""}[hib]
        c = line_chart(series, title=f"{sw.task}: {sw.metric} vs {sw.axis}", x_label=sw.axis,
                       y_label=metric_label(sw.metric) + better)
        if c is not None:
            out.append(c)
    return out


# ---------------------------------------------------------------- the run report

def _meta_rows(run_dir: Path, data: dict[str, Any], df: Any) -> list[list[Any]]:
    run = data.get("run") or {}
    meta: list[list[Any]] = [["run folder", str(run_dir)]]
    if not df.empty:
        r0 = df.iloc[0]
        meta += [["model", r0["model"]], ["checkpoint", r0["checkpoint"]], ["step", fmt(r0["step"])]]
    versions = run.get("versions")
    meta += [["model fingerprint", run.get("model_fingerprint")], ["created", run.get("created")],
             ["git hash", run.get("git_hash")],
             ["versions", ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict)
              else versions]]
    return [[k, v] for k, v in meta if v not in (None, "")]


def _commands(run: dict[str, Any]) -> list[str]:
    """Every command line that built the run (metrics.json run.commands; run.argv when older)."""
    cmds = run.get("commands") if isinstance(run.get("commands"), list) else [run.get("argv")]
    return [shlex.join(map(str, c)) if isinstance(c, list) else str(c) for c in cmds if c]


def protocol_deviations(df: Any) -> list[tuple[str, list[str]]]:
    """(task, what departs from the published protocol or is incomplete) for the run's tasks:
    the same checks the leaderboard marks rows with (reports.baselines), and the task's status."""
    try:
        published = load_baselines(with_protocol=True)
    except Exception:  # noqa: BLE001 - a broken baselines file must not cost the report
        published = None
    out: dict[str, list[str]] = {}
    for r in df.to_dict("records"):
        items = out.setdefault(str(r["task"]), [])
        found = deviations(r, published) if published is not None and r["metric"] else []
        if r.get("status") not in (None, "complete"):
            found = [f"{r['status']}: {r.get('status_note')}"] + found
        items += [x for x in found if x not in items]
    return [(t, items) for t, items in out.items() if items]


def _no_metrics_reason(entry: dict[str, Any]) -> str:
    """Why a task has no metrics, as metrics.json recorded it (never a bare "No metrics.")."""
    if entry.get("metrics"):
        return ""
    reasons = [f"{k}: {why}" for k, why in _missing(entry)]
    reasons += [str(x) for x in entry.get("notes") or [] if x and not any(str(x) in r for r in reasons)]
    for key in ("reason", "metrics_error", "error"):
        if entry.get(key):
            reasons.append(str(entry[key]))
    return "; ".join(reasons) or "metrics.json records no metric and no reason for this task"


def _missing(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """Requested metrics that produced no number, with the reason the engine recorded."""
    missing = entry.get("missing_metrics")
    return [(str(k), str(v)) for k, v in missing.items()] if isinstance(missing, dict) else []


def _failures(entry: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, str]:
    """metrics.json's failure list plus samples that carry a failure, once per id."""
    fails: dict[str, str] = {}
    for f in entry.get("failures") or []:
        if isinstance(f, dict):
            fails.setdefault(str(f.get("id")), str(f.get("error")))
    for s in samples:
        if s.get("failure"):
            fails.setdefault(str(s.get("id")), str(s["failure"]))
    return fails


def _extremes(entry: dict[str, Any], samples: list[dict[str, Any]], k: int
              ) -> tuple[list[tuple[str, list[dict[str, Any]]]], str]:
    """Best and worst samples by the task's first metric with per-sample scores, in the
    direction metrics.json records; none (and a note) when it records none."""
    metric = next((m for m in (entry.get("metrics") or {}) if any(
        finite((s.get("per_sample") or {}).get(m)) is not None for s in samples)), None)
    if metric is None or k <= 0:
        return [], ""
    hib = recorded_direction(entry["metrics"][metric])
    if hib is None:
        return [], f"No best/worst samples: metrics.json does not record whether higher {metric} is better."
    scored = [s for s in samples
              if not s.get("failure") and finite((s.get("per_sample") or {}).get(metric)) is not None]
    if len(scored) < 2:
        return [], ""
    ranked = sorted(scored, key=lambda s: float(s["per_sample"][metric]), reverse=hib)
    k = min(k, len(ranked) // 2)
    way = "highest" if hib else "lowest"
    return [(f"Best samples by {metric} ({way} first)", ranked[:k]),
            (f"Worst samples by {metric}", ranked[::-1][:k])], ""


def _task_view(run_dir: Path, i: int, task: str, entry: dict[str, Any], emb: ImageEmbedder, max_samples: int,
               n_extremes: int) -> dict[str, Any]:
    task_dir = run_dir / task
    cfg = load_task_config(run_dir, task) or {}
    samples = load_samples(run_dir, task)
    factors = card_factors(entry, samples)
    info = [["samples", f"{len(samples)} written, {fmt(entry.get('n_samples'))} in metrics.json"],
            ["settings hash", entry.get("config_hash") or cfg.get("hash") or ""],
            ["protocol", ", ".join(f"{k} {v}" for k, v in protocol.manifest(entry, cfg).items()
                                   if k in ("task version", "split", "n", "candidates", "k", "shots", "resolution"))]]
    overrides = cfg.get("overrides") if isinstance(cfg.get("overrides"), dict) else {}
    info += [[f"override {k}", v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)]
             for k, v in flatten(overrides).items()]
    shown = samples[:max(0, max_samples)]
    built: dict[str, SampleView] = {}

    def card(s: dict[str, Any]) -> SampleView:  # only the samples shown get images decoded
        key = str(s["id"])
        if key not in built:
            built[key] = build_card(s, emb, task_dir, factors)
        return built[key]

    extremes, note = _extremes(entry, samples, n_extremes)
    fails = _failures(entry, samples)
    hib = {m: recorded_direction(v) for m, v in (entry.get("metrics") or {}).items()}
    sort_metrics = [(m, f"{m} ({direction_word(hib.get(m))} is better)" if hib.get(m) is not None else m)
                    for m in factors]
    return {"name": task, "slug": f"task-{i}", "info": info,
            "metric_headers": ["metric", "value", "95% CI", "n", "better", "scale"],
            "metric_rows": _task_metric_rows(entry), "no_metrics": _no_metrics_reason(entry),
            "breakdowns": breakdowns(entry),
            "not_computed": _missing(entry) if entry.get("metrics") else [],
            "failures": list(fails.items())[:MAX_FAILURES_SHOWN], "n_failures": len(fails),
            "extremes": [(h, [card(s) for s in group]) for h, group in extremes], "extremes_note": note,
            "cards": [card(s) for s in shown],
            "n_samples": len(samples), "sort_metrics": sort_metrics}


def render_run_report(run_dir: Path | str, *, max_samples: int = DEFAULT_MAX_SAMPLES, n_extremes: int = 3,
                      image_max_side: int = DEFAULT_IMAGE_MAX_SIDE) -> str:
    run_dir = Path(run_dir)
    data = load_metrics(run_dir)
    df = collect_runs([run_dir])
    emb = ImageEmbedder(run_dir, image_max_side)
    tasks = [_task_view(run_dir, i, task, entry, emb, max_samples, n_extremes)
             for i, (task, entry) in enumerate(data["tasks"].items())]
    return render_page("report.html.j2", title=f"cm3eval report: {run_dir.resolve().name}", data=data,
                       script=True, n_tabs=len(tasks), meta=_meta_rows(run_dir, data, df),
                       deviations=protocol_deviations(df), commands=_commands(data.get("run") or {}),
                       metric_headers=["task", "metric", "value", "95% CI", "n", "better"],
                       metric_rows=metric_families(data), charts=charts(df), tasks=tasks)


def write_run_report(run_dir: Path | str, **kwargs: Any) -> Path:
    """Writes RUN/report.html (atomically) and returns its path."""
    path = Path(run_dir) / "report.html"
    runs.atomic_write_bytes(path, render_run_report(run_dir, **kwargs).encode("utf-8"))
    return path
