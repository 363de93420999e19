"""torch.distributed for the engine: the same command under `torchrun --nproc_per_node N`.

The world is split into data-parallel groups of `tp` consecutive ranks (`--tp`, default 1): each
group holds one copy of the model, split across its ranks by cm3leon.tensor_parallel when tp > 1.
Samples are sharded by index % dp_size over the groups; the ranks of a group run the same
batches in lockstep, and only its first rank (tp_rank 0) writes samples and PNGs, to its own
samples file; global rank 0 merges every group's file and scores. Every collective here also
carries errors, so a failing rank never leaves the others waiting at a barrier.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Dist:
    """Where this process sits. `tp_rank`, `dp_rank`, `dp_size` default to the layout of
    cm3leon.tensor_parallel (a row-major ("dp", "tp") mesh: rank = dp_rank * tp + tp_rank)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1  # ranks per model copy
    tp_rank: int | None = None
    dp_rank: int | None = None
    dp_size: int | None = None
    tp_group: Any = field(default=None, repr=False, compare=False)  # the process group of this rank's model copy

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"tp: the world of {self.world} ranks is not a multiple of tp={self.tp}")
        if self.tp_rank is None:
            self.tp_rank = self.rank % self.tp
        if self.dp_rank is None:
            self.dp_rank = self.rank // self.tp
        if self.dp_size is None:
            self.dp_size = self.world // self.tp

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def writes_outputs(self) -> bool:
        """One rank per model copy writes its group's samples: its peers hold the same outputs."""
        return self.tp_rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def first_error(self, err: Any) -> Any:
        """The first rank's error, on every rank (so no rank waits forever at a barrier)."""
        if not self.enabled:
            return err
        import torch.distributed as td

        errs: list[Any] = [None] * self.world
        td.all_gather_object(errs, err)
        return next((e for e in errs if e), None)

    def group_error(self, err: Any) -> Any:
        """The first error among the ranks of this model copy, on each of them. The ranks of a
        group meet in the model's all-reduces, so one that stopped alone would leave its peers
        blocked in the next forward; called after every batch when tp > 1."""
        if self.tp == 1:
            return err
        import torch.distributed as td

        errs: list[Any] = [None] * self.tp
        td.all_gather_object(errs, err, group=self.tp_group)
        return next((e for e in errs if e), None)

    def group_min(self, value: int) -> int:
        """The smallest `value` over the ranks of this model copy, on each of them. The ranks of a
        group must run the same batches (their all-reduces pair up); a batch size each rank's plan
        sized from its own GPU's memory differs on GPUs of different sizes, so all take the smallest."""
        if self.tp == 1:
            return value
        import torch.distributed as td

        values: list[int] = [0] * self.tp
        td.all_gather_object(values, int(value), group=self.tp_group)
        return min(values)

    def broadcast(self, obj: Any) -> Any:
        """rank 0's object on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "cpu", tp: int = 1) -> Dist:
    """From torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on GPU. With tp > 1
    the ("dp", "tp") mesh is built here (cm3leon.tensor_parallel.layout, which the predictor
    reuses), so the engine's shards and the model's split come from one layout."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            td.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
    if tp == 1:
        return Dist(rank, world, local_rank)
    from cm3leon.tensor_parallel import layout

    lay = layout(tp, device)  # raises TensorParallelError (one line) for a world that tp does not divide
    return Dist(rank, world, local_rank, tp=lay.tp, tp_rank=lay.tp_rank, dp_rank=lay.dp_rank, dp_size=lay.dp_size,
                tp_group=lay.mesh["tp"].get_group())
