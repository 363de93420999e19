"""Self-contained HTML: the report of one run, and the leaderboard page.

Self-contained means one file that opens anywhere: inline CSS, inline SVG plots, images as
base64 data URIs (downscaled to a cap), no scripts. Everything that came from a run folder
or a command line (captions, answers, task names, file names, errors) passes through
`esc` before it reaches the page; the CSP meta tag forbids scripts as a second fence.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shlex
from html import escape
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from PIL import Image

from reports.leaderboard import (
    collect_runs, display_table, find_sweeps, fmt, fmt_ci, leaderboard, load_metrics, load_samples,
    load_task_config, lower_is_better, pivot, flatten,
)
from reports.svg import Point, Series, line_chart

DEFAULT_MAX_SAMPLES = 24
DEFAULT_IMAGE_MAX_SIDE = 256  # px; larger images are downscaled before embedding
MIN_DISPLAY_SIDE = 128  # tiny demo images are enlarged (nearest) so they are visible
MAX_PIXELS = 64_000_000  # larger files are listed as unreadable, not decoded
MAX_TEXT = 2000  # characters of a prompt / prediction shown; the rest is cut

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
 padding:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;
 padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #d8d8d8;padding:3px 8px;
 text-align:left;vertical-align:top}th{background:#f3f3f5}td.num{text-align:right;
 font-variant-numeric:tabular-nums}tr.published td{background:#f7f7fb;color:#555;font-style:italic}
.meta td:first-child{font-weight:600;white-space:nowrap}.muted{color:#777}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{border:1px solid #e4e4e4;background:#fff}svg .grid{stroke:#eee}svg .axis{stroke:#444}
svg .tick{font-size:11px;fill:#444}svg .label{font-size:12px;fill:#222}svg .legend{font-size:11px;fill:#222}
svg .chart-title{font-size:13px;font-weight:600;fill:#111}svg .errbar{stroke-width:1.2}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:8px 0;background:#fcfcfc}
.sample.failed{border-color:#d33;background:#fff6f6}
.sample-head{font-size:12px;color:#555;margin-bottom:4px}.sample-head .sid{font-weight:600;color:#222}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;display:inline-block;text-align:center;font-size:11px;color:#555}
figure img{width:128px;height:128px;object-fit:contain;display:block;border:2px solid transparent;
 background:#eee}figure.winner img{border-color:#0a8f3c}figure.winner figcaption{color:#0a8f3c;font-weight:600}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;
 background:#f2f2f2;color:#a00;font-size:11px;text-align:center;word-break:break-all;padding:4px;
 box-sizing:border-box}
.text{white-space:pre-wrap;word-break:break-word}.field{margin:2px 0}.field b{color:#333}
.ok{color:#0a7a34;font-weight:600}.bad{color:#c01818;font-weight:600}.partial{color:#a66300;font-weight:600}
ul.refs{margin:2px 0 2px 18px;padding:0}ul.refs li.match{color:#0a7a34;font-weight:600}
.failure{color:#c01818;white-space:pre-wrap}ul.failures li{margin:2px 0}
nav a{margin-right:12px}
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(x: Any) -> str:
    """Text for HTML body or attribute values (quotes escaped too)."""
    return escape("" if x is None else str(x), quote=True)


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, no `<!--`, no `&` entity games."""
    text = json.dumps(obj, ensure_ascii=False, default=str, sort_keys=True)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _cut(text: Any, limit: int = MAX_TEXT) -> str:
    s = "" if text is None else (text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, default=str))
    return s if len(s) <= limit else s[:limit] + f" … [{len(s) - limit} more characters]"


def _page(title: str, body: str, data: Any = None) -> str:
    blob = (f'<script type="application/json" id="cm3eval-data">{script_json(data)}</script>\n'
            if data is not None else "")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n{blob}</body></html>\n")


def _table(headers: list[str] | None, rows: list[list[Any]], row_classes: list[str] | None = None,
           num_cols: set[int] = frozenset(), cls: str = "") -> str:
    head = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{esc(c)}</td>' if j in num_cols else f"<td>{esc(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    klass = f' class="{esc(cls)}"' if cls else ""
    return f"<table{klass}>{head}<tbody>{''.join(body)}</tbody></table>"


# ---------------------------------------------------------------- images

