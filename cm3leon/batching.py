"""Prompts per step: the one batch-size rule, and the roofline that says what a run costs.

A step of the sampler decodes P whole prompts, each with all its candidates and streams. In the
shared-prefix layout (DESIGN.md, third edition) one prompt's KV cache holds

  one prefix per stream kind (conditional / unconditional / image-only), stored once, and
  n_rows = n_candidates x n_streams suffix rows of `budget` positions (an image's token count,
  or a text task's max_new_tokens),

and every position holds K and V of every layer: 2 x n_layers x n_kv_heads/tp x head_dim x dtype
bytes. P is what the KV budget holds:

  CUDA: (device total memory - the loaded weights - WORKSPACE_RESERVE) // KV bytes per prompt,
        the total read once per run (never the free memory, which the caching allocator's own
        blocks make look smaller after the first batch);
  CPU:  CPU_KV_BUDGET // KV bytes per prompt;

capped at MAX_PROMPTS_PER_STEP and at least 1; `--batch-size` overrides it. The plan calls
`prompts_per_step` once per task (evals/sizing.py) and the engine runs the task in chunks of
that many prompts, each chunk one sampler step.

The roofline: a step takes max(bytes / HBM bandwidth, FLOPs / peak), with the weights and the
KV positions the step reads as its bytes and 2 x weights x rows (+ attention) as its FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import ModelConfig

CPU_KV_BUDGET = 1 << 30  # bytes; beyond ~1 GiB of cache a CPU step stops getting cheaper per prompt
# CUDA memory besides weights and KV: the CUDA context (~0.5 GiB), a prefill chunk's activations
# (a 7B model's MLP over 6 x 2,100 tokens is ~0.6 GB in bf16), the fp32 logits of the image rows,
# the VQ decoder and the allocator's fragmentation
WORKSPACE_RESERVE = 6 << 30
MAX_PROMPTS_PER_STEP = 64  # beyond this a step is large enough that more prompts buy no speed


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes of one element: a torch dtype or its name ("bfloat16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def kv_heads_per_rank(cfg: ModelConfig, tp: int = 1) -> int:
    """KV heads one rank holds: tensor parallelism splits them (a head never splits)."""
    return max(1, math.ceil(cfg.n_kv_heads / max(1, tp)))


def position_bytes(cfg: ModelConfig, dtype: torch.dtype | str, tp: int = 1) -> int:
    """Bytes of one cached position: K and V of every layer."""
    return 2 * cfg.n_layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * dtype_bytes(dtype)


def kv_bytes_per_prompt(cfg: ModelConfig, prefix_lens: Sequence[int], n_rows: int, budget: int,
                        dtype: torch.dtype | str, tp: int = 1) -> int:
    """One prompt's KV cache on one rank: `prefix_lens` (one per stream kind) stored once, plus
    `n_rows` suffix rows (candidates x streams) of `budget` positions each."""
    return (sum(prefix_lens) + n_rows * budget) * position_bytes(cfg, dtype, tp)


def weight_params(cfg: ModelConfig) -> int:
    """Parameters of the decoder: embeddings, the output head (unless tied) and every layer's
    attention, MLP and norms."""
    d, hd = cfg.d_model, cfg.head_dim
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = d * cfg.d_ff * mlp_mats
    if cfg.bias:
        attn += hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + d
        mlp += cfg.d_ff * (mlp_mats - 1) + d
    norms = 2 * d * (2 if cfg.norm == "layernorm" else 1) if cfg.norm_affine else 0
    qk = 2 * hd * (cfg.n_heads + cfg.n_kv_heads) if cfg.qk_norm else 0
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    learned = cfg.max_seq_len * d if cfg.pos_encoding == "learned" else 0
    final = d * (2 if cfg.norm == "layernorm" else 1) if cfg.norm_affine else 0
    return cfg.n_layers * (attn + mlp + norms + qk) + embed + learned + final


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype | str, tp: int = 1) -> int:
    """The decoder's weights on one rank (tensor parallelism splits them ~evenly)."""
    return weight_params(cfg) * dtype_bytes(dtype) // max(1, tp)


