"""Scoring many continuations of one prompt: log p(continuation | prompt) for each.

Visual dialog ranks 100 candidate answers per round by their likelihood after one shared prompt
(image + caption + history + question). `score_continuations` prefills that prompt ONCE as the
shared prefix of a PrefixSuffixCache and appends the candidates as its rows in one multi-token
`extend` per chunk: every candidate attends over the prompt's keys and values (stored once) and
its own tokens, so the prompt is neither recomputed nor copied per candidate. A position's logits
never depend on later tokens, so right-padding the shorter candidates changes none of the real
ones. The scores equal `sampling.continuation_logprobs` run once per candidate (full forwards) to
float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import NonFiniteLogitsError
from .transformer import Transformer


@torch.no_grad()
def score_continuations(model: Transformer, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                        *, pad_id: int = 0, rows: int | None = None) -> list[float]:
    """log p(continuation | prompt), summed over each continuation's tokens, one per continuation.

    `rows`: candidates scored together (their suffix KV is rows x longest candidate); None scores all
    of them in one `extend`."""
    if not prompt:
        raise ValueError("score_continuations needs a non-empty prompt (the first token is predicted from it)")
    if not continuations:
        return []
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = model.tok_embeddings.weight.device
    rows = rows or len(continuations)
    prompt_t = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
    length = torch.tensor([len(prompt)], device=device)
    out: list[float] = []
    for start in range(0, len(continuations), rows):
        chunk = continuations[start:start + rows]
        width = max(len(c) for c in chunk)
        cache = model.new_prefix_cache([len(prompt)], 1, len(chunk), width)
        first = model.prefill_prefix(0, prompt_t, length, cache).float()  # [1, V]: scores each first token
        cand = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for i, c in enumerate(chunk):
            cand[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        cand = cand.to(device)
        live = (torch.arange(width)[None] < torch.as_tensor([len(c) for c in chunk])[:, None]).to(device)
        # the logits before token j score it: the prompt's last position, then the candidate's own
        rest = model.extend(cand[:, :-1], cache).float() if width > 1 else first.new_zeros(len(chunk), 0, first.shape[-1])
        logits = torch.cat([first.expand(len(chunk), 1, -1), rest], dim=1)  # [rows, width, V]
        if bool((live & ~torch.isfinite(logits).all(dim=-1)).any()):
            raise NonFiniteLogitsError("the model produced non-finite logits while scoring continuations")
        logp = torch.log_softmax(logits, dim=-1).gather(-1, cand[..., None])[..., 0]
        out += torch.where(live, logp, 0.0).sum(dim=1).tolist()
    return out
