"""The task registry: every `tasks/specs/*.yaml` is a task; `tasks/specs/suites.yaml` names suites.

Specs are discovered and validated lazily (lm-evaluation-harness style): `list()` parses every
file, so one broken spec is reported by name instead of being skipped silently.

The registry checks what tasks/ knows (the schema, the sampler's settings, the loader's file
roles). Metric names and options belong to evals' metric table: evals/plan.py checks them
before a run, so this layer imports nothing above it.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .spec import SpecError, TaskSpec, load_spec, load_yaml

SPEC_DIR = Path(__file__).parent / "specs"
SUITES_FILE = SPEC_DIR / "suites.yaml"


def _spec_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml")) if p != SUITES_FILE}


def check(spec: TaskSpec, src: str) -> TaskSpec:
    """Checks that need the loaders (the loader's name, kinds and file roles)."""
    from .loaders import check_spec

    check_spec(spec, src)
    return spec


def display_path(path: Path) -> str:
    """tasks/specs/NAME.yaml: how errors name a registry file."""
    try:
        return str(path.resolve().relative_to(SPEC_DIR.resolve().parents[1]))
    except ValueError:
        return str(path)


@lru_cache(maxsize=None)
def _load(path: str) -> TaskSpec:
    src = display_path(Path(path))
    spec = load_spec(path, src)
    if spec.name != Path(path).stem:
        raise SpecError(f"{src}: name: must match the file name ({Path(path).stem!r}), got {spec.name!r}")
    return check(spec, src)


def list_tasks() -> list[str]:
    return sorted(_spec_files())


def _suite_members() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """{suite: [(task, its settings in that suite)]}: a member is a task name, or a one-key mapping
    TASK: {key.path: value} (the same keys as --set; --set on the command line wins)."""
    if not SUITES_FILE.is_file():
        return {}
    src = display_path(SUITES_FILE)
    data = load_yaml(SUITES_FILE, src)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise SpecError(f"{src}: expected a mapping of suite name -> list of task names")
    known = set(list_tasks())
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, members in data.items():
        if name in known:
            raise SpecError(f"{src}: {name}: a suite cannot share its name with a task")
        for m in members:
            if isinstance(m, dict) and len(m) == 1 and isinstance(next(iter(m.values())), dict):
                task, sets = next(iter(m.items()))
            else:
                task, sets = m, {}
            if task not in known:
                raise SpecError(f"{src}: {name}: unknown task {task!r}")
            out.setdefault(str(name), []).append((str(task), {str(k): v for k, v in sets.items()}))
    return out


def suites() -> dict[str, list[str]]:
    return {name: [task for task, _ in members] for name, members in _suite_members().items()}


def suite_settings(names: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """{task: settings} that the suites among `names` give their members (a task named on its own
    runs with its spec's own settings)."""
    members = _suite_members()
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        for task, sets in members.get(name, []):
            out.setdefault(task, {}).update(sets)
    return out


def get(name: str) -> TaskSpec:
    """A task by registry name, or a spec file given by path (`my-task.yaml`)."""
    files = _spec_files()
    if name in files:
        return _load(str(files[name]))
    if name.endswith((".yaml", ".yml")):
        return check(load_spec(name), name)  # a user's own spec: no name/file-name rule
    raise SpecError(_unknown(name))


def _unknown(name: str) -> str:
    choices = list_tasks() + sorted(suites())
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(choices)}"
    return f"unknown task or suite {name!r}{hint}"


def expand(names: list[str] | tuple[str, ...]) -> list[str]:
    """Task and suite names -> task names (suites expanded, order kept, duplicates dropped)."""
    all_suites = suites()
    out: list[str] = []
    for name in names:
        members = all_suites.get(name, [name])
        for m in members:
            if m not in all_suites and m not in _spec_files() and not m.endswith((".yaml", ".yml")):
                raise SpecError(_unknown(m))
            if m not in out:
                out.append(m)
    return out
