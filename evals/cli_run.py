"""`cm3eval run | list | show`: the registry and the engine on the command line.

Errors a user can cause (a malformed spec, an unknown --set key, a missing data root, a run
folder holding another config) are one line on stderr and a non-zero exit code, no traceback.

Test hook: when $CM3EVAL_TEST_PREDICTOR is set to "module:factory", the predictor comes from
`factory(model=..., device=..., batch_size=...)` instead of a cm3leon checkpoint. The test-suite
uses it to drive the engine end to end (resume, kill -9, torchrun) with a deterministic
predictor; it is not a user feature.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

import tasks
from evals import engine
from tasks.loaders import DataError
from tasks.spec import SpecError, TaskSpec, apply_overrides, known_keys, parse_assignments

log = logging.getLogger("cm3eval")

TEST_PREDICTOR_ENV = "CM3EVAL_TEST_PREDICTOR"
SHORTHANDS = {"retrieval_k": "retrieval.k", "cfg_scale": "generation.cfg_scale",
              "cdk_alpha": "generation.cdk_alpha", "candidates": "generation.n_candidates", "limit": "limit"}


class UsageError(ValueError):
    pass


def _die(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


# ----------------------------------------------------------------------------- overrides
def collect_overrides(set_: list[str], shorthands: dict[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = parse_assignments(set_)
    for opt, key in SHORTHANDS.items():
        if shorthands.get(opt) is not None:
            overrides[key] = str(shorthands[opt])
    if shorthands.get("retrieval_k") is not None and "retrieval.enabled" not in overrides:
        # --retrieval-k 2 on a task whose spec has retrieval off would otherwise change nothing, silently
        overrides["retrieval.enabled"] = str(shorthands["retrieval_k"] > 0).lower()
    return overrides


def resolve_specs(names: list[str], overrides: dict[str, Any]) -> list[TaskSpec]:
    """Registry specs with the overrides each one knows applied. A key no task knows is an error
    (metric options and dataset files exist only in some tasks of a suite)."""
    specs = [tasks.get(n) for n in tasks.expand(names)]
    used: set[str] = set()
    out = []
    for spec in specs:
        keys = set(known_keys(spec))
        mine = {}
        for k, v in overrides.items():
            if k in keys or not k.startswith("metrics."):  # non-metric keys: every task has them
                mine[k] = v
        resolved = apply_overrides(spec, mine, f"task {spec.name} with --set overrides")
        used |= set(mine)
        out.append(tasks.registry.check(resolved, f"task {spec.name} with --set overrides"))
    unused = [k for k in overrides if k not in used]
    if unused:
        apply_overrides(specs[0], {unused[0]: overrides[unused[0]]})  # raises with the close matches
    return out


def parse_sweep(items: list[str]) -> list[dict[str, str]]:
    """`--sweep k=v1,v2 --sweep j=a,b` -> the cartesian product as override dicts."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v != ""]
        if not sep or not key or not vals:
            raise UsageError(f"--sweep {item}: expected key.path=v1,v2,...")
        axes.append([(key.strip(), v) for v in vals])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def sweep_dir(out: Path, point: dict[str, str]) -> Path:
    if not point:
        return out
    return out / ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