class ImageEmbedder:
    """Turns image paths from sample lines into data-URI <img> tags.

    Paths must resolve inside the run folder: a sample file cannot pull /etc or a
    neighbour's files into a report. Every image is decoded and re-encoded as PNG, so
    what is embedded is an image of bounded size, whatever the file held.
    """

    def __init__(self, run_dir: Path, max_side: int = DEFAULT_IMAGE_MAX_SIDE):
        self.root = Path(run_dir).resolve()
        self.max_side = max_side
        self._cache: dict[Path, str | None] = {}

    def resolve(self, rel: Any, base: Path) -> Path | None:
        if not isinstance(rel, str) or not rel:
            return None
        for folder in (base, self.root):
            p = (folder / rel).resolve()
            if p.is_relative_to(self.root) and p.is_file():
                return p
        return None

    def data_uri(self, path: Path) -> str | None:
        if path not in self._cache:
            try:
                with Image.open(path) as im:
                    if im.width * im.height > MAX_PIXELS:  # decoding it would cost gigabytes
                        raise ValueError("image too large")
                    im.draft("RGB", (self.max_side, self.max_side))  # JPEG: decode at reduced size
                    im.load()
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                    im.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
                    side = max(im.size)
                    if side < MIN_DISPLAY_SIDE:
                        f = -(-MIN_DISPLAY_SIDE // side)
                        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
                    buf = io.BytesIO()
                    im.save(buf, "PNG")
                self._cache[path] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                self._cache[path] = None
        return self._cache[path]

    def figure(self, rel: Any, base: Path, caption: str = "", cls: str = "") -> str:
        path = self.resolve(rel, base)
        uri = self.data_uri(path) if path else None
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        klass = f' class="{esc(cls)}"' if cls else ""
        if uri is None:
            why = "unreadable image" if path else "missing image"
            return f'<figure{klass}><div class="missing">{why}: {esc(rel)}</div>{cap}</figure>'
        return f'<figure{klass}><img src="{uri}" alt="{esc(caption or rel)}" title="{esc(rel)}">{cap}</figure>'


# ---------------------------------------------------------------- samples

_EDIT_ORDER = ["source", "input", "generated", "output", "prediction", "edited", "target"]


def _images(s: dict[str, Any]) -> dict[str, Any]:
    imgs = s.get("images")
    return imgs if isinstance(imgs, dict) else {}


def _image_row(s: dict[str, Any], emb: ImageEmbedder, base: Path, order: list[str] = ()) -> str:
    imgs = _images(s)
    roles = [r for r in order if r in imgs] + [r for r in imgs if r not in order]
    return "".join(emb.figure(imgs[r], base, caption=str(r)) for r in roles)


def _field(label: str, value: Any, cls: str = "text") -> str:
    return f'<div class="field"><b>{esc(label)}</b> <span class="{cls}">{esc(_cut(value))}</span></div>'


def _ref_text(r: Any) -> str:
    if isinstance(r, dict):
        for k in ("answer", "caption", "text"):
            if k in r:
                return str(r[k])
    return r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, default=str)


def _refs(s: dict[str, Any]) -> list[str]:
    refs = s.get("references")
    if refs is None:
        return []
    return [_ref_text(r) for r in (refs if isinstance(refs, list) else [refs])]


def _norm(a: str) -> str:
    return " ".join(a.lower().strip().rstrip(".").split())


def _vqa_accuracy(s: dict[str, Any]) -> tuple[float | None, bool]:
    """(accuracy in [0,1], estimated?) from per_sample when the metric wrote it, else
    min(1, exact matches / 3) over the references as a rough stand-in."""
    per = s.get("per_sample") if isinstance(s.get("per_sample"), dict) else {}
    for k, v in per.items():
        if "acc" in str(k).lower() and isinstance(v, (int, float)) and math.isfinite(v):
            return (v / 100.0 if v > 1 else float(v)), False
    refs = _refs(s)
    if not refs or s.get("prediction") is None:
        return None, True
    pred = _norm(str(s.get("prediction")))
    return min(1.0, sum(_norm(r) == pred for r in refs) / 3.0), True


