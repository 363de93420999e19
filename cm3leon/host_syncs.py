"""Count the host reads of tensor values (the calls that make a host wait for the device).

A decode loop that reads a device value each step (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`)
stalls the host until the GPU has caught up, so it can never queue work ahead. The counter wraps
those Tensor methods for the duration of a `with` block; the sampler's tests and the bench use it
to show that a decode step makes none. It counts on any device (on CPU every read is free, but
the same call would sync on a GPU), and it counts only calls from Python, which is where the
sampler could make them.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """`total` reads so far and `by_method` (e.g. {"tolist": 3}); `mark()` returns reads since the last mark."""

    def __init__(self) -> None:
        self.by_method: Counter[str] = Counter()
        self._marked = 0

    @property
    def total(self) -> int:
        return sum(self.by_method.values())

    def mark(self) -> int:
        since, self._marked = self.total - self._marked, self.total
        return since


@contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counter.by_method[name] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
