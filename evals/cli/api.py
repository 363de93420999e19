"""`evals.evaluate`: `cm3eval run` as a Python call.

The same path as the command line: the plan (evals/plan.py: every setting, file and capability
checked before the model loads), the engine (`run_plans`: resumable run folders), then the views
(report.html, a leaderboard across sweep points). It returns the metrics as metrics.json holds
them (raw values; reports.format.family says how each is shown) and the run folder, and raises
instead of exiting: a `Cm3evalError` for usage or missing input (exit code 2 on the command
line), and `EvaluationIncomplete` (exit code 1 or 3) when samples failed beyond `max_failures`
or a requested metric was not computed, unless `check=False`.

    from evals import evaluate
    result = evaluate("shapes-vqa", model="demo", out="runs/demo", limit=8)
    result.metrics["shapes-vqa"]["accuracy"]["value"], result.report
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cm3leon.errors import Cm3evalError


@dataclass
class Evaluation:
    """What a call returns: {task: {metric: metrics.json entry}}, the run folder and its report."""

    metrics: dict[str, dict[str, Any]]
    run_dir: Path
    report: Path | None
    exit_code: int = 0  # the command line's code: 0 ok, 1 failures over max_failures, 3 a metric missing
    reasons: list[str] = field(default_factory=list)  # one line per nonzero-code reason
    sweep: dict[str, "Evaluation"] = field(default_factory=dict)  # sweep point folder -> its evaluation


class EvaluationIncomplete(Cm3evalError):
    """Samples failed beyond max_failures (exit code 1) or a requested metric was not computed (3);
    `.result` holds the Evaluation, whose run folder keeps every finished sample."""

    def __init__(self, result: Evaluation) -> None:
        super().__init__("; ".join(result.reasons))
        self.exit_code = result.exit_code
        self.result = result


def _assignments(settings: dict[str, Any] | None) -> tuple[str, ...]:
    """{"generation.cfg_scale": 3} -> ("generation.cfg_scale=3",): the --set strings the plan parses."""
    import json

    return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (settings or {}).items())


def evaluate(tasks: str | Sequence[str], model: str | None = None, out: str | Path | None = None, *,
             limit: int | None = None, data_root: str | Path | None = None, settings: dict[str, Any] | None = None,
             sweep: dict[str, Sequence[Any]] | None = None, device: str = "auto", dtype: str = "auto",
             batch_size: int | None = None, max_failures: str = "1%", overwrite: bool = False,
             save_candidates: bool = False, vq: str | Path | None = None, family: str | None = None,
             image_size: int | None = None, check: bool = True,
             predictor_factory: Callable[..., Any] | None = None) -> Evaluation:
    """Evaluate `model` ("demo" or a checkpoint folder) on task or suite names into `out` (default
    runs/<model>); re-running the same call resumes. `settings` are the --set overrides
    ({"generation.cfg_scale": 3}), `sweep` the --sweep axes ({"generation.cfg_scale": [1, 3]}: one run
    folder per point under `out`, each in `.sweep`). `family`, `image_size`: --family, --image-size.
    `predictor_factory` stands in for the checkpoint (tests). Raises Cm3evalError subclasses, never SystemExit."""
    from evals.cli.run import PredictorSettings, check_flags, run_plans
    from evals.engine import exit_status
    from evals.plan import RunRequest, build_plan

    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    sweeps = tuple(f"{k}={','.join(map(str, vals))}" for k, vals in (sweep or {}).items())
    check_flags(device, dtype, 1)
    request = RunRequest(names, _assignments(settings), sweeps, {"limit": limit}, model,
                         Path(data_root) if data_root else None, Path(out) if out else None, Path(vq) if vq else None,
                         max_failures, device=device, dtype=dtype, batch_size=batch_size,
                         inspect_model=predictor_factory is None, save_candidates=save_candidates, family=family,
                         image_size=image_size)
    plan = build_plan(request)
    # the call as the command line it stands for, recorded in metrics.json ("commands that built the run")
    argv = ["evals.evaluate", *names] + (["--model", model] if model else []) + (["--out", str(out)] if out else [])
    argv += (["--limit", str(limit)] if limit else []) + [x for a in request.sets for x in ("--set", a)]
    argv += [x for a in sweeps for x in ("--sweep", a)]
    argv += (["--family", family] if family else []) + (["--image-size", str(image_size)] if image_size else [])
    run = PredictorSettings(plan.model, plan.device.device, plan.device.dtype, batch_size, Path(vq) if vq else None,
                            save_candidates=save_candidates, family=family, image_size=image_size)
    all_results = run_plans(plan, run, predictor_factory, overwrite=overwrite,
                            data_root=Path(data_root) if data_root else None, argv=argv)
    points = {}
    for run_dir, results in (all_results or {}).items():
        code, reasons = exit_status(list(results.values()), plan.max_failures)
        report = Path(run_dir) / "report.html"
        points[Path(run_dir).name] = Evaluation({t: r.metrics for t, r in results.items()}, Path(run_dir),
                                                report if report.is_file() else None, code, reasons)
    if len(points) == 1:
        result = next(iter(points.values()))
    else:
        parent = plan.runs[0].out.parent
        code = max((p.exit_code for p in points.values()), key=lambda c: (c == 1, c))  # 1 outranks 3
        result = Evaluation({}, parent, None, code, [r for p in points.values() for r in p.reasons], points)
    if check and result.exit_code:
        raise EvaluationIncomplete(result)
    return result
