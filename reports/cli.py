"""`cm3eval leaderboard | report | compare`: plain functions that evals/cli.py mounts."""

from __future__ import annotations

import json
import math
import webbrowser
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from reports.leaderboard import ReportError


class Format(str, Enum):
    csv = "csv"
    md = "md"
    html = "html"
    all = "all"


def _fail(e: ReportError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


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
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with a metrics.json).")],
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines",
                                            help="Add the published numbers from reports/baselines.csv.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write leaderboard.{csv,md,html} here.")] = None,
    format: Annotated[Format, typer.Option("--format", help="Which files --out writes.")] = Format.all,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Tables across runs, beside published baselines, as CSV / Markdown / HTML."""
    from reports import leaderboard as lbm

    try:
        lb = lbm.leaderboard(lbm.collect_runs(runs), baselines=baselines)
    except ReportError as e:
        _fail(e)
    if out is not None:
        formats = ["csv", "md", "html"] if format == Format.all else [format.value]
        written = lbm.write_leaderboard(lb, out, formats)
    if json_out:
        typer.echo(json.dumps(_clean(json.loads(lb.to_json(orient="records"))), indent=1))
    elif out is not None:
        for path in written:
            typer.echo(str(path))
    else:
        typer.echo(lbm.to_markdown(lb))


def report(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    max_samples: Annotated[int, typer.Option("--max-samples", min=0, help="Samples shown per task.")] = 24,
    open_: Annotated[bool, typer.Option("--open", help="Open the report in a browser.")] = False,
) -> None:
    """Write RUN/report.html (self-contained) and print its path."""
    from reports.html import write_run_report

    try:
        path = write_run_report(run, max_samples=max_samples)
    except ReportError as e:
        _fail(e)
    typer.echo(str(path))
    if open_:
        webbrowser.open(path.resolve().as_uri())


def compare(
    base: Annotated[Path, typer.Argument(help="The reference run folder.")],
    new: Annotated[Path, typer.Argument(help="The run under test.")],
    tolerance: Annotated[Optional[list[str]], typer.Option(
        "--tolerance", help="METRIC=x or TASK/METRIC=x: allowed worsening in the metric's units (default 0).")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the Markdown table here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON.")] = False,
) -> None:
    """Per-metric deltas with CIs; exit code 1 when a metric regresses beyond tolerance and noise."""
    from reports.compare import compare_runs, has_regression, parse_tolerances, to_markdown

    try:
        verdicts = compare_runs(base, new, parse_tolerances(tolerance or []))
    except ReportError as e:
        _fail(e)
    text = to_markdown(verdicts, base, new)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text, encoding="utf-8")
    if json_out:
        typer.echo(json.dumps(_clean([v.to_dict() for v in verdicts]), indent=1))
    else:
        typer.echo(text)
    raise typer.Exit(1 if has_regression(verdicts) else 0)
