"""Decode attention over one shared prefix per prompt plus each row's own suffix.

A sampler batch is P prompts x R rows (R = candidates x streams). The rows of one prompt and one
stream kind (conditional, unconditional, image-only) share that prompt's prefix, so its keys and
values are stored once, `[P, Hkv, Lk, D]` per layer and kind, and each row stores only its own
generated tokens, `[P*R, Hkv, budget, D]`. A row's attention is the softmax over prefix ∪ suffix,
computed as two partial attentions merged exactly by their log-sum-exps:

    out = (o_p * exp(lse_p - lse) + o_s * exp(lse_s - lse)),  lse = logaddexp(lse_p, lse_s)

The prefix part folds the rows of one prefix (its candidates) and the GQA group into the query
length: queries `[P, Hkv, G*C*T, D]` against `[P, Hkv, Lk, D]`, one matmul-attention per kind that
reads each prefix once and never expands K/V. The suffix part is per row, `[N, Hkv, G*T, D]`.

Why the partial attentions are computed here (scores -> max/logsumexp -> weights @ V) rather than
by SDPA: the merge needs each part's log-sum-exp, which no public SDPA returns, and FlexAttention's
`return_lse` needs the compiler on every device. The queries of a decode step are few (G*C*T per
prefix), so the score tensors are small; scores and statistics are float32 (on CUDA the bf16
matmuls write float32 through `out_dtype`, so no float32 copy of the cache is made).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

# ----------------------------------------------------------------------------- the cache
@dataclass
class PrefixSuffixCache:
    """Keys/values of a decode batch: per stream kind the prefixes of its P prompts, right-padded
    (`prefix_valid` marks real tokens), and per row its own suffix slots.

    Rows are stream-kind-major, then prompt, then candidate: row = (kind * P + prompt) * C + candidate,
    C = `rows_per_prefix`. Every row writes its suffix slots in step (slot `slot` at a time), so a
    suffix slot is filled iff it is below `slot`: no per-row mask is stored."""

    prefix_k: list[list[torch.Tensor]]  # [kind][layer] -> [P, Hkv, Lk(kind), D]
    prefix_v: list[list[torch.Tensor]]
    prefix_valid: list[torch.Tensor]  # [kind] -> [P, Lk(kind)] bool
    k: list[torch.Tensor]  # [layer] -> [N, Hkv, budget, D]
    v: list[torch.Tensor]
    next_pos: torch.Tensor  # [N] long: position id of each row's next token (its prefix length + suffix index)
    slot: torch.Tensor  # [1] long on the device: the next suffix slot to write
    rows_per_prefix: int
    length: int = 0  # suffix slots filled (host mirror of `slot`)
    max_next_pos: int = 0  # host mirror of next_pos.max()

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def n_prompts(self) -> int:
        return self.prefix_valid[0].shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [*(t for kind in self.prefix_k for t in kind), *(t for kind in self.prefix_v for t in kind),
                *self.prefix_valid, *self.k, *self.v, self.next_pos, self.slot]

    def reset(self) -> None:
        """Empty the cache in place (same tensors: a compiled step keeps its static addresses).
        Zeroed, not just marked empty: a masked slot must not hold a broken batch's NaNs (0 * NaN)."""
        for t in self.tensors():
            t.zero_()
        self.length = self.max_next_pos = 0

    def layer(self, i: int, suffix_mask: torch.Tensor, kv_len: int) -> "LayerKV":
        masks = [v[:, None, None, :] for v in self.prefix_valid]
        return LayerKV([k[i] for k in self.prefix_k], [v[i] for v in self.prefix_v], masks,
                       self.k[i], self.v[i], suffix_mask, kv_len, self.rows_per_prefix)


class LayerKV(NamedTuple):
    """One layer's view of a PrefixSuffixCache, handed to Attention.forward."""

    prefix_k: list[torch.Tensor]
    prefix_v: list[torch.Tensor]
    prefix_mask: list[torch.Tensor]  # [P, 1, 1, Lk] bool
    k: torch.Tensor  # the suffix buffers (written in place)
    v: torch.Tensor
    suffix_mask: torch.Tensor  # [1, 1, G*T, kv_len] bool
    kv_len: int
    rows_per_prefix: int


def suffix_mask(slot: torch.Tensor, n_new: int, group: int, kv_len: int) -> torch.Tensor:
    """[1, 1, group*n_new, kv_len]: query (g, t) sees suffix slots up to its own, slot + t."""
    t = torch.arange(n_new, device=slot.device).repeat(group)  # query index m = g*T + t
    return (torch.arange(kv_len, device=slot.device)[None, :] <= (slot + t)[:, None])[None, None]


