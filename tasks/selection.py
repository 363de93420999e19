"""Which samples a run evaluates, in which order: the rule shared by the engine and the protocol
manifests.

A task's samples are the loader's canonical order, or with `dataset.shuffle` a permutation seeded
by the task's seed; `--limit N` takes the first N of that order, so a smaller limit is a prefix of
a larger one and a run resumes across limits. The FID-30K manifest (tasks/protocols.py) records
the prompts this rule picks, so it must be the very rule `evals.engine.select` applies (the test
suite asserts both give the same ids).
"""

from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def derive_seed(task_seed: int, index: int) -> int:
    """Per-sample seed from (task seed, sample index): independent of batching and sharding.
    Index -1 seeds the task's permutation."""
    digest = hashlib.blake2b(f"cm3eval/{task_seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def selection_order(items: Sequence[T], *, shuffle: bool, seed: int, limit: int | None) -> list[T]:
    """The items in evaluation order (a seeded permutation with shuffle), the first `limit`."""
    out = list(items)
    if shuffle:
        order = np.random.default_rng(derive_seed(seed, -1)).permutation(len(out))
        out = [out[i] for i in order]
    return out[:limit] if limit is not None else out
