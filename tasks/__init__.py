"""Task registry: `tasks.list()`, `tasks.get(name)`, `tasks.suites()` (see tasks/registry.py)."""

from __future__ import annotations

from .registry import expand, get, suites
from .registry import list_tasks as list  # noqa: A001  (the registry's public name, as in the docs)
from .spec import SpecError, TaskSpec, apply_overrides, load_spec

__all__ = ["list", "get", "suites", "expand", "TaskSpec", "SpecError", "apply_overrides", "load_spec"]
