"""Stage "vq": the VQ-GAN image tokenizer, and every image encoded to codes once (for the LM stages).

Loss: L1 + MSE reconstruction with the shapes' pixels weighted up, plus the quantizer loss; the
codebook starts as k-means of autoencoder latents and dead codes are restarted from the current
batch's latents, so the whole codebook gets used. No adversarial term: the demo images are flat shapes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..vq import VQConfig, VQModel, preprocess
from .common import log, lr_at, set_lr


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """Bool [B,1,H,W]: pixels away from the image's median colour (the flat background of this world)."""
    bg = x.flatten(2).median(-1).values[:, :, None, None]
    return (x - bg).abs().amax(1, keepdim=True) > 0.1


@torch.no_grad()
def _code_candidates(z: torch.Tensor, fg: torch.Tensor, gen: torch.Generator, bg_keep: float) -> torch.Tensor:
    """Latent vectors [M,D] to seed codes from: every position that touches a shape, and only a few
    pure-background ones. Seeding by density would spend most of the codebook on background (90%
    of the positions), split one flat colour into many codes by context noise, and leave the LM
    with many names for the same patch."""
    f = fg.shape[-1] // z.shape[-1]
    touched = F.avg_pool2d(fg.float(), f).flatten() > 0
    keep = touched | (torch.rand(touched.shape, generator=gen) < bg_keep).to(touched.device)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[keep].float()


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, cands: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed codes unused since the last restart with candidate latents (plus a little noise)."""
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0 or cands.shape[0] == 0:
        return 0
    pick = torch.randint(cands.shape[0], (dead.numel(),), generator=gen).to(cands.device)
    noise = 0.01 * cands.std() * torch.randn(dead.numel(), cands.shape[1], generator=gen).to(cands.device)
    vq.quantize.embedding.weight.data[dead.to(cands.device)] = cands[pick] + noise
    return int(dead.numel())


@torch.no_grad()
def _kmeans_init(vq: VQModel, cands: torch.Tensor, gen: torch.Generator, iters: int = 10) -> None:
    """Codebook = k-means centroids of autoencoder latents (a codebook that starts where the data is)."""
    K = vq.quantize.embedding.weight.shape[0]
    cent = cands[torch.randint(cands.shape[0], (K,), generator=gen).to(cands.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(cands, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, cands)
        counts = torch.bincount(assign, minlength=K).float()[:, None]
        empty = counts[:, 0] == 0  # an empty cluster takes a random candidate
        cent = torch.where(empty[:, None], cands[torch.randint(cands.shape[0], (K,), generator=gen).to(cands.device)],
                           sums / counts.clamp_min(1))
    vq.quantize.embedding.weight.data.copy_(cent)


@dataclass
class _VQRun:
    """The fixed inputs of one VQ training run, shared by its step helpers."""

    vq: VQModel
    cfg: VQConfig
    pixels: torch.Tensor  # [N,3,H,W] in [-1,1], kept on the CPU
    gen: torch.Generator  # the one CPU generator: batches, crops, code seeds (the draw order is the recipe)
    usage: torch.Tensor  # [K] code counts since the last restart
    ae_steps: int
    restart_end: float
    restart_every: int
    bg_keep: float
    kmeans_images: int


def _draw_batch(run: _VQRun, step: int, steps: int, batch: int, crop: int, full_frac: float) -> torch.Tensor:
    """A batch of whole images (half the batch: 4x the pixels) or of code-grid-aligned crop x crop windows."""
    full = not crop or step >= (1 - full_frac) * steps
    x = run.pixels[torch.randint(len(run.pixels), (batch if not crop or not full else max(1, batch // 2),),
                                 generator=run.gen)]
    if not full:
        f, res = run.cfg.downsample_factor, run.cfg.resolution
        oy, ox = (f * torch.randint((res - crop) // f + 1, (2,), generator=run.gen)).tolist()
        x = x[:, :, oy:oy + crop, ox:ox + crop]
    return x


def _quantize(run: _VQRun, z: torch.Tensor, fg: torch.Tensor, step: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized latents, quantizer loss); a plain autoencoder before ae_steps. At ae_steps the
    codebook starts as k-means of fresh latents; then dead codes are re-seeded every restart_every steps."""
    if step < run.ae_steps:
        return z, z.new_zeros(())
    if step == run.ae_steps:
        with torch.no_grad():
            more = run.pixels[torch.randint(len(run.pixels), (run.kmeans_images,), generator=run.gen)].to(device)
            cands = _code_candidates(run.vq.quant_conv(run.vq.encoder(more)), _foreground(more), run.gen, run.bg_keep)
            _kmeans_init(run.vq, cands, run.gen)
        run.usage.zero_()
    elif (step - run.ae_steps) % run.restart_every == 0 and step < run.restart_end:
        _restart_dead_codes(run.vq, _code_candidates(z.detach(), fg, run.gen, run.bg_keep), run.usage, run.gen)
        run.usage.zero_()
    zq, qloss, codes = run.vq.quantize(z)
    run.usage += torch.bincount(codes.flatten(), minlength=run.cfg.num_embeddings)
    return zq, qloss


