"""`cm3eval leaderboard | report | compare`: plain functions that evals/cli/report.py mounts.

Heavy imports (pandas, PIL, jinja2) happen inside the functions, so mounting them costs
nothing at start-up. Every error of the reports is a Cm3evalError: one line on stderr and its
exit code (2: usage or missing input). compare exits 1 when the comparison fails (a
regression, a missing metric without --allow-missing, an unknown direction).
"""

from __future__ import annotations

import json
import math
import webbrowser
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cm3leon.errors import Cm3evalError
from evals.errors import exit_with


class Format(str, Enum):
    csv = "csv"
    md = "md"
    html = "html"
    tex = "tex"
    all = "all"


_fail = exit_with  # the one conversion of an error into `error: ...` and its exit code


def _clean(x: Any) -> Any:
    """NaN/NA -> None so --json output is valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def leaderboard(
    runs: Annotated[list[Path], typer.Argument(help="Run folders; sweep parents expand to their points.")],
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines",
                                            help="Add the published numbers from reports/baselines.csv.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write leaderboard.{csv,md,html,tex} here.")] = None,
    format: Annotated[Format, typer.Option("--format", help="Which files --out writes.")] = Format.all,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Tables across runs, beside published baselines, as CSV / Markdown / HTML / LaTeX.
    Folders that are not finished runs are skipped and listed on stderr."""
    from reports import leaderboard as lbm
    from reports import publish
    from reports.errors import ReportError
    from reports.rundata import discover_runs

    try:
        found = discover_runs(runs)
        for path, why in found.skipped:
            typer.echo(f"skipped {path}: {why}", err=True)
        if not found.runs:
            raise ReportError(f"no finished run among {', '.join(map(str, runs))}")
        lb = lbm.leaderboard(lbm.collect_runs(found.runs), baselines=baselines)
        written: list[Path] = []
        if out is not None:
            formats = ["csv", "md", "html", "tex"] if format == Format.all else [format.value]
            written = publish.write_leaderboard(lb, out, formats)
    except Cm3evalError as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps(_clean(json.loads(lb.to_json(orient="records"))), indent=1))
    elif out is not None:
        for path in written:
            typer.echo(str(path))
    else:
        typer.echo(publish.to_markdown(lb))


def report(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    max_samples: Annotated[int, typer.Option("--max-samples", min=0, help="Samples shown per task.")] = 24,
    open_: Annotated[bool, typer.Option("--open", help="Open the report in a browser.")] = False,
) -> None:
    """Write RUN/report.html (self-contained) and print its path."""
    from reports.html import write_run_report

    try:
        path = write_run_report(run, max_samples=max_samples)
    except Cm3evalError as e:
        _fail(e)
    typer.echo(str(path))
    if open_:
        webbrowser.open(path.resolve().as_uri())


def compare(
    base: Annotated[Path, typer.Argument(help="The reference run folder.")],
    new: Annotated[Path, typer.Argument(help="The run under test.")],
    tolerance: Annotated[Optional[list[str]], typer.Option(
        "--tolerance", help="METRIC=x or TASK/METRIC=x: allowed worsening in the metric's units (default 0); "
                            "failures=N allows N more failed samples.")] = None,
    direction: Annotated[Optional[list[str]], typer.Option(
        "--direction", help="METRIC=higher|lower for a metric whose runs did not record higher_is_better "
                            "(a recorded direction cannot be overridden).")] = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="A metric or task missing on one side (or null/NaN) does not fail.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Compare runs measured under different protocols (the Markdown lists what differs).")] = False,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the Markdown table here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object: the overall verdict, the "
                                                          "exit code and the rows.")] = False,
) -> None:
    """Per-metric deltas with CIs (paired over shared samples when the runs share them). Exit 0: no
    regression; 1: a regression, a missing metric or an unknown direction; 2: usage, missing input,
    a metric its run's samples do not support, or runs under different protocols (without --force)."""
    from reports import compare as cm
    from reports.errors import CompareRefused

    try:
        cmp = cm.compare(base, new, cm.parse_tolerances(tolerance or []),
                         directions=cm.parse_directions(direction or []), allow_missing=allow_missing, force=force)
        text = cm.to_markdown(cmp)
        if markdown is not None:
            markdown.parent.mkdir(parents=True, exist_ok=True)
            markdown.write_text(text, encoding="utf-8")
        if cmp.refused and not json_out:
            raise CompareRefused(cm.refusal_message(cmp))
    except Cm3evalError as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps(_clean(cmp.to_json()), indent=1))
    else:
        typer.echo(text)
    if cmp.refused:
        typer.echo(f"error: {cm.refusal_message(cmp)}", err=True)
    raise typer.Exit(cmp.exit_code())
