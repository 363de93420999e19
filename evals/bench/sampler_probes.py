"""What the sampler bench measures besides wall time: eager ops and host reads per decode step, a
minimal decode loop to compare against, and median timing.

The minimal loop is gpt-fast's shape over the same weights: prefill, then `step` + argmax per
token, nothing else (no guidance, masks, stop checks or bookkeeping), compiled the same way as the
sampler when --compile is on. The sampler's step time over the minimal loop's is the cost of
everything the sampler adds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device, repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up (which also compiles, under --compile)."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_step_seconds(runs: dict[str, Callable[[int], object]], new_tokens: int, device,
                        repeats: int) -> dict[str, float]:
    """Median decode-step seconds of each `run(n_tokens)`: (time for N tokens - time for 1) / (N - 1),
    so the prefill cancels. The sides run interleaved, round after round, so a busy machine's
    slow spells fall on all of them alike rather than on whichever side ran then."""
    for run in runs.values():
        run(new_tokens)  # warm-up (and compile)
        run(1)
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(1, repeats)):
        for name, run in runs.items():
            t = {}
            for n in (new_tokens, 1):
                sync(device)
                t0 = time.perf_counter()
                run(n)
                sync(device)
                t[n] = time.perf_counter() - t0
            rounds[name].append(max(t[new_tokens] - t[1], 1e-9) / max(1, new_tokens - 1))
    return {name: statistics.median(v) for name, v in rounds.items()}


def minimal_loop(model, compile: bool = False) -> Callable:
    """`run(prompts [B, T] long, n_new) -> tokens [B, n_new]`: greedy, unpadded, no processors."""
    import torch

    def step(tok, cache, kv_len):
        return model.step_tensors(tok, cache, kv_len).argmax(-1)

    cuda = model.output.weight.is_cuda
    if compile:  # the sampler's settings (see cm3leon.sampling._compiled_step)
        fn = torch.compile(step, mode="reduce-overhead", dynamic=False) if cuda else torch.compile(step, dynamic=None)
    else:
        fn = step

    @torch.no_grad()
    def run(prompts: torch.Tensor, n_new: int) -> torch.Tensor:
        B, T = prompts.shape
        cache = model.new_cache(B, T + n_new)
        tok = model.prefill(prompts, torch.ones_like(prompts, dtype=torch.bool), cache, last_only=True)[:, -1].argmax(-1)
        out = [tok]
        for _ in range(n_new - 1):
            # a fixed bucket under CUDA graphs (as the sampler does), the filled slots otherwise
            kv_len = min(cache.max_len, -(-(cache.length + 1) // 256) * 256) if compile and cuda else cache.length + 1
            tok = fn(tok, cache, kv_len)
            model.advance(cache)
            out.append(tok)
        return torch.stack(out, 1)

    return run


def eager_ops_per_step(sampler, requests, sampling, prompts_per_step: int) -> float:
    """aten ops dispatched per decode step (eager), averaged over one generate call's steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    real, steps = sampler._step_fn, [0]

    def counted(*args):
        steps[0] += 1
        with Count():
            real(*args)

    sampler._step_fn = counted
    try:
        sampler.generate(requests, sampling, prompts_per_step=prompts_per_step)
    finally:
        sampler._step_fn = real
    return Count.n / max(1, steps[0])


def host_syncs_per_step(sampler, requests, sampling, prompts_per_step: int) -> tuple[float, float]:
    """(reads inside the step functions per step, reads in the whole decode loop per step)."""
    from cm3leon.host_syncs import count_host_syncs

    real_step, real_decode = sampler._step_fn, sampler.decode
    inside, loop, steps = [0], [0], [0]
    with count_host_syncs() as counter:
        def step(*args):
            before = counter.total
            real_step(*args)
            inside[0] += counter.total - before
            steps[0] += 1

        def decode(*args):
            before = counter.total
            real_decode(*args)
            loop[0] += counter.total - before

        sampler._step_fn, sampler.decode = step, decode
        try:
            sampler.generate(requests, sampling, prompts_per_step=prompts_per_step)
        finally:
            sampler._step_fn, sampler.decode = real_step, real_decode
    n = max(1, steps[0])
    return inside[0] / n, loop[0] / n


def measure_bandwidth(device, n_bytes: int = 256 << 20) -> float:
    """Bytes/s of a large device copy, counting bytes read and written (best of 5)."""
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best
