"""The harness: tasks run on a model, scored, recorded in run folders (docs/INTERFACES.md).

`evaluate` is `cm3eval run` as a Python call (evals/cli/api.py); it is imported when called, so
`import evals.x` stays light.
"""

from __future__ import annotations

from typing import Any


def evaluate(*args: Any, **kwargs: Any) -> Any:
    """evals.cli.api.evaluate: task names, model, out, options -> Evaluation(metrics, run_dir, report)."""
    from evals.cli.api import evaluate as run

    return run(*args, **kwargs)