def kv_budget(total_memory: int | None, weights: int, reserve: int = WORKSPACE_RESERVE) -> int:
    """Bytes the KV caches of one step may take: a GPU's total memory less the weights and the
    workspace reserve; a CPU's (total_memory None) fixed CPU_KV_BUDGET."""
    if total_memory is None:
        return CPU_KV_BUDGET
    return max(0, total_memory - weights - reserve)


def prompts_per_step(kv_per_prompt: int, budget: int, *, cap: int = MAX_PROMPTS_PER_STEP,
                     override: int | None = None) -> int:
    """Whole prompts per sampler step: as many as `budget` bytes of KV hold, in [1, cap];
    `override` (--batch-size) wins."""
    if override:
        return int(override)
    return max(1, min(cap, budget // max(1, kv_per_prompt)))


# ----------------------------------------------------------------------------- the roofline
@dataclass(frozen=True)
class Roofline:
    """A GPU's dense bf16 peak and HBM bandwidth (the vendors' data sheets, SXM parts)."""

    name: str
    hbm_bytes_per_s: float
    peak_flops: float
    memory: int  # bytes, as sold ("80 GB")


ROOFLINES = {  # matched against torch.cuda.get_device_properties(dev).name
    "H200": Roofline("NVIDIA H200", 4.8e12, 989e12, 141 * 10**9),
    "H100": Roofline("NVIDIA H100", 3.35e12, 989e12, 80 * 10**9),
    "A100": Roofline("NVIDIA A100", 2.0e12, 312e12, 80 * 10**9),
    "L40S": Roofline("NVIDIA L40S", 0.864e12, 362e12, 48 * 10**9),
}
REFERENCE = ROOFLINES["H100"]  # what a CPU run's plan models, so the cost on a GPU is known ahead


def roofline_for(device_name: str | None) -> tuple[Roofline, bool]:
    """(the roofline, whether it is the device's own) for a CUDA device name; the H100 reference
    for a CPU or an unknown GPU."""
    for key, roof in ROOFLINES.items():
        if device_name and key in device_name.upper():
            return roof, True
    return REFERENCE, False


@dataclass(frozen=True)
class StepShape:
    """What one prompt asks of a step (per rank)."""

    prefix_lens: tuple[int, ...]  # one per stream kind
    n_rows: int  # candidates x streams
    budget: int  # decode steps (image tokens, or max_new_tokens)


def modelled_seconds(cfg: ModelConfig, shape: StepShape, prompts: int, n_prompts: int, dtype: torch.dtype | str,
                     roof: Roofline, tp: int = 1) -> float:
    """GPU-seconds (all tp ranks) to decode `n_prompts` prompts `prompts` at a time: per chunk one
    prefill of every prefix, then `budget` decode steps, each max(bytes / bandwidth, FLOPs / peak)
    with the weights and the KV positions read (the suffixes half full on average) as bytes."""
    weights = weight_bytes(cfg, dtype, tp)
    pos = position_bytes(cfg, dtype, tp)
    matmul_flops = 2 * weight_params(cfg) / max(1, tp)  # per token
    attn_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim / max(1, tp)  # per (query, key) pair
    prefix = sum(shape.prefix_lens)
    prefill_flops = prompts * sum(n * matmul_flops + n * n / 2 * attn_flops for n in shape.prefix_lens)
    prefill = max((weights + prompts * prefix * pos) / roof.hbm_bytes_per_s, prefill_flops / roof.peak_flops)
    rows = prompts * shape.n_rows
    read = weights + prompts * (prefix + shape.n_rows * shape.budget / 2) * pos
    per_row_prefix = prefix / max(1, len(shape.prefix_lens))
    flops = rows * (matmul_flops + (per_row_prefix + shape.budget / 2) * attn_flops)
    step = max(read / roof.hbm_bytes_per_s, flops / roof.peak_flops)
    chunks = math.ceil(n_prompts / max(1, prompts))
    return tp * chunks * (prefill + shape.budget * step)
