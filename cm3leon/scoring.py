"""Scoring many continuations of one prompt: log p(continuation | prompt) for each.

Visual dialog ranks 100 candidate answers per round by their likelihood after one shared prompt
(image + caption + history + question). `score_continuations` runs that prompt through the model
ONCE, then scores every candidate against the prompt's keys and values: the batch-1 cache is
copied into one row per candidate and the candidates are fed token by token (teacher forcing),
a finished candidate's later steps ignored. The scores equal `sampling.continuation_logprobs`
run once per candidate (full forwards) to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import NonFiniteLogitsError
from .transformer import KVCache, Transformer


def _replicate(cache: KVCache, rows: int) -> KVCache:
    """A cache of `rows` rows, each a copy of the batch-1 `cache` (its filled slots and counters)."""
    return KVCache(k=[t.expand(rows, -1, -1, -1).clone() for t in cache.k],
                   v=[t.expand(rows, -1, -1, -1).clone() for t in cache.v],
                   valid=cache.valid.expand(rows, -1).clone(), next_pos=cache.next_pos.expand(rows).clone(),
                   slot=cache.slot.clone(), length=cache.length, max_next_pos=cache.max_next_pos)


@torch.no_grad()
def score_continuations(model: Transformer, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                        *, pad_id: int = 0, rows: int | None = None) -> list[float]:
    """log p(continuation | prompt), summed over each continuation's tokens, one per continuation.

    `rows`: candidates scored together (the KV memory is rows x (prompt + longest candidate));
    None scores all of them in one batch."""
    if not prompt:
        raise ValueError("score_continuations needs a non-empty prompt (the first token is predicted from it)")
    if not continuations:
        return []
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = model.tok_embeddings.weight.device
    longest = max(len(c) for c in continuations)
    tokens = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
    shared = model.new_cache(1, len(prompt) + longest)
    first = model.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), shared, last_only=True)[:, 0].float()
    rows = rows or len(continuations)
    out: list[float] = []
    for start in range(0, len(continuations), rows):
        chunk = continuations[start:start + rows]
        width = max(len(c) for c in chunk)
        cand = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for i, c in enumerate(chunk):
            cand[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        cand = cand.to(device)
        live = (torch.arange(width)[None] < torch.as_tensor([len(c) for c in chunk])[:, None]).to(device)
        total = torch.zeros(len(chunk), device=device)
        bad = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        cache = _replicate(shared, len(chunk))
        logits = first.expand(len(chunk), -1)
        for j in range(width):  # the logits before token j score it; then token j is fed (pad once finished)
            bad |= live[:, j] & ~torch.isfinite(logits).all(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, cand[:, j:j + 1])[:, 0]
            total += torch.where(live[:, j], logp, 0.0)
            if j + 1 < width:
                logits = model.step(cand[:, j], cache).float()
        if bool(bad.any()):
            raise NonFiniteLogitsError("the model produced non-finite logits while scoring continuations")
        out += total.tolist()
    return out
