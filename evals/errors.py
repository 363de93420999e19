"""How a user-facing error leaves a command: THE one place a Cm3evalError becomes one line.

`OneLineErrors` is the typer group class of the root app and of every sub-app that is also
invoked on its own (tests drive `bank_app`, `score_app` and the reports commands directly), so
the message and the exit code are the same whichever app runs the command. `exit_with` is the
same conversion for code that catches a non-Cm3evalError (a library's ValueError) and must
report it as bad input.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from cm3leon.errors import Cm3evalError


def one_line(e: BaseException) -> str:
    """The error's message folded onto one line (or its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def exit_with(e: BaseException, code: int | None = None) -> NoReturn:
    """`error: MESSAGE` on stderr, then exit with `code` (default: the error's exit_code, else 2)."""
    typer.echo(f"error: {one_line(e)}", err=True)
    raise typer.Exit(code if code is not None else int(getattr(e, "exit_code", 2))) from None


class OneLineErrors(TyperGroup):
    """A typer group whose commands' Cm3evalErrors end as one line and the error's exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Cm3evalError as e:
            exit_with(e)
