"""`python -m evals.cli ...` runs the command line (same as the `cm3eval` script)."""

from evals.cli import cli

cli()
