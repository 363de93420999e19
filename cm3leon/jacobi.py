"""Speculative Jacobi decoding (SJD, Teng et al. 2024, arXiv 2410.01699) of image tokens.

Each forward feeds every row a window of W tokens: the sample's last committed token and W-1
drafted ones. The forward gives the target distribution p at every window position (guidance,
temperature, top-k and top-p applied exactly as in plain decoding). Draft token d at a position,
drawn from q, is accepted with probability min(1, p(d)/q(d)); at the first rejection the position
is resampled from norm(max(0, p - q)) (after W-1 acceptances, from p: a bonus token). That is
speculative sampling, so every committed token has plain decoding's distribution, whatever q is.
The positions after the commit are drafted again from this forward's p (the Jacobi update), and
positions the window reaches for the first time get a uniformly random image code (SJD's "random"
initialisation, q = uniform). All streams of a sample are fed the same tokens.

Randomness is counter-based: every uniform is hash(seed, candidate ^ purpose, position), so a
sample's image depends on its seed only, never on its batch (a position is tested once; its
draft uniform is reused when the position is drafted again, which speculative sampling allows:
a draft needs only to follow its q given the committed tokens).

KV rollback per row: the suffix slots are shared, so the window is written at slot S (the longest
row's length) for every row and then each row's window is copied to its own length L; slots
between a row's L and S are masked. The shared prefix is never touched. Finished rows stay in the
batch until it ends (they are fed, their results discarded).
"""

from __future__ import annotations

import torch

from .attention import PrefixSuffixCache
from .counter_rng import sample_uniforms
from .processors import apply_guidance, top_k_filter

# purposes of the uniforms (folded into the candidate key; plain decoding uses purpose 0)
DRAFT, ACCEPT, RESIDUAL, INIT = 1, 2, 3, 4


def _uniforms(batch, n: int, purpose: int, device) -> torch.Tensor:
    return sample_uniforms([s.seed for s in batch], [s.candidate ^ (purpose << 48) for s in batch], n, device)


