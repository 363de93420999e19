"""`cm3eval`: the roof of the package family. One typer app; each command group lives in its own
module of evals/cli/ and is mounted here with plain imports.

Start-up is part of the interface: `cm3eval --help` and usage errors answer in well under a
second, so no module imported here may import torch, pandas, numpy or the model library at
module level (commands import them inside their functions; tests/test_cli.py checks).

Errors: every `Cm3evalError` (cm3leon/errors.py) that escapes a command is turned into ONE line
`error: ...` on stderr and the exit code the error carries (2 usage or missing input, 3 a metric
that could not be computed); the root group does it, so `main()`, the console script and a
CliRunner on `app` all behave the same. Exit codes: 0 ok, 1 regression or failures over
--max-failures, 2 usage or missing input, 3 a requested metric not computed.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Sequence

import typer

from evals.cli import report
from evals.errors import OneLineErrors
from evals.cli.bank import bank_app
from evals.cli.bench import bench_app
from evals.cli.convert import convert
from evals.cli.protocol import protocol_app
from evals.cli.run import list_tasks, run, show
from evals.cli.score import score_app
from evals.cli.train import train_app

PredictorFactory = Callable[..., Any]


_RootGroup = OneLineErrors  # the root app's group (tests probe it by this name)


app = typer.Typer(cls=_RootGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Evaluate CM3leon-style models: run tasks, score result files, benchmark, report.")

app.command("run")(run)
app.command("list")(list_tasks)
app.command("show")(show)

app.command("convert")(convert)
app.add_typer(score_app, name="score")
app.add_typer(bench_app, name="bench")
app.add_typer(bank_app, name="bank")
app.add_typer(train_app, name="train")
app.add_typer(protocol_app, name="protocol")
report.mount(app)


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _one_line_warnings() -> None:
    """Warnings of the package family as `warning: ...` lines, each said once per process (the plan
    and the loader both read a checkpoint's config: a disagreeing bos id is one warning, not two)."""
    warnings.formatwarning = _format_warning
    for module in (r"cm3leon(\..*)?", r"evals(\..*)?", r"tasks(\..*)?", r"reports(\..*)?"):
        warnings.filterwarnings("once", module=module)


def main(argv: Sequence[str] | None = None, *, predictor_factory: PredictorFactory | None = None) -> int:
    """Run the command line and return its exit code (never raises SystemExit).

    `predictor_factory(model=..., device=..., batch_size=...)`: a predictor for `cm3eval run`
    instead of a cm3leon checkpoint. Tests inject a deterministic one here; the model named by
    --model is then the factory's business (no checkpoint is inspected or loaded)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _one_line_warnings()
    try:
        # standalone mode: typer formats its own usage errors (exit 2) and ends every command,
        # successful or not, with SystemExit carrying the code
        app(args=args, prog_name="cm3eval", standalone_mode=True,
            obj={"predictor_factory": predictor_factory, "argv": ["cm3eval", *args]})  # the command as given
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        typer.echo(str(e.code), err=True)  # sys.exit("message"): an error
        return 1
    return 0


def cli() -> None:
    """The console script (`cm3eval = "evals.cli:cli"` in pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