# ----------------------------------------------------------------------------- the attention
class _KVReadCounter:
    def __init__(self) -> None:
        self.positions = 0  # sum over partial-attention calls of batch x keys (per layer call)
        self.calls = 0


_counter: _KVReadCounter | None = None


@contextmanager
def count_kv_reads() -> Iterator[_KVReadCounter]:
    """Count the key positions the decode attention reads (eager runs; the sampler bench uses it)."""
    global _counter
    _counter = _KVReadCounter()
    try:
        yield _counter
    finally:
        _counter = None


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result and float32 accumulation, without a float32 copy of `b` on CUDA."""
    if b.dtype == torch.float32:
        return torch.matmul(a.float(), b)
    if b.is_cuda:
        out = torch.bmm(a.to(b.dtype).flatten(0, 1), b.flatten(0, 1), out_dtype=torch.float32)
        return out.unflatten(0, a.shape[:2])
    return torch.matmul(a.float(), b.float())  # CPU half precision: no out_dtype kernel


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v over the unmasked keys, and its log-sum-exp; both float32.

    q [B, Hkv, M, D]; k, v [B, Hkv, L, D]; mask (True = attend) broadcasts to [B, Hkv, M, L] and
    leaves every query at least one key. Returns ([B, Hkv, M, D], [B, Hkv, M])."""
    if _counter is not None:
        _counter.positions += k.shape[0] * k.shape[2]
        _counter.calls += 1
    scores = _matmul_f32(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    weights = (scores - peak).exp()
    total = weights.sum(-1, keepdim=True)
    out = _matmul_f32(weights, v) / total
    return out, (peak + total.log()).squeeze(-1)


def prefix_suffix_attention(q: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """Attention of rows q [N, H, T, D] over their prefix (per kind) and their own suffix, merged
    by log-sum-exp; returns [N, H, T, D] in q's dtype."""
    N, H, T, D = q.shape
    Hkv = kv.k.shape[1]
    G, C = H // Hkv, kv.rows_per_prefix
    # suffix: each row its own slots; the GQA group folded into the query length
    o_s, lse_s = partial_attention(q.reshape(N, Hkv, G * T, D), kv.k[:, :, :kv.kv_len], kv.v[:, :, :kv.kv_len],
                                   kv.suffix_mask)
    o_s, lse_s = o_s.view(N, H, T, D), lse_s.view(N, H, T)
    outs, lses = [], []
    rows = N // len(kv.prefix_k)
    for i, (pk, pv, mask) in enumerate(zip(kv.prefix_k, kv.prefix_v, kv.prefix_mask)):
        P = pk.shape[0]
        # a prefix's C rows and the GQA group become its queries: [P, Hkv, G*C*T, D]
        qi = q[i * rows:(i + 1) * rows].reshape(P, C, Hkv, G, T, D).permute(0, 2, 3, 1, 4, 5).reshape(P, Hkv, -1, D)
        o, lse = partial_attention(qi, pk, pv, mask)
        outs.append(o.view(P, Hkv, G, C, T, D).permute(0, 3, 1, 2, 4, 5).reshape(rows, H, T, D))
        lses.append(lse.view(P, Hkv, G, C, T).permute(0, 3, 1, 2, 4).reshape(rows, H, T))
    o_p, lse_p = torch.cat(outs), torch.cat(lses)
    lse = torch.logaddexp(lse_p, lse_s)
    y = o_p * (lse_p - lse).exp()[..., None] + o_s * (lse_s - lse).exp()[..., None]
    return y.to(q.dtype)


# ----------------------------------------------------------------------------- which SDPA kernel
def prefill_backend(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, n_heads: int = 64,
                    n_kv_heads: int = 8, head_dim: int = 128, length: int = 64) -> str:
    """The SDPA backend a prefix prefill gets at this head shape (default: Chameleon-30B's): the
    first of SDPA's priority order that accepts the call as `Transformer.prefill_prefix` makes it
    (causal, no explicit mask, grouped KV heads broadcast with enable_gqa). "MATH" would mean K/V
    expanded by the group size."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, n_heads, length, head_dim, device=device, dtype=dtype)
    kv = torch.zeros(1, n_kv_heads, length, head_dim, device=device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                                                 enable_gqa=n_heads != n_kv_heads)
            return backend.name
        except RuntimeError:
            continue
    return "none"