def _body_t2i(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    out = [_field("prompt", s.get("prompt"))]
    cands = s.get("candidates") if isinstance(s.get("candidates"), list) else []
    scores = s.get("scores") if isinstance(s.get("scores"), list) else []
    best = s.get("best")
    figs = []
    for i, c in enumerate(cands):
        cap = f"#{i}"
        if i < len(scores) and isinstance(scores[i], (int, float)):
            cap += f" · {fmt(scores[i])}"
        winner = len(cands) > 1 and best == i
        figs.append(emb.figure(c, base, caption=cap + (" ★ reranked best" if winner else ""),
                               cls="winner" if winner else ""))
    if not cands:
        figs.append(_image_row(s, emb, base, ["generated", "output"]))
    else:
        figs.append(_image_row(s, emb, base))  # e.g. a reference image beside the candidates
    out.append(f'<div class="row">{"".join(figs)}</div>')
    return "".join(out)


def _body_caption(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    refs = "".join(f"<li>{esc(_cut(r, 500))}</li>" for r in _refs(s))
    return (f'<div class="row">{_image_row(s, emb, base, ["image", "source"])}<div>'
            f'{_field("prediction", s.get("prediction"))}'
            f'<div class="field"><b>references</b><ul class="refs">{refs}</ul></div></div></div>')


def _body_vqa(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    acc, estimated = _vqa_accuracy(s)
    if acc is None:
        badge = ""
    else:
        cls, word = ("ok", "correct") if acc >= 0.999 else (("bad", "incorrect") if acc <= 0 else ("partial", "partly correct"))
        badge = f' <span class="{cls}">{word} ({acc * 100:.0f}%{", estimated" if estimated else ""})</span>'
    pred = _norm(str(s.get("prediction") or ""))
    refs = "".join(f'<li class="match">{esc(r)} ✓</li>' if _norm(r) == pred and pred else f"<li>{esc(r)}</li>"
                   for r in _refs(s))
    return (f'<div class="row">{_image_row(s, emb, base, ["image"])}<div>'
            f'{_field("question", s.get("prompt"))}'
            f'<div class="field"><b>answer</b> <span class="text">{esc(_cut(s.get("prediction")))}</span>{badge}</div>'
            f'<div class="field"><b>ground-truth answers</b><ul class="refs">{refs}</ul></div></div></div>')


def _body_edit(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    extra = _field("prediction", s.get("prediction")) if s.get("prediction") else ""
    return (_field("instruction", s.get("prompt")) + extra +
            f'<div class="row">{_image_row(s, emb, base, _EDIT_ORDER)}</div>')


def _body_other(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    refs = "".join(f"<li>{esc(_cut(r, 500))}</li>" for r in _refs(s))
    return (_field("prompt", s.get("prompt")) + _field("prediction", s.get("prediction")) +
            (f'<div class="field"><b>references</b><ul class="refs">{refs}</ul></div>' if refs else "") +
            f'<div class="row">{_image_row(s, emb, base)}</div>')


_BODIES: dict[str, Callable[[dict[str, Any], ImageEmbedder, Path], str]] = {
    "t2i": _body_t2i, "caption": _body_caption, "vqa": _body_vqa, "edit": _body_edit,
}


def _retrieved(s: dict[str, Any]) -> str:
    docs = s.get("retrieved")
    if not isinstance(docs, list) or not docs:
        return ""
    items = "".join(f"<li>{esc(_cut(_ref_text(d), 300))}</li>" for d in docs)
    return f"<details><summary>retrieved documents ({len(docs)})</summary><ul>{items}</ul></details>"


def sample_card(s: dict[str, Any], emb: ImageEmbedder, base: Path) -> str:
    kind = str(s.get("kind") or "")
    per = s.get("per_sample") if isinstance(s.get("per_sample"), dict) else {}
    scores = " · ".join(f"{k} {fmt(v)}" for k, v in per.items())
    failure = s.get("failure")
    head = (f'<div class="sample-head"><span class="sid">#{esc(s.get("index"))} {esc(s.get("id"))}</span>'
            f' · {esc(kind or "?")} · seed {esc(s.get("seed"))}{" · " + esc(scores) if scores else ""}</div>')
    body = _BODIES.get(kind, _body_other)(s, emb, base)
    fail = f'<div class="failure">failed: {esc(_cut(failure, 1000))}</div>' if failure else ""
    return f'<article class="sample{" failed" if failure else ""}">{head}{fail}{body}{_retrieved(s)}</article>'


def _score_metric(samples: list[dict[str, Any]], metric_order: list[str]) -> str | None:
    """The per-sample score used for best/worst: the task's first metric that has one."""
    seen: list[str] = []
    for s in samples:
        per = s.get("per_sample")
        if isinstance(per, dict):
            seen += [k for k, v in per.items() if k not in seen and isinstance(v, (int, float))]
    for m in metric_order:
        if m in seen:
            return m
    return seen[0] if seen else None


def _best_worst(samples: list[dict[str, Any]], metric: str, k: int) -> tuple[list, list]:
    scored = [s for s in samples if isinstance((s.get("per_sample") or {}).get(metric), (int, float))
              and math.isfinite(s["per_sample"][metric]) and not s.get("failure")]
    if len(scored) < 2:
        return [], []
    ranked = sorted(scored, key=lambda s: s["per_sample"][metric], reverse=not lower_is_better(metric))
    k = min(k, len(ranked) // 2)
    return ranked[:k], ranked[::-1][:k]


# ---------------------------------------------------------------- metrics and plots

def _metrics_rows(df: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    headers = ["task", "metric", "value", "95% CI", "n", "better"]
    rows = [[r["task"], r["metric"], fmt(r["value"]), fmt_ci(r["ci_low"], r["ci_high"]), fmt(r["n"]),
             "lower" if lower_is_better(r["metric"]) else "higher"] for _, r in df.iterrows()]
    return headers, rows


def plots_html(df: pd.DataFrame) -> str:
    charts = []
    for sw in find_sweeps(df):
        series = []
        for label, rows in sw.series:
            pts = [Point(float(r["_x"]), float(r["value"]),
                         None if pd.isna(r["ci_low"]) else float(r["ci_low"]),
                         None if pd.isna(r["ci_high"]) else float(r["ci_high"]),
                         tip=f"{r['run']} {r['task']}: {sw.axis}={r['_x']:g} → {sw.metric} {fmt(r['value'])}")
                   for _, r in rows.iterrows()]
            series.append(Series(label, pts))
        scale = float(sw.series[0][1]["scale"].iloc[0]) if "scale" in sw.series[0][1] else 1.0
        y_label = sw.metric + (f" (x{scale:g})" if scale != 1 else "") + \
            (" ↓ better" if lower_is_better(sw.metric) else " ↑ better")
        charts.append(line_chart(series, title=f"{sw.task}: {sw.metric} vs {sw.axis}",
                                 x_label=sw.axis, y_label=y_label))
    if not charts:
        return ""
    return f'<h2 id="plots">Sweeps</h2><div class="plots">{"".join(charts)}</div>'


# ---------------------------------------------------------------- run report

def _slug(text: str, i: int) -> str:
    return f"task-{i}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:40]


def render_run_report(run_dir: Path | str, *, max_samples: int = DEFAULT_MAX_SAMPLES, n_extremes: int = 3,
                      image_max_side: int = DEFAULT_IMAGE_MAX_SIDE) -> str:
    run_dir = Path(run_dir)
    data = load_metrics(run_dir)
    df = collect_runs([run_dir])
    run = data.get("run") or {}
    emb = ImageEmbedder(run_dir, image_max_side)
    title = f"cm3eval report: {run_dir.resolve().name}"

    meta = [["run folder", str(run_dir)]]
    if not df.empty:
        r0 = df.iloc[0]
        meta += [["model", r0["model"]], ["checkpoint", r0["checkpoint"]], ["step", fmt(r0["step"])]]
    argv = run.get("argv")
    meta += [["model fingerprint", run.get("model_fingerprint")], ["created", run.get("created")],
             ["git hash", run.get("git_hash")],
             ["command", shlex.join(map(str, argv)) if isinstance(argv, list) else argv],
             ["versions", ", ".join(f"{k} {v}" for k, v in run["versions"].items())
              if isinstance(run.get("versions"), dict) else run.get("versions")]]
    meta = [[k, "" if v is None else v] for k, v in meta if v not in (None, "")]

    tasks = list(data["tasks"])
    nav = " ".join(f'<a href="#{esc(_slug(t, i))}">{esc(t)}</a>' for i, t in enumerate(tasks))
    parts = [f"<h1>{esc(title)}</h1>", _table(None, meta, cls="meta"),
             f"<nav>{nav}</nav>" if nav else ""]
    headers, rows = _metrics_rows(df)
    parts += ['<h2 id="metrics">Metrics</h2>',
              _table(headers, rows, num_cols={2, 4}) if rows else '<p class="muted">No metrics.</p>',
              plots_html(df)]

    for i, task in enumerate(tasks):
        entry = data["tasks"][task]
        task_dir = run_dir / task
        cfg = load_task_config(run_dir, task) or {}
        samples = load_samples(run_dir, task)
        parts.append(f'<h2 id="{esc(_slug(task, i))}">Task: {esc(task)}</h2>')
        over = flatten(cfg["overrides"]) if isinstance(cfg.get("overrides"), dict) else {}
        info = [["samples", f"{len(samples)} written, {fmt(entry.get('n_samples'))} in metrics.json"],
                ["settings hash", entry.get("config_hash") or cfg.get("hash") or ""]]
        info += [[f"override {k}", json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v]
                 for k, v in over.items()]
        parts.append(_table(None, info, cls="meta"))
        sub = df[df["task"] == task] if not df.empty else df
        if not sub.empty:
            h, r = _metrics_rows(sub)
            parts.append(_table(h[1:], [x[1:] for x in r], num_cols={1, 3}))

        # Failures: metrics.json's list plus samples that carry a failure, once per id.
        fails: dict[str, str] = {}
        for f in entry.get("failures") or []:
            if isinstance(f, dict):
                fails.setdefault(str(f.get("id")), str(f.get("error")))
        for s in samples:
            if s.get("failure"):
                fails.setdefault(str(s.get("id")), str(s["failure"]))
        if fails:
            items = list(fails.items())
            lis = "".join(f"<li><code>{esc(k)}</code>: <span class=\"failure\">{esc(_cut(v, 500))}</span></li>"
                          for k, v in items[:50])
            more = f"<li>… and {len(items) - 50} more</li>" if len(items) > 50 else ""
            parts.append(f'<h3>Failures ({len(items)})</h3><ul class="failures">{lis}{more}</ul>')

        metric = _score_metric(samples, list((entry.get("metrics") or {}).keys()))
        if metric and n_extremes > 0:
            best, worst = _best_worst(samples, metric, n_extremes)
            if best:
                way = "lowest" if lower_is_better(metric) else "highest"
                parts.append(f"<h3>Best samples by {esc(metric)} ({way} first)</h3>"
                             + "".join(sample_card(s, emb, task_dir) for s in best))
                parts.append(f"<h3>Worst samples by {esc(metric)}</h3>"
                             + "".join(sample_card(s, emb, task_dir) for s in worst))

        shown = samples[:max(0, max_samples)]
        parts.append(f"<h3>Samples (showing {len(shown)} of {len(samples)})</h3>")
        parts += [sample_card(s, emb, task_dir) for s in shown]
        if not samples:
            parts.append('<p class="muted">No sample files.</p>')
    return _page(title, "\n".join(parts), data=data)


def write_run_report(run_dir: Path | str, **kwargs: Any) -> Path:
    """Writes RUN/report.html and returns its path."""
    path = Path(run_dir) / "report.html"
    html = render_run_report(run_dir, **kwargs)
    path.write_text(html, encoding="utf-8")
    return path


# ---------------------------------------------------------------- leaderboard page

def render_leaderboard_html(lb: pd.DataFrame) -> str:
    """The leaderboard() table (or a collect_runs() frame) as a page: pivot, plots, long tables."""
    if "source" not in lb.columns:
        lb = leaderboard(lb, baselines=False)
    parts = ["<h1>cm3eval leaderboard</h1>",
             '<p class="muted">Measured rows come from run folders; published rows (shaded) are copied from '
             "papers (reports/baselines.csv) and were not measured here. Measured CIDEr is shown x100, "
             "the papers' scale.</p>"]
    p = pivot(lb)
    if not p.empty:
        rows = [[src, entry, *[fmt(v) for v in vals]] for (src, entry), vals in zip(p.index, p.values.tolist())]
        parts += ['<h2 id="overview">Overview</h2>',
                  _table(["source", "model", *p.columns], rows,
                         row_classes=[r[0] for r in rows], num_cols=set(range(2, 2 + len(p.columns))))]
    parts.append(plots_html(lb))
    table = display_table(lb)
    for source in ("measured", "published"):
        sub = table[table["source"] == source]
        if sub.empty:
            continue
        cols = [c for c in sub.columns if c != "source" and not (source == "published" and c in ("run", "95% CI", "n"))]
        parts += [f'<h2 id="{source}">{source.capitalize()}</h2>',
                  _table(cols, sub[cols].values.tolist(), row_classes=[source] * len(sub),
                         num_cols={cols.index("value")})]
    data = json.loads(lb.to_json(orient="records"))
    return _page("cm3eval leaderboard", "\n".join(parts), data=data)
