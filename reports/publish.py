"""Writing the leaderboard in its formats: CSV, Markdown, LaTeX (booktabs) and HTML.

Every string cell is escaped for its format (reports.format): Markdown carries no raw HTML
or link syntax of a model or run name, LaTeX no unescaped specials, CSV no cell a
spreadsheet would run as a formula; HTML goes through the autoescaping templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from evals import runs
from reports.format import csv_cell, latex_cell, md_cell
from reports.leaderboard import TaskTable, display_table, task_tables

FORMATS = ("csv", "md", "html", "tex")
INTRO = ("One table per task. Measured rows come from the run folders; published rows are copied from papers "
         "(reports/baselines.csv) and were not measured here. Captioning metrics are shown x100 (the papers' "
         "scale), named in each column header; ↑ higher is better, ↓ lower is better. Only complete runs are "
         "ranked; partial, failed and in-progress runs are listed below them with their status.")
DAGGER = ("† measured under another protocol than the published rows beside it (fewer samples or a --limit "
          "subset, another split, resolution, number of candidates, retrieved documents, shots or decoding); "
          "see the row's notes.")


def _md_table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    if not rows:
        return "_(none)_"
    align = ["---:" if i in numeric else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _long_rows(lb: pd.DataFrame, source: str) -> tuple[list[str], list[list[Any]]]:
    table = display_table(lb)
    sub = table[table["source"] == source].drop(columns=["source"])
    if source == "published":
        sub = sub.drop(columns=["run", "95% CI", "n"])
    return list(sub.columns), sub.values.tolist()


def _has_dagger(lb: pd.DataFrame) -> bool:
    return "comparable" in lb.columns and any(v is False for v in lb["comparable"])


def to_markdown(lb: pd.DataFrame) -> str:
    parts = ["# Leaderboard", "", INTRO, ""]
    for t in task_tables(lb):
        parts += [f"## {md_cell(t.task)}", "", _md_table(t.headers, t.rows, t.numeric), ""]
    for source in ("measured", "published"):
        h, r = _long_rows(lb, source)
        parts += [f"## {source.capitalize()}", "", _md_table(h, r, {h.index("value")} if r else set()), ""]
    if _has_dagger(lb):
        parts += [DAGGER, ""]
    return "\n".join(parts)


_TEX_SYMBOLS = {"†": r"$^\dagger$", "↑": r"$\uparrow$", "↓": r"$\downarrow$"}


def _tex(x: Any) -> str:
    """A cell escaped for LaTeX, with the table's symbols (dagger, direction arrows) as math."""
    s = latex_cell(x)
    for symbol, tex in _TEX_SYMBOLS.items():
        s = s.replace(symbol, tex)
    return s


def _latex_table(headers: list[str], rows: list[list[Any]], numeric: set[int], caption: str) -> list[str]:
    spec = "".join("r" if i in numeric else "l" for i in range(len(headers)))
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_cell(caption)}}}", rf"\begin{{tabular}}{{{spec}}}",
           r"\toprule", " & ".join(_tex(h) for h in headers) + r" \\", r"\midrule"]
    out += [" & ".join(_tex(c) for c in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return out


def to_latex(lb: pd.DataFrame) -> str:
    """booktabs tables (\\usepackage{booktabs}): the overview, then measured and published rows."""
    lines = ["% cm3eval leaderboard; needs \\usepackage{booktabs}", f"% {INTRO}"]
    if _has_dagger(lb):
        lines.append(f"% {DAGGER}")
    for t in task_tables(lb):
        lines += _latex_table(t.headers, t.rows, t.numeric, f"{t.task} (measured and published)")
    for source in ("measured", "published"):
        h, r = _long_rows(lb, source)
        if r:
            lines += _latex_table(h, r, {h.index("value")}, f"{source.capitalize()} rows")
    return "\n".join(lines) + "\n"


def to_csv(lb: pd.DataFrame) -> str:
    safe = lb.copy()
    for c in safe.columns:
        if safe[c].dtype == object or str(safe[c].dtype).startswith(("string", "str")):
            safe[c] = pd.Series([csv_cell(v) for v in safe[c]], index=safe.index, dtype=object)
    return safe.to_csv(index=False)


def render_leaderboard_html(lb: pd.DataFrame) -> str:
    """The leaderboard() table (or a collect_runs() frame) as a page: a table per task, plots, long tables."""
    import json

    from reports import html
    from reports.leaderboard import leaderboard

    if "source" not in lb.columns:
        lb = leaderboard(lb, baselines=False)
    tables = [{"task": t.task, "headers": t.headers, "rows": t.rows, "classes": t.classes, "num_cols": t.numeric}
              for t in task_tables(lb)]
    parts = []
    for source in ("measured", "published"):
        h, r = _long_rows(lb, source)
        if r:
            parts.append({"source": source, "headers": h, "rows": r, "classes": [source] * len(r),
                          "num_cols": {h.index("value")}})
    data = json.loads(lb.to_json(orient="records"))
    return html.render_page("leaderboard.html.j2", title="cm3eval leaderboard", data=data, intro=INTRO,
                            tables=tables, charts=html.charts(lb), parts=parts,
                            dagger=DAGGER if _has_dagger(lb) else "")


def write_leaderboard(lb: pd.DataFrame, out_dir: Path | str, formats: Iterable[str] = ("csv", "md", "html")
                      ) -> list[Path]:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise runs.RunFolderError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    written = []
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown leaderboard format {f!r} ({', '.join(FORMATS)})")
        if f == "html":
            text = render_leaderboard_html(lb)
        else:
            text = {"csv": to_csv, "md": to_markdown, "tex": to_latex}[f](lb)
        path = out_dir / f"leaderboard.{f}"
        runs.atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
    return written
