"""`cm3eval bench sampler | retrieval | metrics`: speed, measured side by side with references.

The command functions belong to the benchmark modules in evals/bench/ (each owned with the code
it measures); this module groups them under `bench`.
"""

from __future__ import annotations

import typer

from evals.bench.retrieval import command as retrieval
from evals.bench.metrics import command as metrics
from evals.bench.sampler import command as sampler

bench_app = typer.Typer(help="Speed benchmarks, measured side by side with references.", no_args_is_help=True)
bench_app.command("sampler")(sampler)
bench_app.command("retrieval")(retrieval)
bench_app.command("metrics")(metrics)
