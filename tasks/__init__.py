"""WHAT to evaluate: the task registry (`tasks.list()`, `tasks.get(name)`, `tasks.suites()`;
tasks/registry.py), the spec schema (tasks/spec.py), the loaders for the official layouts and the
data roots (tasks/loaders.py), the one image opener (tasks/images.py), the one cache folder
(tasks/cache.py), and the demo world (tasks/shapes/). Imports only cm3leon."""

from __future__ import annotations

from .registry import expand, get, suite_settings, suites
from .registry import list_tasks as list  # noqa: A001  (the registry's public name, as in the docs)
from .spec import SpecError, TaskSpec, apply_overrides, load_spec
from . import more_loaders  # noqa: E402,F401  (adds the VisDial, paragraph and MARIO-Eval loaders to LOADERS)

__all__ = ["list", "get", "suites", "suite_settings", "expand", "TaskSpec", "SpecError", "apply_overrides", "load_spec"]
