"""Stages "pretrain" and "sft": the decoder trained on packed example rows (see packing.py).

One loop for both: AdamW with warmup and cosine decay, a data stream that is a pure function of
(seed, stage, step), and step checkpoints in OUT/work/ so a killed stage resumes where it stopped and
ends exactly where an uninterrupted one ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..transformer import Transformer
from .common import adamw, atomic_torch_save, autocast, log, lr_at, set_lr
from .examples import ExampleMaker
from .packing import Example, collate, fill_rows, layers_and_head, tree_forward
from .recipe import STAGES, DemoRecipe


def _resume(ckpt: Path | None, model: Transformer, opt: torch.optim.Optimizer, device: torch.device, name: str,
            steps: int) -> tuple[int, list[tuple[int, float]]]:
    """(first step, losses so far) from the stage's step checkpoint, or (0, []) when there is none."""
    if ckpt is None or not ckpt.is_file():
        return 0, []
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    start = int(state["step"])
    log(f"{name}: resuming at step {start}/{steps}")
    return start, [tuple(x) for x in state["losses"]]


def train_lm(name: str, model: Transformer, make: Callable[[np.random.Generator], Example], steps: int, lr: float,
             recipe: DemoRecipe, device: torch.device, work: Path | None = None,
             compile_forward: bool = False) -> list[tuple[int, float]]:
    """AdamW + warmup/cosine; the data stream is a pure function of (seed, stage, step), so a run
    resumed from a step checkpoint sees the same batches as one that never stopped.

    compile_forward: run the forward through torch.compile (dynamic shapes: packed batches vary in length).
    It changes speed, not the recipe (about 1.3x per step on 2 CPU cores; the first steps compile)."""
    body = torch.compile(layers_and_head, dynamic=True) if compile_forward else None
    opt = adamw(model, lr, recipe.weight_decay)
    ckpt = work / f"{name}.ckpt.pt" if work is not None else None
    start, losses = _resume(ckpt, model, opt, device, name, steps)
    stage_id = STAGES.index(name) if name in STAGES else 99
    model.train()
    t0, window, n_tok = time.perf_counter(), [], 0
    for step in range(start, steps):
        set_lr(opt, lr_at(step, steps, lr, recipe.warmup))
        rng = np.random.default_rng([recipe.seed, stage_id, step])
        batch = collate(fill_rows(make, rng, recipe.rows, min(recipe.row_len, recipe.max_seq_len)),
                        model.config.pad_id).to(device)
        with autocast(device):
            logits = tree_forward(model, batch, body)
        loss = F.cross_entropy(logits.float(), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        n_tok += int(batch.tokens.numel())
        if (step + 1) % recipe.log_every == 0 or step == steps - 1:
            dt = time.perf_counter() - t0
            losses.append((step + 1, float(np.mean(window))))
            log(f"{name} step {step + 1}/{steps} loss {np.mean(window):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(step + 1 - start) / dt:.2f} steps/s {n_tok / dt:.0f} tok/s")
            window = []
        if ckpt is not None and ((step + 1) % recipe.ckpt_every == 0) and step + 1 < steps:
            atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                               "losses": [list(x) for x in losses]}, ckpt)
    model.eval()
    return losses


def pretrain(model: Transformer, maker: ExampleMaker, recipe: DemoRecipe, device: torch.device,
             work: Path | None = None, compile_forward: bool = False) -> list[tuple[int, float]]:
    return train_lm("pretrain", model, maker.pretrain, recipe.steps(recipe.pt_steps), recipe.pt_lr, recipe, device, work,
                    compile_forward)


def sft(model: Transformer, maker: ExampleMaker, recipe: DemoRecipe, device: torch.device,
        work: Path | None = None, compile_forward: bool = False) -> list[tuple[int, float]]:
    return train_lm("sft", model, maker.sft, recipe.steps(recipe.sft_steps), recipe.sft_lr, recipe, device, work,
                    compile_forward)
