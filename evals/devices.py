"""`--device` and `--dtype`: checked and resolved once, in the plan phase, before anything loads.

`auto` (the default of `cm3eval run` and `cm3eval bench sampler`) is CUDA when torch sees a GPU
(cuda:$LOCAL_RANK, so every torchrun rank takes its own) and the CPU otherwise; `--dtype auto` is
bfloat16 on CUDA and float32 elsewhere. A device that is not there (`cuda` without CUDA,
`cuda:7` on one GPU, `cuda:banana`, `mps` where absent) is a `DeviceError`: one line, exit 2.
The resolved choice says itself in one line (`describe`), which `run` prints before the disk line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cm3leon.errors import Cm3evalError

DEVICES_HELP = "auto (CUDA when present), cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16")


class DeviceError(Cm3evalError, ValueError):
    """--device or --dtype names something this machine does not have; one line, exit 2."""


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu", "cuda:N" or "mps"
    dtype: str  # "float32" or "bfloat16"
    auto: bool = False  # --device auto chose it
    name: str | None = None  # the GPU's name
    total_memory: int | None = None  # bytes (CUDA only), read once here

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        """One line: what runs where, and why."""
        if self.is_cuda:
            how = f"{'auto; ' if self.auto else ''}{self.name}, {self.total_memory / 2**30:.1f} GiB"
        else:
            how = "auto: no CUDA" if self.auto else ""
        return f"device: {self.device}{f' ({how})' if how else ''}, dtype {self.dtype}"


def check_syntax(device: str, dtype: str) -> None:
    """What can be wrong with the flags without asking torch (no import: answers at once)."""
    kind, colon, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit())):
        raise DeviceError(f"--device {device}: expected {DEVICES_HELP}")
    if dtype not in DTYPES:
        raise DeviceError(f"--dtype {dtype}: expected {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")


def resolve(device: str, dtype: str = "auto") -> DeviceChoice:
    """The device and dtype this run uses, or a DeviceError naming what is missing."""
    check_syntax(device, dtype)
    import torch

    kind, _, index = device.partition(":")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: each rank its own GPU
    auto = kind == "auto"
    if auto:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: torch sees no CUDA device ({_why_no_cuda(torch)}); use "
                              "--device cpu, or --device auto to take a GPU only where there is one")
        n = torch.cuda.device_count()
        i = int(index) if index else local_rank
        if i >= n:
            raise DeviceError(f"--device {device}: torch sees {n} CUDA device{'s' if n > 1 else ''} "
                              f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})"
                              + ("" if index else f" and LOCAL_RANK is {local_rank}"))
        props = torch.cuda.get_device_properties(i)
        return DeviceChoice(f"cuda:{i}", "bfloat16" if dtype == "auto" else dtype, auto, props.name,
                            int(props.total_memory))
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: torch sees no Apple MPS device here; use --device cpu or auto")
    return DeviceChoice(kind, "float32" if dtype == "auto" else dtype, auto)


def _why_no_cuda(torch) -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no GPU or driver found" + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
