"""torch.distributed for the engine: the same command under `torchrun --nproc_per_node N`.

Samples are sharded by index % world; each rank writes its own samples file; rank 0 merges and
scores. Every collective here also carries errors, so a failing rank never leaves the others
waiting at a barrier.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def first_error(self, err: str | None) -> str | None:
        """The first rank's error, on every rank (so no rank waits forever at a barrier)."""
        if not self.enabled:
            return err
        import torch.distributed as td

        errs: list[str | None] = [None] * self.world
        td.all_gather_object(errs, err)
        return next((e for e in errs if e), None)

    def broadcast(self, obj: Any) -> Any:
        """rank 0's object on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "cpu") -> Dist:
    """From torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if d.enabled:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(d.local_rank)
            td.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
    return d
