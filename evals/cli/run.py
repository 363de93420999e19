"""`cm3eval run | list | show`: the registry and the engine on the command line.

`run` is three phases: the plan (evals/plan.py: every setting, file and capability checked, no
model loaded; the disk need printed, and refused over the free space unless --force-disk), the
engine (one run folder per sweep point, resumable; each task in chunks of the prompts per step
the plan sized for it, or --batch-size; a published protocol's summary recorded as the task's
"protocol" in metrics.json), then the views (the
run's report.html, a leaderboard across sweep points) and the verdict: exit 0 when every
requested metric was computed, 1 when a task's failed samples exceed --max-failures (all
failed always counts), 3 when a requested metric could not be computed, 2 for usage errors and
missing inputs (raised as Cm3evalError and printed as one line by the root group).

Heavy modules (torch, the engine, the model library, reports) are imported inside the
commands: this module is imported by `cm3eval --help`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from evals.devices import DEVICES_HELP, check_syntax  # torch-free

log = logging.getLogger("cm3eval")


@dataclass(frozen=True)
class PredictorSettings:
    """What the predictor is built from (the plan's model, the device flags)."""

    model: str
    device: str
    dtype: str
    batch_size: int | None  # --batch-size (None: the plan sized each task)
    vq: Path | None = None
    compile: bool = False
    tp: int = 1
    save_candidates: bool = False
    family: str | None = None  # --family: overrides the family detected from config.json
    image_size: int | None = None  # --image-size: Lumina-mGPT / Emu3 image side


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, never to a stream that an earlier
    caller (a test's capture, an embedding program) has since closed."""

    @property
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    if not log.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _usage(message: str) -> None:
    from evals.plan import PlanError

    raise PlanError(message)


def check_flags(device: str, dtype: str, tp: int) -> None:
    """What the flags get wrong on any machine (no torch import); the plan checks the device exists."""
    check_syntax(device, dtype)
    if tp < 1:
        _usage(f"--tp {tp}: expected an integer >= 1")


# ----------------------------------------------------------------------------- predictor
def model_predictor(s: PredictorSettings) -> Any:
    """A predictor over a cm3leon checkpoint. Flags left at their defaults are not passed, so the
    loader and predictor keep their own defaults."""
    import torch

    from cm3leon import checkpoint
    from evals.predictor import ModelPredictor

    load_kw: dict[str, Any] = {"vq": s.vq} if s.vq is not None else {}
    if s.family is not None:
        load_kw["family"] = s.family
    if s.image_size is not None:
        load_kw["image_size"] = s.image_size
    bundle = checkpoint.load(s.model, device=s.device, dtype={"float32": torch.float32,
                                                              "bfloat16": torch.bfloat16}[s.dtype], **load_kw)
    sampler: dict[str, Any] = {}  # Sampler kwargs (cm3leon/sampling.py)
    if s.compile:
        sampler["compile"] = True
    if s.tp > 1:
        sampler["tp"] = s.tp
    return ModelPredictor(bundle, device=s.device, dtype=s.dtype, save_candidates=s.save_candidates,
                          sampler_options=sampler or None)


def make_predictor(settings: PredictorSettings, factory: Callable[..., Any] | None) -> Any:
    if factory is not None:  # injected by tests through evals.cli.main(..., predictor_factory=...)
        return factory(model=settings.model, device=settings.device, batch_size=settings.batch_size or 8)
    return model_predictor(settings)


# ----------------------------------------------------------------------------- printing
def print_results(all_results: dict[str, dict[str, Any]], as_json: bool) -> None:
    """The results table on stdout, plain fixed-width columns (a CI log keeps every cell whole):
    each value on its metric's display scale (reports.format: captioning x100, as the papers
    print them; metrics.json keeps the raw value), named in the `scale` column; a sweep's rows
    are named by the swept values (the point's folder name)."""
    if as_json:
        payload = {run: {name: r.entry for name, r in res.items()} for run, res in all_results.items()}
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    from reports.format import family, fmt, fmt_ci, shown

    sweep = len(all_results) > 1
    rows = [(["sweep point"] if sweep else []) + ["task", "metric", "value", "95% CI", "scale", "n", "failures"]]
    for run_dir, res in all_results.items():
        for name, r in res.items():
            lead = [Path(run_dir).name] if sweep else []
            failed = str(getattr(r, "n_failed", len(r.failures)))
            if not r.metrics:
                rows.append([*lead, name, "—", "—", "", "", str(r.n_samples), failed])
            for metric, m in r.metrics.items():
                ci = m.get("ci") or [None, None]
                value = shown(metric, m.get("value"))
                rows.append([*lead, name, metric, fmt(value) if value is not None else "not computed",
                             fmt_ci(shown(metric, ci[0]), shown(metric, ci[1])), family(metric).unit,
                             str(m.get("n")), failed])
    typer.echo(fixed_width(rows))
    for line in _notes(all_results):
        typer.echo(line)
    for run_dir in all_results:
        typer.echo(f"results: {run_dir}/metrics.json")


def fixed_width(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns two spaces apart, the header underlined."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _notes(all_results: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for res in all_results.values():
        for name, r in res.items():
            notes += [f"{name}: {n}" for n in r.entry.get("notes", [])]
            notes += [f"{name}: sample {f['id']} failed: {f['error']}" for f in r.failures[:5]]
            if len(r.failures) > 5:
                notes.append(f"{name}: … {len(r.failures) - 5} more failures in metrics.json")
    return notes


def write_views(run_dirs: list[Path], parent: Path) -> None:
    """report.html of each run folder, and a leaderboard across sweep points. A finished
    evaluation is saved already, so a problem here (a report bug, a missing optional
    dependency) is a warning, never a lost run or a traceback."""
    for run_dir in run_dirs:
        try:
            from reports import html as report_html

            report_html.write_run_report(Path(run_dir))
        except Exception as e:  # noqa: BLE001 - any report bug must leave the results usable
            log.warning("%s/report.html not written: %s: %s", run_dir, type(e).__name__, e)
    if len(run_dirs) > 1:
        try:
            from reports.leaderboard import leaderboard
            from reports.publish import write_leaderboard
            from reports.runtable import collect_runs

            write_leaderboard(leaderboard(collect_runs(run_dirs)), parent)
        except Exception as e:  # noqa: BLE001
            log.warning("leaderboard not written: %s: %s", type(e).__name__, e)


def verdict(all_results: dict[str, dict[str, Any]], max_failures: float) -> int:
    """The exit code from the engine's task results, with one stderr line per reason."""
    from evals.engine import exit_status

    code, reasons = exit_status([r for res in all_results.values() for r in res.values()], max_failures)
    for line in reasons:
        typer.echo(f"{'error' if code else 'note'}: {line}", err=True)
    return code


# ----------------------------------------------------------------------------- commands
def run(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., metavar="TASK|SUITE...", help="Tasks or suites (cm3eval list)."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint folder (native, HF Chameleon/Anole, "
                                        "Meta's release) or 'demo'; required outside the demo suite."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default: $CM3EVAL_DATA_ROOT; "
                                             "demo tasks build their own)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N samples."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<model>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec field: key.path=value (repeatable)."),
    sweep: list[str] = typer.Option([], "--sweep", help="key.path=v1,v2,…: one run folder per value under --out."),
    retrieval_k: Optional[int] = typer.Option(None, "--retrieval-k", min=0, help="= --set retrieval.k=N (and retrieval.enabled=N>0)"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="= --set generation.cfg_scale=X"),
    cdk_alpha: Optional[float] = typer.Option(None, "--cdk-alpha", help="= --set generation.cdk_alpha=X"),
    candidates: Optional[int] = typer.Option(None, "--candidates", min=1, help="= --set generation.n_candidates=N"),
    vq: Optional[Path] = typer.Option(None, "--vq", help="VQ-GAN for a checkpoint without a decoder (Meta's "
                                      "tokenizer/vqgan.ckpt, vqgan.yaml beside it)."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family (chameleon, lumina-mgpt, liquid, "
                                         "emu3, ...); default: detected from the checkpoint's config.json."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="Image side in px (Lumina-mGPT: "
                                             "default from its name, e.g. -768; Emu3: from image_area)."),
    max_failures: str = typer.Option("1%", "--max-failures", help="Failed samples allowed per task before exit 1 "
                                     "(a percentage, 1%, or a fraction, 0.01)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Prompts per sampler step (does "
                                             "not change results); default: as many as the device's memory "
                                             "holds for the task."),
    device: str = typer.Option("auto", "--device", help=DEVICES_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 elsewhere), float32 or "
                              "bfloat16"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on GPU)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks per model replica (under torchrun)."),
    save_candidates: bool = typer.Option(False, "--save-candidates", help="Write a PNG for every candidate, "
                                         "not only the chosen image."),
    force_disk: bool = typer.Option(False, "--force-disk", help="Run even when the estimated disk need is over "
                                    "the free space of --out's filesystem."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace only what differs from this command: a "
                                   "task whose config changed loses its samples, samples whose input images changed "
                                   "are recomputed; finished samples of an unchanged config are kept."),
    json_: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Evaluate a model on tasks or suites; re-running the same command resumes."""
    from evals.plan import RunRequest, build_plan

    _setup_logging()
    check_flags(device, dtype, tp)
    obj = ctx.find_root().obj or {}
    factory = obj.get("predictor_factory")
    shorthands = dict(retrieval_k=retrieval_k, cfg_scale=cfg_scale, cdk_alpha=cdk_alpha, candidates=candidates,
                      limit=limit)
    plan = build_plan(RunRequest(tuple(names), tuple(set_), tuple(sweep), shorthands, model, data_root, out, vq,
                                 max_failures, tp=tp, device=device, dtype=dtype, batch_size=batch_size,
                                 inspect_model=factory is None, save_candidates=save_candidates,
                                 force_disk=force_disk, family=family, image_size=image_size))
    if os.environ.get("RANK", "0") == "0":  # once per torchrun job, not per rank
        print_plan(plan)
    settings = PredictorSettings(plan.model, plan.device.device, plan.device.dtype, batch_size, vq, compile_, tp,
                                 save_candidates, family, image_size)
    code = execute(plan, settings, factory, overwrite=overwrite, data_root=data_root, as_json=json_, argv=obj.get("argv"))
    if code:
        raise typer.Exit(code)


def skipped_lines(plan: Any) -> list[str]:
    """One plan line per `when_available` metric left out, saying why (its missing file)."""
    return [f"plan: {t.spec.name}: metric {key} skipped: {why}" for run_plan in plan.runs for t in run_plan.tasks
            for key, why in t.skipped_metrics.items()]


def execute(plan: Any, settings: PredictorSettings, factory: Callable[..., Any] | None, *, overwrite: bool,
            data_root: Path | None, as_json: bool, argv: list[str] | None = None) -> int:
    """Load the model once, run every sweep point's tasks, write the views, return the exit code.
    argv: the command recorded in metrics.json (default: this process's)."""
    all_results = run_plans(plan, settings, factory, overwrite=overwrite, data_root=data_root, argv=argv)
    if all_results is None:  # not rank 0: rank 0 reports
        return 0
    print_results(all_results, as_json)
    return verdict(all_results, plan.max_failures)


def run_plans(plan: Any, settings: PredictorSettings, factory: Callable[..., Any] | None, *, overwrite: bool,
              data_root: Path | None, argv: list[str] | None = None) -> dict[str, dict[str, Any]] | None:
    """The run itself, shared by `cm3eval run` and `evals.evaluate`: {run folder: {task: TaskResult}}
    after every sweep point ran and its views were written; None on ranks other than 0."""
    from evals import engine
    from evals.dist import init_distributed

    dist = init_distributed(settings.device, settings.tp)  # with --tp: the ("dp", "tp") mesh the predictor splits on
    predictor = make_predictor(settings, factory)
    model_path = Path(plan.checkpoint.path) if plan.checkpoint is not None else None
    all_results: dict[str, dict[str, Any]] = {}
    for run_plan in plan.runs:
        results: dict[str, Any] = {}
        for batch, specs in batch_groups(run_plan.tasks):
            opts = engine.RunOptions(out=run_plan.out, data_root=data_root, batch_size=batch, overwrite=overwrite,
                                     device=settings.device, dtype=settings.dtype, model_name=plan.model,
                                     model_path=model_path, overrides=run_plan.overrides, argv=list(argv or sys.argv),
                                     label=", ".join(f"{k}={v}" for k, v in run_plan.point.items()))
            results.update(engine.run(specs, predictor, opts, dist))
        if dist.rank == 0:
            record_protocols(run_plan, results)
        all_results[str(run_plan.out)] = results
    if dist.rank != 0:
        return None
    write_views([r.out for r in plan.runs], plan.runs[0].out.parent if len(plan.runs) > 1 else plan.runs[0].out)
    return all_results


def batch_groups(task_plans: list[Any]) -> list[tuple[int, list[Any]]]:
    """(prompts per step, specs) in task order, as the plan sized each task; consecutive tasks of
    one size share an engine call."""
    groups: list[tuple[int, list[Any]]] = []
    for t in task_plans:
        size = t.prompts_per_step
        if groups and groups[-1][0] == size:
            groups[-1][1].append(t.spec)
        else:
            groups.append((size, [t.spec]))
    return groups


def print_plan(plan: Any) -> None:
    """Before anything loads (the run may take hours): the checkpoint found, the device, the disk need,
    and one line per task with its prompts per step, KV per prompt and modelled GPU time."""
    if plan.checkpoint is not None:
        typer.echo(plan.checkpoint.describe(), err=True)
    typer.echo(plan.device.describe(), err=True)
    if plan.disk is not None:
        typer.echo(plan.disk.describe(), err=True)
    sweep = len(plan.runs) > 1
    for run_plan in plan.runs:
        for t in run_plan.tasks:
            where = f"{run_plan.out.name}/" if sweep else ""
            typer.echo(t.sizing.describe(where + t.spec.name), err=True)
    for line in skipped_lines(plan):
        typer.echo(line, err=True)


def record_protocols(run_plan: Any, results: dict[str, Any]) -> None:
    """metrics.json's "protocol" of each task that follows a published one (the plan's summary:
    manifest hash, n, split, resolution, resize, Inception sha256, candidates, k, whether it
    matches the paper). Written here unless the engine already put it in the entry."""
    from evals import runs

    for name, protocol in run_plan.protocol.items():
        result = results.get(name)
        if result is None or result.entry.get("protocol") == protocol:
            continue
        result.entry["protocol"] = protocol
        runs.merge_task_metrics(run_plan.out, runs.read_metrics(run_plan.out).get("run", {}), {name: result.entry})


def list_tasks(json_: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Tasks and suites in the registry."""
    import tasks

    rows = [(n, tasks.get(n)) for n in tasks.list()]
    suites = tasks.suites()
    if json_:
        typer.echo(json.dumps({"tasks": {n: {"kind": s.kind, "loader": s.dataset.loader, "limit": s.limit,
                                             "metrics": list(s.metrics), "description": s.description}
                                         for n, s in rows}, "suites": suites}, indent=2))
        return
    typer.echo(tasks_text(rows, suites), nl=False)


def tasks_text(rows: list[tuple[str, Any]], suites: dict[str, list[str]]) -> str:
    """The registry as plain fixed-width lines (no terminal needed, readable at 80 columns): one
    line per task (name, kind, limit, metrics) with its description indented below, then the suites."""
    import textwrap

    width = max([len(n) for n, _ in rows] + [4])
    lines = [f"{'task':<{width}}  {'kind':<7} {'limit':<6} metrics"]
    for n, s in rows:
        lines.append(f"{n:<{width}}  {s.kind:<7} {str(s.limit or 'all'):<6} {', '.join(s.metrics)}")
        desc = " ".join(str(s.description or "").split())
        lines += textwrap.wrap(f"{desc} (loader: {s.dataset.loader})", 78, initial_indent="    ",
                               subsequent_indent="    ")
    lines.append("")
    for name, members in suites.items():
        lines += textwrap.wrap(f"suite {name}: {', '.join(members)}", 78, subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def show(
    name: str = typer.Argument(..., metavar="TASK", help="A task name or a spec file."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec field: key.path=value (repeatable)."),
    retrieval_k: Optional[int] = typer.Option(None, "--retrieval-k", min=0),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale"),
    cdk_alpha: Optional[float] = typer.Option(None, "--cdk-alpha"),
    candidates: Optional[int] = typer.Option(None, "--candidates", min=1),
    limit: Optional[int] = typer.Option(None, "--limit", min=1),
    json_: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Print a task's resolved spec (YAML), overrides applied."""
    import yaml

    import tasks
    from evals.plan import collect_overrides, resolve_specs

    overrides = collect_overrides(set_, dict(retrieval_k=retrieval_k, cfg_scale=cfg_scale, cdk_alpha=cdk_alpha,
                                             candidates=candidates, limit=limit))
    if name in tasks.suites():
        _usage(f"{name} is a suite ({', '.join(tasks.suites()[name])}); show takes one task")
    (spec,) = resolve_specs([name], overrides)
    if json_:
        typer.echo(json.dumps(spec.to_dict(), indent=2))
    else:
        typer.echo(yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True), nl=False)