def target_probs(logits: torch.Tensor, n_streams: int, sampling) -> torch.Tensor:
    """[n_streams * b, T, V] float32 logits of every stream -> [b, T, V] the distribution plain
    decoding samples from: guided, tempered, top-k, top-p (the nucleus of the stable descending
    sort, as processors.sample_from_logits cuts it), normalised."""
    per_stream = logits.view(n_streams, -1, *logits.shape[1:])
    uncond = per_stream[1] if n_streams > 1 else None
    image_cond = per_stream[2] if n_streams > 2 else None
    guided = apply_guidance(per_stream[0], uncond, sampling.cfg_scale, image_cond, sampling.image_cfg_scale)
    if sampling.greedy:
        return torch.nn.functional.one_hot(guided.argmax(-1), guided.shape[-1]).float()
    probs = torch.softmax(top_k_filter(guided / sampling.temperature, sampling.top_k), dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(before >= sampling.top_p, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def sample_codes(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of [..., V] distributions in code order, one uniform per distribution."""
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    target = (uniforms.reshape(-1).to(cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    # rounding at the top of the CDF must not land past the last token with probability > 0
    last = flat.shape[-1] - 1 - (flat > 0).flip(-1).long().argmax(-1)
    return torch.minimum(idx, last).view(probs.shape[:-1])


def forward_window(model, tokens: torch.Tensor, cache: PrefixSuffixCache, base: torch.Tensor,
                   lengths: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` [N, W] to every row after its own `lengths` [N] suffix tokens; returns the
    float32 logits [N, W, V] and leaves each row's window KV at slots [L, L+W) of its suffix.

    The window is written at the shared slots [S, S+W), S = max(lengths), where query t of row n
    sees its prefix, its suffix slots below L_n and window slots S..S+t; then each row's window is
    copied down to L_n (rows already at S copy onto themselves)."""
    N, W = tokens.shape
    S = int(lengths.max())
    kv_len = S + W
    new = torch.arange(W, device=tokens.device)
    positions = (base + lengths)[:, None] + new
    positions = positions.clamp_max(model.config.max_seq_len - 1)  # past an image's end: unused outputs
    h = model._embed(tokens, positions)
    rope = model._rope(positions)
    group = model.layers[0].attention.n_heads // model.local_kv_heads
    t = new.repeat(group)  # query m = g * W + t
    keys = torch.arange(kv_len, device=tokens.device)
    mask = (keys[None, None, :] < lengths[:, None, None]) | (
        (keys[None, None, :] >= S) & (keys[None, None, :] <= S + t[None, :, None]))
    mask = mask[:, None]  # [N, 1, G*W, kv_len]
    slots = S + new
    for i, layer in enumerate(model.layers):
        h = layer(h, rope, None, cache.layer(i, mask, kv_len), slots, kv_len)
    rows = torch.arange(N, device=tokens.device)[:, None]
    dst = lengths[:, None] + new
    for buf in (*cache.k, *cache.v):  # the per-row rollback: each row's window moves to its length
        buf[rows, :, dst] = buf[:, :, S:S + W].transpose(1, 2).clone()
    return model.head(h, head_weight).float()


class _Window:
    """One batch's draft window: per sample the committed count n, the W-1 drafted codes for
    positions n..n+W-2 and the distributions q they were drawn from."""

    def __init__(self, b: int, W: int, V: int, device):
        self.n = torch.zeros(b, dtype=torch.long, device=device)
        self.q = torch.full((b, W - 1, V), 1.0 / V, device=device)
        self.codes = torch.zeros(b, W - 1, dtype=torch.long, device=device)


def _draft(win: _Window, p: torch.Tensor | None, first: torch.Tensor, u_draft, u_init) -> None:
    """Draft positions n..n+W-2: from p[:, i] where this forward covered the position (i = index
    in p, `first` = p's index of position n), uniformly at random where it did not."""
    b, Wm1, V = win.q.shape
    pos = win.n[:, None] + torch.arange(Wm1, device=win.n.device)
    idx = first[:, None] + torch.arange(Wm1, device=win.n.device)
    if p is None:
        covered = torch.zeros_like(idx, dtype=torch.bool)
        win.q.fill_(1.0 / V)
    else:
        covered = idx < p.shape[1]
        gathered = p.gather(1, idx.clamp_max(p.shape[1] - 1)[..., None].expand(b, Wm1, V))
        win.q = torch.where(covered[..., None], gathered, torch.full_like(gathered, 1.0 / V))
    u = torch.where(covered, u_draft.gather(1, pos), u_init.gather(1, pos))
    win.codes = sample_codes(win.q, u)


def accepts(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """SJD's test: accept a draft with probability min(1, p(d) / q(d)) (u < p/q without dividing)."""
    return u * q < p


def _verify(win: _Window, p: torch.Tensor, u: dict, forced: torch.Tensor, columns: torch.Tensor):
    """The speculative test of the drafts against p [b, W, V]: (a [b] drafts accepted, the token
    id committed after them: resampled from norm(max(0, p - q)) at the first rejection, from p
    after W-1 acceptances)."""
    b, Wm1, V = win.q.shape
    pos = win.n[:, None] + torch.arange(Wm1, device=p.device)
    pd = p[:, :Wm1].gather(-1, win.codes[..., None])[..., 0]
    qd = win.q.gather(-1, win.codes[..., None])[..., 0]
    ok = accepts(u[ACCEPT].gather(1, pos).float(), pd, qd) | (forced.gather(1, pos) >= 0)
    a = ok.long().cumprod(1).sum(1)
    pa = p.gather(1, a[:, None, None].expand(b, 1, V))[:, 0]
    qa = win.q.gather(1, a.clamp_max(Wm1 - 1)[:, None, None].expand(b, 1, V))[:, 0] * (a < Wm1)[:, None]
    resid = (pa - qa).clamp_min(0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, pa)  # p == q to rounding: p itself
    at = (win.n + a)[:, None]
    x = columns[sample_codes(resid, u[RESIDUAL].gather(1, at)[:, 0])]
    fx = forced.gather(1, at)[:, 0]
    return a, torch.where(fx >= 0, fx, x)


def _draft_ids(win: _Window, forced: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    pos = win.n[:, None] + torch.arange(win.codes.shape[1], device=win.n.device)
    f = forced.gather(1, pos)
    return torch.where(f >= 0, f, columns[win.codes])


def run_jacobi_batch(sampler, requests, batch, sampling, non_finite: type[Exception]) -> list[tuple[list[int], bool, int, int]]:
    """One image batch by SJD: (codes of the free positions, True, the batch's forwards, the
    forwards this sample needed) per sample, like Sampler.collect plus the two counters.
    `non_finite`: the error raised on NaN/inf logits (the sampler's NonFiniteLogitsError)."""
    W = sampling.jacobi_window
    state, plan = sampler.prefill(requests, batch, sampling, "image", extra_slots=W)
    model, cache, dev, cols = sampler.model, state.cache, sampler.device, plan.columns
    b, ns, V = len(batch), plan.n_streams, cols.shape[0]
    width = state.budget + 2 * W
    forced = torch.full((b, width), -1, dtype=torch.long, device=dev)
    forced[:, :state.budget] = state.forced
    limits = state.limits
    u = {k: _uniforms(batch, width, k, dev) for k in (DRAFT, ACCEPT, RESIDUAL, INIT)}
    base = cache.next_pos.clone()  # each row's prefix length: suffix token j sits at base + j
    model._check_position(int(base.max()) + state.budget - 1)
    out = torch.full((b, width), -1, dtype=torch.long, device=dev)
    win = _Window(b, W, V, dev)
    p0 = target_probs(state.logits[:, None], ns, sampling)[:, 0]
    last = cols[sample_codes(p0, u[RESIDUAL][:, 0])]
    last = torch.where(forced[:, 0] >= 0, forced[:, 0], last)
    out[:, 0] = last
    win.n.fill_(1)
    _draft(win, None, win.n, u[DRAFT], u[INIT])
    forwards, own = 0, torch.zeros(b, dtype=torch.long, device=dev)
    done = win.n >= limits
    steps = torch.arange(W, device=dev)
    while True:
        all_done = bool(done.all())
        if all_done:
            break
        tokens = torch.cat([last[:, None], _draft_ids(win, forced, cols)], 1)
        logits = forward_window(model, tokens.repeat(ns, 1), cache, base, (win.n - 1).repeat(ns), plan.head_weight)
        if not bool(torch.isfinite(logits.sum(-1)).all()):
            raise non_finite(f"non-finite logits (NaN/inf) in a jacobi forward for request(s) "
                                       f"{sorted({s.request for s in batch})[:5]}: the model or its weights are broken")
        p = target_probs(logits, ns, sampling)
        a, x = _verify(win, p, u, forced, cols)
        seg = torch.cat([_draft_ids(win, forced, cols), x[:, None]], 1).scatter(1, a[:, None], x[:, None])
        idx = win.n[:, None] + steps
        keep = (steps[None] <= a[:, None]) & ~done[:, None]
        out.scatter_(1, idx, torch.where(keep, seg, out.gather(1, idx)))
        last = torch.where(done, last, x)
        forwards += 1
        own += (~done).long()
        win.n = torch.where(done, win.n, torch.minimum(win.n + a + 1, limits))
        _draft(win, p, a + 1, u[DRAFT], u[INIT])
        done = win.n >= limits
    codes = sampler.token_to_code.tolist()
    rows, fixed, lims, owns = out.tolist(), forced.tolist(), limits.tolist(), own.tolist()
    return [([codes[t] for t, f in zip(row[:n], fx[:n]) if f < 0], True, forwards, o)
            for row, fx, n, o in zip(rows, fixed, lims, owns)]
