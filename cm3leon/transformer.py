"""The decoder: one Transformer for the CM3leon (OPT-style) and Chameleon (LLaMA-style) variants.

Parameter names follow Meta's original Chameleon checkpoint (tok_embeddings, layers.i.attention.wq,
...), RoPE uses Meta's interleaved-pair convention, so Meta's weights load as they are and the HF
conversion's q/k permutation is undone on import (checkpoint.py).

Two decode paths share the blocks. The sampler's: each prompt's prefix is prefilled once per
stream kind (`prefill_prefix`, right-padded, plain causal attention) into a PrefixSuffixCache, and
its rows append tokens with `extend` (one or more per row), attending over the shared prefix and
their own suffix (cm3leon/attention.py). The plain one, for scoring, tests and the bench's previous
engine: LEFT-padded batches (`prefill`/`step` over a KVCache), where `valid` marks real tokens,
positions count real tokens only and padded keys are masked, so a row's logits do not depend on
its padding or its batch neighbours.

Decoding is built for a GPU that the host should never wait on: a step reads no device value
(the position bound is tracked on the host, the write slot is a device counter), attends over the
filled slots only (or a caller's fixed bucket of them, so a compiled step has static shapes), and
lets SDPA broadcast grouped KV heads (`enable_gqa`) instead of copying the cache per layer.
Attention heads are read from the weights' local shapes, so a tensor-parallel shard (see
tensor_parallel.py) runs the same code on its slice of the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LayerKV, PrefixSuffixCache, prefix_suffix_attention, suffix_mask
from .config import ModelConfig


# ----------------------------------------------------------------------------- norms
class Norm(nn.Module):
    """LayerNorm (CM3leon: no learnable parameters) or RMSNorm (Chameleon: weight only; Gemma:
    `offset` 1, i.e. the stored weight w scales by 1 + w)."""

    def __init__(self, dim: int, kind: str, eps: float, affine: bool, offset: float = 0.0):
        super().__init__()
        self.kind, self.eps, self.dim, self.offset = kind, eps, dim, offset
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if (affine and kind == "layernorm") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        # RMSNorm in float32 as Chameleon/LLaMA do, then back to the input dtype before the weight.
        xf = x.float()
        yf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset and self.weight is not None:  # Gemma scales in float32, then casts
            return (yf * (self.offset + self.weight.float())).to(x.dtype)
        y = yf.to(x.dtype)
        return y * self.weight if self.weight is not None else y


class HeadNorm(nn.Module):
    """Chameleon's qk-norm: LayerNorm over head_dim with a separate weight and bias per head."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps, self.head_dim = eps, head_dim
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H, D]
        y = F.layer_norm(x.float(), (self.head_dim,), eps=self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()  # [max_len, head_dim/2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D/2]. Rotates the interleaved pairs (x[2i], x[2i+1])."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Preallocated keys/values for every layer; `valid` masks left padding and unfilled slots."""

    # one [B, Hkv, S, D] tensor per layer, not slices of one [L, ...] tensor: a compiled step that
    # writes a slice of a shared base is functionalised into a copy of the whole base per layer
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [B, S] bool: slot holds a real token
    next_pos: torch.Tensor  # [B] position id of the next token of each row
    slot: torch.Tensor  # [1] long on the device: the next slot to write (a tensor so a compiled step never recompiles)
    length: int = 0  # slots filled so far (same for every row: rows are left-padded); host mirror of `slot`
    max_next_pos: int = 0  # host mirror of next_pos.max(): bounds positions without reading the device

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self) -> None:
        """Empty the cache in place (same tensors, so a compiled step keeps its static addresses).
        Keys and values are zeroed too: masked slots must not hold a broken batch's NaNs."""
        for t in (*self.k, *self.v, self.valid, self.next_pos, self.slot):
            t.zero_()
        self.length = self.max_next_pos = 0


# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=cfg.bias)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=cfg.bias)
        self.q_normalization = HeadNorm(cfg.n_heads, hd, cfg.qk_norm_eps) if cfg.qk_norm else None
        self.k_normalization = HeadNorm(cfg.n_kv_heads, hd, cfg.qk_norm_eps) if cfg.qk_norm else None
        self.use_rope = cfg.pos_encoding == "rope"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: slice | torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """`slots`: where this chunk goes in the cache (a slice, or a [1] slot tensor for one token);
        `kv_len`: how many leading cache slots the queries attend over (`mask` covers exactly those)."""
        B, T, _ = x.shape
        hd = self.head_dim
        # -1 heads: a tensor-parallel shard holds n_heads / tp of them
        q = self.wq(x).view(B, T, -1, hd)
        k = self.wk(x).view(B, T, -1, hd)
        v = self.wv(x).view(B, T, -1, hd)
        if self.q_normalization is not None:
            q, k = self.q_normalization(q), self.k_normalization(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if isinstance(kv, LayerKV):  # a PrefixSuffixCache: write the rows' suffix, attend prefix + suffix
            kv.k[:, :, slots] = k
            kv.v[:, :, slots] = v
            return self.wo(prefix_suffix_attention(q, kv).transpose(1, 2).reshape(B, T, -1))
        if kv is not None:  # write this chunk into the cache, attend over its filled part
            cache_k, cache_v = kv
            # a [1] slot tensor becomes index_put_, which inductor rewrites in place; index_copy_
            # made it copy the whole cache every compiled step
            cache_k[:, :, slots] = k
            cache_v[:, :, slots] = v
            k, v = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
        # grouped KV heads broadcast inside SDPA: no repeat_interleave copy of the cache per step.
        # mask=None is plain causal attention from slot 0 (a prefix prefill): without an explicit mask
        # SDPA can take its flash kernel, which broadcasts GQA heads (the math kernel expands K/V)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp in ("swiglu", "geglu") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.kind == "geglu":  # Gemma: gelu with the tanh approximation gates the up projection
            return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))
        act = F.gelu if self.kind == "gelu" else F.relu
        return self.w2(act(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_affine, cfg.norm_weight_offset)
        self.ffn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_affine, cfg.norm_weight_offset)

    def forward(self, x, rope, mask, kv=None, slots=None, kv_len=None):
        if self.swin_norm:  # normalise the sublayer's output (Chameleon-30B's stabiliser)
            h = x + self.attention_norm(self.attention(x, rope, mask, kv, slots, kv_len))
            return h + self.ffn_norm(self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), rope, mask, kv, slots, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- model
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_affine, cfg.norm_weight_offset)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 style init; only matters for models trained from scratch (the demo).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- shared pieces
    def _check_position(self, max_pos: int) -> None:
        if max_pos >= self.config.max_seq_len:
            raise ValueError(f"sequence position {max_pos} exceeds max_seq_len={self.config.max_seq_len}")

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.config.embedding_multiplier != 1.0:  # Gemma: sqrt(d), rounded to the embedding's dtype
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype, device=h.device)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        return h

    def _rope(self, positions: torch.Tensor):
        if self.config.pos_encoding != "rope":
            return None
        return self.rope_cos[positions], self.rope_sin[positions]

    @staticmethod
    def _positions(valid: torch.Tensor) -> torch.Tensor:
        return (valid.long().cumsum(-1) - 1).clamp_min(0)

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool mask -> SDPA's additive form (0 / -inf), made once per forward rather than by SDPA
        in every layer; the same values SDPA would make, so the same attention."""
        return torch.where(mask, 0.0, float("-inf")).to(self.tok_embeddings.weight.dtype)

    @staticmethod
    def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
        T = valid.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
        mask = causal[None] & valid[:, None, :]
        # A padding query would attend to nothing (NaN); let it see itself. Its output is never used.
        mask = mask | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
        return mask[:, None]  # [B, 1, T, T]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))

    # -- full forward (training, scoring)
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        positions = self._positions(valid)
        self._check_position(int(positions.max()))  # one sync per forward, never per decode step
        h = self._embed(tokens, positions)
        rope, mask = self._rope(positions), self._additive(self._prefill_mask(valid))
        for layer in self.layers:
            h = layer(h, rope, mask)
        return self._head(h)

    # -- incremental decoding
    @property
    def local_kv_heads(self) -> int:
        """KV heads this process holds: all of them, or n_kv_heads / tp on a tensor-parallel shard."""
        if len(self.layers) == 0:
            return self.config.n_kv_heads
        return self.layers[0].attention.n_kv_heads

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        cfg = self.config
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        shape = (batch_size, self.local_kv_heads, max_len, cfg.head_dim)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            next_pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            slot=torch.zeros(1, dtype=torch.long, device=device),
        )

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, cache: KVCache, *,
                last_only: bool = False) -> torch.Tensor:
        """Run a left-padded prompt batch [B, T] into an empty cache; returns logits [B, T, V]
        (or [B, 1, V] with `last_only`: decoding needs just the last position, and the vocabulary
        projection of every prompt position would cost as much as many decode steps)."""
        B, T = tokens.shape
        if cache.length != 0:
            raise ValueError("prefill needs an empty cache (allocate one per batch with new_cache)")
        if T > cache.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit the cache of {cache.max_len}")
        positions = self._positions(valid)
        next_pos = valid.long().sum(-1)
        # the one host read of a batch: later steps bound positions by counting on the host
        max_next = int(next_pos.max())
        self._check_position(max_next - 1)
        h = self._embed(tokens, positions)
        rope = self._rope(positions)
        cache.valid[:, :T] = valid
        # queries see the causal prefix of real tokens, over the T filled slots only
        mask = self._additive(self._prefill_mask(valid))
        slots = slice(0, T)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, (cache.k[i], cache.v[i]), slots, T)
        cache.length, cache.max_next_pos = T, max_next
        cache.next_pos.copy_(next_pos)
        cache.slot.fill_(T)
        return self._head(h[:, -1:] if last_only else h)

    def step(self, tokens: torch.Tensor, cache: KVCache, *, kv_len: int | None = None) -> torch.Tensor:
        """Append one token per row ([B]) and return the next-token logits [B, V].

        `kv_len` (default: the filled slots, this one included) lets a compiled caller attend over a
        fixed bucket of slots so the step's shapes stay static; unfilled slots are masked out."""
        self.check_extend(cache, 1, kv_len)
        logits = self.step_tensors(tokens, cache, kv_len or cache.length + 1)
        self.advance(cache)
        return logits

    @staticmethod
    def advance(cache: KVCache | PrefixSuffixCache, n_new: int = 1) -> None:
        """Host bookkeeping after `step_tensors` / `extend_tensors` (the device counters moved inside)."""
        cache.length += n_new
        cache.max_next_pos += n_new

    def step_tensors(self, tokens: torch.Tensor, cache: KVCache, kv_len: int) -> torch.Tensor:
        """The device part of `step`: reads no host state of the cache, so torch.compile captures
        it once per (batch, kv_len) shape; mutates k, v, valid, next_pos and slot in place."""
        positions = cache.next_pos[:, None]
        h = self._embed(tokens[:, None], positions)
        rope = self._rope(positions)
        cache.valid[:, cache.slot] = True
        mask = self._additive(cache.valid[:, None, None, :kv_len])  # [B, 1, 1, S]: real tokens so far, this one included
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, (cache.k[i], cache.v[i]), cache.slot, kv_len)
        cache.next_pos.add_(1)
        cache.slot.add_(1)
        return self._head(h)[:, 0]

    # -- shared-prefix decoding (the sampler's path; see cm3leon/attention.py)
    def new_prefix_cache(self, prefix_lens: list[int], n_prompts: int, rows_per_prefix: int, budget: int, *,
                         device=None, dtype=None) -> PrefixSuffixCache:
        """Empty buffers for P=`n_prompts` prompts with one prefix of `prefix_lens[kind]` slots per
        stream kind, and `rows_per_prefix` rows per prompt and kind with `budget` suffix slots each."""
        cfg = self.config
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        H, D, L = self.local_kv_heads, cfg.head_dim, cfg.n_layers

        def zeros(*shape):
            return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)]

        n_rows = len(prefix_lens) * n_prompts * rows_per_prefix
        return PrefixSuffixCache(
            prefix_k=[zeros(n_prompts, H, n, D) for n in prefix_lens], prefix_v=[zeros(n_prompts, H, n, D) for n in prefix_lens],
            prefix_valid=[torch.zeros(n_prompts, n, dtype=torch.bool, device=device) for n in prefix_lens],
            k=zeros(n_rows, H, budget, D), v=zeros(n_rows, H, budget, D),
            next_pos=torch.zeros(n_rows, dtype=torch.long, device=device),
            slot=torch.zeros(1, dtype=torch.long, device=device), rows_per_prefix=rows_per_prefix)

    def prefill_prefix(self, kind: int, tokens: torch.Tensor, lengths: torch.Tensor, cache: PrefixSuffixCache, *,
                       head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Run the P prefixes of one stream kind, RIGHT-padded `tokens` [P, Lk] with `lengths` [P] real
        tokens each, into `cache` (Lk = the kind's prefix slots); returns the next-token logits at
        each prefix's last real token, [P, V] (see `head` for `head_weight`).

        Right padding keeps the attention plain causal (pads come after every real token), so SDPA
        needs no explicit mask and can use a kernel that broadcasts GQA heads without copying K/V.
        Call it for every kind before the first `extend`; it sets the rows' next positions."""
        P, T = tokens.shape
        if cache.length != 0:
            raise ValueError("prefill_prefix needs a cache with an empty suffix")
        if T != cache.prefix_valid[kind].shape[1]:
            raise ValueError(f"prefix tokens of length {T} do not match the cache's {cache.prefix_valid[kind].shape[1]}")
        max_len = int(lengths.max())  # a host read per prefill, never per step
        self._check_position(max_len - 1)
        positions = torch.arange(T, device=tokens.device).expand(P, T)
        h = self._embed(tokens, positions)
        rope = self._rope(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None, (cache.prefix_k[kind][i], cache.prefix_v[kind][i]), slice(0, T), T)
        cache.prefix_valid[kind].copy_(positions < lengths[:, None])
        rows = P * cache.rows_per_prefix
        cache.next_pos[kind * rows:(kind + 1) * rows] = lengths.repeat_interleave(cache.rows_per_prefix)
        cache.max_next_pos = max(cache.max_next_pos, max_len)
        last = h.gather(1, (lengths - 1).clamp_min(0)[:, None, None].expand(P, 1, h.shape[-1]))
        return self.head(last, head_weight)[:, 0]

    def head(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + vocabulary projection; `weight` [V', d] projects onto those rows only, in
        float32 (the sampler's image mode: only the image codes, guided in float32)."""
        if weight is None:
            return self._head(h)
        return F.linear(self.norm(h).to(weight.dtype), weight)

    def extend(self, tokens: torch.Tensor, cache: PrefixSuffixCache, *, kv_len: int | None = None,
               head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Append `tokens` [N, T] (T >= 1 per row) to every row of a prefilled PrefixSuffixCache and
        return their next-token logits [N, T, V]: token t of a row attends over its prompt's prefix
        of its kind, the row's earlier suffix tokens and its own tokens up to t (causal).

        The multi-token append scores many continuations against one prompt's KV (e.g. 100 candidate
        answers as the rows of one prefix: `new_prefix_cache([L], 1, 100, T)`, `prefill_prefix`, then one
        `extend` of the answers right-padded to T; a position's logits never depend on later tokens, so
        the padding changes none of the real ones) or verifies drafted tokens. `kv_len` (default:
        exactly the filled suffix slots) lets a compiled caller attend over a fixed bucket of slots."""
        T = tokens.shape[1]
        self.check_extend(cache, T, kv_len)
        logits = self.extend_tensors(tokens, cache, kv_len or cache.length + T, head_weight)
        self.advance(cache, T)
        return logits

    def check_extend(self, cache: KVCache | PrefixSuffixCache, n_new: int = 1, kv_len: int | None = None) -> None:
        """The host-side checks of appending `n_new` tokens per row (`step`: 1; no device reads)."""
        if cache.length + n_new > cache.max_len:
            raise ValueError(f"KV cache is full ({cache.max_len} slots, {cache.length} filled, {n_new} new)")
        self._check_position(cache.max_next_pos + n_new - 1)
        if kv_len is not None and not cache.length + n_new <= kv_len <= cache.max_len:
            raise ValueError(f"kv_len={kv_len} must cover slot {cache.length + n_new - 1} and fit {cache.max_len} slots")

    def extend_tensors(self, tokens: torch.Tensor, cache: PrefixSuffixCache, kv_len: int,
                       head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The device part of `extend`: no host state of the cache is read, so torch.compile captures
        it once per shape; writes the suffix slots and moves next_pos and slot in place."""
        N, T = tokens.shape
        new = torch.arange(T, device=tokens.device)
        positions = cache.next_pos[:, None] + new
        h = self._embed(tokens, positions)
        rope = self._rope(positions)
        group = self.layers[0].attention.n_heads // self.local_kv_heads if len(self.layers) else 1
        mask = suffix_mask(cache.slot, T, group, kv_len)
        slots = cache.slot + new  # index_put_ with a slot tensor: written in place under inductor
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None, cache.layer(i, mask, kv_len), slots, kv_len)
        cache.next_pos.add_(T)
        cache.slot.add_(T)
        return self.head(h, head_weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def estimate_flops_per_token(cfg: ModelConfig) -> float:
    """Rough forward FLOPs per token (2 × matmul parameters); used by benchmarks."""
    d, L = cfg.d_model, cfg.n_layers
    attn = d * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    mlp = d * cfg.d_ff * (3 if cfg.mlp in ("swiglu", "geglu") else 2)
    return 2.0 * (L * (attn + mlp) + d * cfg.vocab_size)


__all__ = ["Transformer", "KVCache", "PrefixSuffixCache", "apply_rope", "rope_tables", "param_bytes", "estimate_flops_per_token"]
