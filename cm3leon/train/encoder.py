"""Stage "encoder": the dual encoder (CLIP loss) for retrieval and the demo's image/text scores."""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..encoder import NativeDualEncoder, NativeEncoderConfig, contrastive_loss
from .common import log, lr_at, set_lr


def train_encoder(images: Sequence[Image.Image], captions: Sequence[Sequence[str]], cfg: NativeEncoderConfig,
                  steps: int, batch: int, lr: float, seed: int, device: str | torch.device = "cpu",
                  log_every: int = 50) -> NativeDualEncoder:
    """CLIP-style contrastive training on (image, one of its captions) pairs; a batch never holds an
    image twice, so every off-diagonal pair is a true negative."""
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = NativeDualEncoder(cfg).to(device).train()
    pixels = torch.cat([enc.image_inputs(images[i:i + 512]).cpu() for i in range(0, len(images), 512)])
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    t0, window = time.perf_counter(), []
    batch = min(batch, len(images))
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, min(20, steps // 10 + 1)))
        idx = rng.choice(len(images), batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
        img = enc.forward_image(pixels[torch.from_numpy(idx)].to(device))
        txt = enc.forward_text(*enc.text_inputs(texts))
        loss = contrastive_loss(img, txt, enc.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            enc.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log(f"encoder step {step + 1}/{steps} loss {np.mean(window):.4f} "
                f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s")
            window = []
    return enc.eval()
