"""LM examples and their packing into training rows (the tree layout).

An LM example is a prefix plus branches that each continue it (an image, then its caption and each
of its questions). All branches of one example attend to the prefix but not to each other, and each
branch's positions continue from the prefix, so a branch sees exactly the sequence the harness will
prompt with, while the image tokens are computed once instead of once per output. Examples are
packed into rows of max_seq_len with a block mask; positions restart per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..transformer import Transformer


@dataclass
class Example:
    """A prefix and branches that each continue it (see the module docstring). Loss: on the prefix
    (all but its first token) when prefix_loss, and on branch tokens whose flag is set."""

    prefix: list[int]
    branches: list[tuple[list[int], list[bool]]] = field(default_factory=list)
    prefix_loss: bool = False

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for b, _ in self.branches)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B,T]
    positions: torch.Tensor  # [B,T]
    mask: torch.Tensor  # [B,T,T] bool: query row may attend key column
    src: tuple[torch.Tensor, torch.Tensor]  # (row, col) of the logits that predict each target
    targets: torch.Tensor  # [M]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.tokens.to(device), self.positions.to(device), self.mask.to(device),
                     (self.src[0].to(device), self.src[1].to(device)), self.targets.to(device))


def pack(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """First-fit into rows of max_len tokens, longest first; examples longer than a row are dropped."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        n = len(ex)
        if n > max_len:
            continue
        for i, f in enumerate(free):
            if n <= f:
                rows[i].append(ex)
                free[i] -= n
                break
        else:
            rows.append([ex])
            free.append(max_len - n)
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    group = torch.full((B, T), -1, dtype=torch.long)  # example index within the row; -1 = padding
    branch = torch.full((B, T), -1, dtype=torch.long)  # -1 = prefix
    src_r, src_c, tgt = [], [], []
    for b, row in enumerate(rows):
        t = 0
        for g, ex in enumerate(row):
            P = len(ex.prefix)
            tokens[b, t:t + P] = torch.tensor(ex.prefix)
            positions[b, t:t + P] = torch.arange(P)
            group[b, t:t + P] = g
            if ex.prefix_loss:
                src_r += [b] * (P - 1)
                src_c += range(t, t + P - 1)
                tgt += ex.prefix[1:]
            last, t = t + P - 1, t + P
            for j, (toks, loss) in enumerate(ex.branches):
                n = len(toks)
                tokens[b, t:t + n] = torch.tensor(toks)
                positions[b, t:t + n] = torch.arange(P, P + n)
                group[b, t:t + n] = g
                branch[b, t:t + n] = j
                for i in range(n):
                    if loss[i]:
                        src_r.append(b)
                        src_c.append(last if i == 0 else t + i - 1)
                        tgt.append(toks[i])
                t += n
    idx = torch.arange(T)
    same = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
    causal = idx[None, :] <= idx[:, None]
    tree = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])
    mask = (same & causal[None] & tree) | torch.eye(T, dtype=torch.bool)[None]  # padding sees itself (no NaN)
    return Batch(tokens, positions, mask, (torch.tensor(src_r), torch.tensor(src_c)), torch.tensor(tgt))


def tree_forward(model: Transformer, batch: Batch, body: Callable | None = None) -> torch.Tensor:
    """Logits [M,V] at the batch's source positions: Transformer.forward with explicit positions and
    mask (the packed tree layout), and the vocabulary projection only where a loss is taken.

    body: a replacement for `layers_and_head` (its torch.compile'd version). The embedding stays
    outside it because its max_seq_len check reads a tensor value, which would break the graph."""
    h = model._embed(batch.tokens, batch.positions)
    return (body or layers_and_head)(model, h, model._rope(batch.positions), batch.mask[:, None], batch.src)


def layers_and_head(model: Transformer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    mask: torch.Tensor, src: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The decoder layers and the vocabulary head at the source positions (what lm.train_lm may compile)."""
    for layer in model.layers:
        h = layer(h, rope, mask)
    return model._head(h[src[0], src[1]])


def fill_rows(make: Callable[[np.random.Generator], Example], rng: np.random.Generator, rows: int,
              max_len: int) -> list[list[Example]]:
    """Draw examples until `rows` rows of max_len are (nearly) full."""
    examples, total, budget = [], 0, rows * max_len
    while total < 0.97 * budget:
        ex = make(rng)
        if len(ex) > max_len:
            continue
        examples.append(ex)
        total += len(ex)
    packed = pack(examples, max_len)
    return packed[:rows]
