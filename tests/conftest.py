"""Test-suite settings: CI (CI=true) skips tests marked `slow`; each has a faster twin covering the same behaviour."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: skipped in CI (CI=true); a faster test covers the same behaviour")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