# ----------------------------------------------------------------------------- predictor
def make_predictor(model: str, device: str, dtype: str, batch_size: int | None):
    """batch_size None: the predictor picks one (a cm3leon model: cm3leon.sampling.auto_batch_size)."""
    hook = os.environ.get(TEST_PREDICTOR_ENV)
    if hook:
        module, _, attr = hook.partition(":")
        return getattr(importlib.import_module(module), attr)(model=model, device=device, batch_size=batch_size or 8)
    import torch

    from cm3leon import checkpoint
    from evals.predict import ModelPredictor

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    bundle = checkpoint.load(model, device=device, dtype=torch_dtype)
    return ModelPredictor(bundle, batch_size=batch_size, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- printing
def _print_results(all_results: dict[str, dict[str, engine.TaskResult]], as_json: bool) -> None:
    if as_json:
        payload = {run: {name: r.entry for name, r in res.items()} for run, res in all_results.items()}
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    sweep = len(all_results) > 1
    table = Table(title="cm3eval results")
    for col in (["run"] if sweep else []) + ["task", "metric", "value", "95% CI", "n", "failures"]:
        table.add_column(col)
    notes = []
    for run, res in all_results.items():
        for name, r in res.items():
            lead = [run] if sweep else []
            if not r.metrics:
                table.add_row(*lead, name, "—", "—", "", str(r.n_samples), str(len(r.failures)))
            for metric, m in r.metrics.items():
                ci = m.get("ci")
                table.add_row(*lead, name, metric, f"{m['value']:.4g}",
                              f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "", str(m.get("n")), str(len(r.failures)))
            notes += [f"{name}: {n}" for n in r.entry.get("notes", [])]
            notes += [f"{name}: sample {f['id']} failed: {f['error']}" for f in r.failures[:5]]
            if len(r.failures) > 5:
                notes.append(f"{name}: … {len(r.failures) - 5} more failures in metrics.json")
    console = Console()
    console.print(table)
    for n in notes:
        console.print(n, markup=False, highlight=False, soft_wrap=True)
    for run in all_results:
        console.print(f"results: {run}/metrics.json", markup=False, highlight=False)


def _leaderboard(out: Path, runs: list[Path]) -> None:
    try:
        from reports.leaderboard import collect_runs, leaderboard, write_leaderboard
    except ImportError:
        return
    try:
        write_leaderboard(leaderboard(collect_runs(runs)), out)
    except Exception as e:  # the runs are done and saved; a leaderboard problem must not hide that
        log.warning("leaderboard not written: %s: %s", type(e).__name__, e)


# ----------------------------------------------------------------------------- commands
def run(
    names: list[str] = typer.Argument(..., metavar="TASK|SUITE...", help="Tasks or suites (cm3eval list)."),
    model: str = typer.Option("demo", "--model", help="Checkpoint folder, or 'demo' for the shipped demo model."),
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
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Samples per forward (does not change results); default: as many "
                                                  "as a KV-cache budget allows (at most 64)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing run of a different config."),
    json_: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Evaluate a model on tasks or suites; re-running the same command resumes."""
    _setup_logging()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _die(f"--device {device}: expected cpu or cuda")
    if dtype not in ("float32", "bfloat16"):
        _die(f"--dtype {dtype}: expected float32 or bfloat16")
    shorthands = dict(retrieval_k=retrieval_k, cfg_scale=cfg_scale, cdk_alpha=cdk_alpha, candidates=candidates,
                      limit=limit)
    try:
        overrides = collect_overrides(set_, shorthands)
        points = parse_sweep(sweep)
        plans = []  # (run folder, specs, overrides) per sweep point; everything validated before any work
        for point in points:
            ov = {**overrides, **point}
            plans.append((point, resolve_specs(names, ov), ov))
    except (SpecError, UsageError, DataError) as e:
        _die(str(e))
        return
    out = out or Path("runs") / (Path(model).name if model != "demo" else "demo")
    dist = engine.init_distributed(device)
    if dist.enabled and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    try:
        predictor = make_predictor(model, device, dtype, batch_size)
    except (FileNotFoundError, ValueError) as e:
        _die(f"--model {model}: {e}", 1)
        return
    run_batch = batch_size or getattr(predictor, "batch_size", None) or 8  # the engine's chunk = one predict() call
    all_results: dict[str, dict[str, engine.TaskResult]] = {}
    run_dirs = []
    for point, specs, ov in plans:
        run_out = sweep_dir(out, point)
        run_dirs.append(run_out)
        opts = engine.RunOptions(out=run_out, data_root=data_root, batch_size=run_batch, overwrite=overwrite,
                                 device=device, dtype=dtype, model_name=model,
                                 overrides={k: _typed(specs, k) for k in ov}, argv=list(sys.argv))
        try:
            results = engine.run(specs, predictor, opts, dist)
        except (SpecError, DataError, engine.RunError) as e:
            _die(str(e), 1)
            return
        all_results[str(run_out)] = results
    if dist.rank != 0:
        return
    if len(run_dirs) > 1:
        _leaderboard(out, run_dirs)
    _print_results(all_results, json_)


def _typed(specs: list[TaskSpec], key: str) -> Any:
    """The value an override resolved to (typed), from the first spec that has the key."""
    for spec in specs:
        node: Any = spec.to_dict()
        try:
            for part in key.split("."):
                node = node[part]
            return node
        except (KeyError, TypeError):
            continue
    return None


def list_tasks(json_: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Tasks and suites in the registry."""
    try:
        rows = [(n, tasks.get(n)) for n in tasks.list()]
        suites = tasks.suites()
    except SpecError as e:
        _die(str(e))
        return
    if json_:
        typer.echo(json.dumps({"tasks": {n: {"kind": s.kind, "loader": s.dataset.loader, "limit": s.limit,
                                             "metrics": list(s.metrics), "description": s.description}
                                         for n, s in rows}, "suites": suites}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tasks")
    for col in ("task", "kind", "loader", "metrics", "limit", "description"):
        table.add_column(col, overflow="fold")
    for n, s in rows:
        table.add_row(n, s.kind, s.dataset.loader, ", ".join(s.metrics), str(s.limit or "all"), s.description)
    console = Console()
    console.print(table)
    for name, members in suites.items():
        console.print(f"suite [bold]{name}[/bold]: {', '.join(members)}")


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
    try:
        overrides = collect_overrides(set_, dict(retrieval_k=retrieval_k, cfg_scale=cfg_scale, cdk_alpha=cdk_alpha,
                                                 candidates=candidates, limit=limit))
        if name in tasks.suites():
            raise UsageError(f"{name} is a suite ({', '.join(tasks.suites()[name])}); show takes one task")
        (spec,) = resolve_specs([name], overrides)
    except (SpecError, UsageError) as e:
        _die(str(e))
        return
    if json_:
        typer.echo(json.dumps(spec.to_dict(), indent=2))
    else:
        typer.echo(yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True), nl=False)
