"""`cm3eval`: one typer app; each command group lives in the module that owns it."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="Evaluate CM3leon-style models: run tasks, score result files, benchmark, report.",
                  no_args_is_help=True, add_completion=False)
score_app = typer.Typer(help="Score result files in the official formats.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed benchmarks, measured side by side with references.", no_args_is_help=True)
app.add_typer(score_app, name="score")
app.add_typer(bench_app, name="bench")

# (module, attribute, where to mount, command name). A module exposes a plain function
# (typer reads its signature) or a typer.Typer sub-app.
_COMMANDS = [
    ("evals.cli_run", "run", app, "run"),
    ("evals.cli_run", "list_tasks", app, "list"),
    ("evals.cli_run", "show", app, "show"),
    ("evals.score_text", "vqa", score_app, "vqa"),
    ("evals.score_text", "caption", score_app, "caption"),
    ("evals.score_fid", "fid", score_app, "fid"),
    ("evals.score_edit", "edit", score_app, "edit"),
    ("evals.bench_sampler", "command", bench_app, "sampler"),
    ("evals.bench_retrieval", "command", bench_app, "retrieval"),
    ("evals.bench_metrics", "command", bench_app, "metrics"),
    ("evals.bank_cli", "bank_app", app, "bank"),
    ("reports.cli", "leaderboard", app, "leaderboard"),
    ("reports.cli", "report", app, "report"),
    ("reports.cli", "compare", app, "compare"),
    ("evals.train_cli", "train_app", app, "train"),
]


def _mount() -> None:
    for module_name, attr, parent, name in _COMMANDS:
        obj = getattr(importlib.import_module(module_name), attr)
        if isinstance(obj, typer.Typer):
            parent.add_typer(obj, name=name)
        else:
            parent.command(name)(obj)


_mount()

if __name__ == "__main__":
    app()
