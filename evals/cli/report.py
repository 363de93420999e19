"""`cm3eval leaderboard | report | compare`: the views of finished run folders.

The command functions live in reports/cli.py (the reports package owns its options and
messages); this module only mounts them, because evals/cli is the one place that imports
`reports` (the layer rule tests/test_layers.py asserts).
"""

from __future__ import annotations

import typer

from reports.cli import compare, leaderboard, report


def mount(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard)
    app.command("report")(report)
    app.command("compare")(compare)