def train_vq(images: Sequence[Image.Image], cfg: VQConfig, steps: int, batch: int, lr: float, seed: int,
             device: str | torch.device = "cpu", restart_every: int = 20, crop: int = 0, full_frac: float = 0.2,
             ae_frac: float = 0.3, fg_weight: float = 10.0, restart_until: float = 0.3, bg_keep: float = 0.01,
             kmeans_images: int = 256, log_every: int = 100) -> VQModel:
    """Train a VQ-GAN (no adversarial term: the demo images are flat shapes) at cfg.resolution.

    - The first ae_frac of the steps train a plain autoencoder (no quantizer), then the codebook
      starts as k-means of its latents (mostly those that touch a shape, see _code_candidates):
      much faster than learning through the quantizer from scratch.
    - Codes unused for restart_every steps are re-seeded the same way, during the first
      restart_until of the quantized steps only: later a code may die (a flat colour is better
      served by one code than by several that differ by context noise).
    - With crop > 0, all but the last full_frac of the steps see random crop x crop windows (taming
      trains on crops; the network is fully convolutional), aligned to the code grid so patches look
      as they will at inference; the last steps see whole images (half the batch: 4x the pixels) so
      GroupNorm's statistics settle.
    - Loss: L1 + MSE with the shapes' pixels weighted up (they cover a few percent of an image; left
      alone, the cheapest solution is background everywhere) + the quantizer loss."""
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pixels = preprocess(list(images), cfg.resolution)
    vq = VQModel(cfg).to(device).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ae_steps = int(ae_frac * steps)
    run = _VQRun(vq, cfg, pixels, gen, torch.zeros(cfg.num_embeddings, dtype=torch.long, device=device), ae_steps,
                 ae_steps + restart_until * (steps - ae_steps), restart_every, bg_keep, kmeans_images)
    t0, window = time.perf_counter(), []
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, min(20, steps // 10 + 1)))
        x = _draw_batch(run, step, steps, batch, crop, full_frac).to(device)
        fg = _foreground(x)
        zq, qloss = _quantize(run, vq.quant_conv(vq.encoder(x)), fg, step, device)
        rec = vq.decode_latents(zq)
        w = 1.0 + fg_weight * fg.float()
        err = (rec - x).abs() + (rec - x) ** 2
        loss = (w * err).sum() / (w.sum() * x.shape[1]) + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            used = f"codes used {int((run.usage > 0).sum())}/{cfg.num_embeddings}" if step >= ae_steps else "autoencoder"
            log(f"vq step {step + 1}/{steps} loss {np.mean(window):.4f} {used} "
                f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s")
            window = []
    return vq.eval()

@torch.no_grad()
def encode_images(vq: VQModel, images: Sequence[Image.Image], device: str | torch.device = "cpu",
                  batch: int = 256) -> torch.Tensor:
    """Codes [N, image_seq_len] for every image (done once; the LM stages read these). Identical
    images (an edit's source is usually a training image) are encoded once."""
    vq = vq.to(device).eval()
    key = [hashlib.sha1(im.tobytes()).digest() + repr((im.mode, im.size)).encode() for im in images]
    first: dict[bytes, int] = {}
    for i, k in enumerate(key):
        first.setdefault(k, i)
    unique = list(first.values())
    out = [vq.encode(preprocess([images[j] for j in unique[i:i + batch]], vq.config.resolution).to(device)).cpu()
           for i in range(0, len(unique), batch)]
    if not out:
        return torch.zeros(0, vq.config.tokens_per_image, dtype=torch.long)
    codes = torch.cat(out)
    row = {k: n for n, k in enumerate(first)}
    return codes[torch.tensor([row[k] for k in key])]
