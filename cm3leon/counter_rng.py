"""Counter-based randomness: one uniform per (seed, candidate, step), on the host or the device.

A sample's tokens must not depend on its batch, its neighbours or how samples are split across
processes, so its randomness is a hash of where it is rather than a generator's state. The
device version runs the same splitmix64 with int64 tensor ops (whose + and * wrap modulo 2**64)
and gives bit-identical numbers, so the decode step never waits for the host to upload them.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def sample_uniform(seed: int, candidate: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, candidate, step)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ candidate) ^ step)
    return (x >> 11) * (1.0 / (1 << 53))


def _signed64(x: int) -> int:
    """The int64 tensor value with the same 64 bits as the unsigned integer x."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    # int64 `>>` is arithmetic; masking off the sign copies makes it the unsigned shift splitmix needs
    return (x >> n) & ((1 << (64 - n)) - 1)


def splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """`_splitmix64` on int64 tensors: torch's int64 + and * wrap modulo 2**64 like the masks above."""
    x = x + _signed64(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed64(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed64(_MIX2)
    return x ^ _shr(x, 31)


def sample_uniforms(seeds: Sequence[int], candidates: Sequence[int], n_steps: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """[len(seeds), n_steps] float64 on `device`: exactly sample_uniform(seed, candidate, step),
    hashed by integer tensor ops on the device (one upload of the seeds per batch, none per step)."""
    s = torch.tensor([_signed64(x) for x in seeds], dtype=torch.long).to(device)
    c = torch.tensor([_signed64(x) for x in candidates], dtype=torch.long).to(device)
    steps = torch.arange(n_steps, dtype=torch.long, device=device)
    h = splitmix64_tensor(splitmix64_tensor(s) ^ c)
    x = splitmix64_tensor(h[:, None] ^ steps[None, :])
    return _shr(x, 11).double() * (1.0 / (1 << 53))
