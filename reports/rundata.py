"""Finished run folders as the reports see them, read through evals.runs (the one reader).

evals.runs owns the files and their torn-line rule; this module adds what the views need on
top: metrics.json checked for the fields they use, samples as a list, and `discover_runs`,
which turns command-line paths into runs, finished or started (a sweep parent expands to its
points; folders that are neither are listed with the reason, not fatal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from evals import runs
from reports.errors import ReportError


def _read(fn: Any, *args: Any) -> Any:
    """Call an evals.runs reader; its errors become ReportError (same one-line message)."""
    try:
        return fn(*args)
    except runs.RunFolderError as e:
        raise ReportError(str(e)) from None


def is_started_run(path: Path | str) -> bool:
    """A run folder with a task folder (its config.json) and no finished task: still running, or
    stopped before any task was scored. The leaderboard lists its tasks as in progress."""
    path = Path(path)
    return path.is_dir() and not runs.is_finished_run(path) and any(
        p.is_dir() and (p / runs.CONFIG).is_file() for p in path.iterdir())


def load_metrics(run_dir: Path | str, *, started: bool = False) -> dict[str, Any]:
    """metrics.json of a run, checked for the fields the reports use. started=True: a started
    run without one reads as no finished task ({"run": {}, "tasks": {}})."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (no such directory)")
    path = run_dir / runs.METRICS
    if started and not path.is_file() and is_started_run(run_dir):
        return {"run": {}, "tasks": {}}
    if not path.is_file():
        raise ReportError(f"{path}: file not found (not a finished run)")
    data = _read(runs.read_json, path)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ReportError(f"{path}: expected an object with a 'tasks' object")
    if data.get("run") is not None and not isinstance(data["run"], dict):
        raise ReportError(f"{path}: 'run' must be an object")
    for task, entry in data["tasks"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics", {}), dict):
            raise ReportError(f"{path}: tasks.{task}.metrics must be an object")
        for name, m in entry.get("metrics", {}).items():
            if not isinstance(m, dict) or "value" not in m:
                raise ReportError(f"{path}: tasks.{task}.metrics.{name} must be an object with a 'value'")
            ci = m.get("ci")
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2):
                raise ReportError(f"{path}: tasks.{task}.metrics.{name}.ci must be [low, high] or null")
            hib = m.get("higher_is_better")
            if hib is not None and not isinstance(hib, bool):
                raise ReportError(f"{path}: tasks.{task}.metrics.{name}.higher_is_better must be true or false")
        if not isinstance(entry.get("failures", []), list):
            raise ReportError(f"{path}: tasks.{task}.failures must be a list")
    return data


def load_task_config(run_dir: Path | str, task: str) -> dict[str, Any] | None:
    """TASK/config.json, or None when the run has none (the settings columns stay empty)."""
    return _read(runs.read_task_config, Path(run_dir), task)


def load_samples(run_dir: Path | str, task: str) -> list[dict[str, Any]]:
    """The finished sample lines of a task (every rank), ordered by index."""
    return list(_read(runs.read_samples, Path(run_dir) / task).values())


# ---------------------------------------------------------------- which folders are runs

@dataclass
class Discovered:
    runs: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why it is not a run)


def _why_not_a_run(path: Path) -> str:
    metrics = path / runs.METRICS
    if not metrics.exists():
        return "no metrics.json (a run that never finished a task, or not a run folder)"
    try:
        runs.read_metrics(path)
    except runs.RunFolderError as e:
        return f"unreadable metrics.json: {e}"
    return "metrics.json lists no finished task"


def _child_runs(path: Path) -> list[Path]:
    """Sweep points under a folder: subfolders holding a metrics.json or named KEY=VALUE.
    Task folders (config.json, samples/) are neither."""
    kids = []
    for p in sorted(path.iterdir()):
        if p.is_dir() and ((p / runs.METRICS).exists() or "=" in p.name):
            kids.append(p)
    return kids


def discover_runs(paths: Iterable[Path | str]) -> Discovered:
    """Finished runs among paths: a finished run is taken as it is (and sweep points inside it
    too); a folder that is not one expands to the sweep points under it; anything else is skipped
    with a reason. A path that does not exist is a usage error."""
    found = Discovered()
    seen: set[Path] = set()

    def take(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.runs.append(p)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ReportError(f"{p}: not a run folder (no such directory)")
        if not p.is_dir():
            found.skipped.append((p, "not a folder"))
            continue
        kids = _child_runs(p)
        if runs.is_finished_run(p) or is_started_run(p):
            take(p)
        elif not kids:
            found.skipped.append((p, _why_not_a_run(p)))
        for k in kids:
            if runs.is_finished_run(k) or is_started_run(k):
                take(k)
            else:
                found.skipped.append((k, _why_not_a_run(k)))
    return found
