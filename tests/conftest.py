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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's network forwards: the CPU is shared by other processes, and two
    spinning OpenMP threads run the Inception / DINOv2 / CLIP convolutions several times slower than one.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
