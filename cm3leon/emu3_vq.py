"""Emu3's image tokenizer through transformers' `Emu3VQVAE` (the optional `emu3` extra).

The VQ is a well-kept implementation in transformers (encoder, 32,768-code quantizer and the
temporal/spatial decoder); this module only adapts it to the interface the codec uses
(`encode`, `decode`, `config.num_embeddings / downsample_factor / resolution`, `has_decoder`):
an image is one frame, repeated over the temporal factor on the way in and frame 0 on the way out,
as Emu3VQVAE itself does for 4-D input. Codes are row-major [B, h*w]; `decode` views them as the
VQ's [B, h, w] grid. Pixels are in [-1, 1] both ways (Emu3's image processor normalises with mean
and std 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .vq import NoVQDecoderError, VQError


@dataclass(frozen=True)
class Emu3VQInfo:
    num_embeddings: int
    downsample_factor: int
    resolution: int


def _emu3_classes():
    try:
        from transformers import Emu3VQVAE, Emu3VQVAEConfig
    except ImportError:
        raise VQError("Emu3's VQ needs transformers (pip install 'cm3eval[emu3]')") from None
    return Emu3VQVAE, Emu3VQVAEConfig


class Emu3VQ(nn.Module):
    def __init__(self, vq_config: dict[str, Any], resolution: int, state_dict: dict[str, torch.Tensor],
                 source: str) -> None:
        super().__init__()
        model_cls, config_cls = _emu3_classes()
        self.model = model_cls(config_cls(**vq_config)).eval()
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        self.has_decoder = not any(k.startswith("decoder.") for k in missing)
        if unexpected or [k for k in missing if not k.startswith("decoder.")]:
            raise VQError(f"{source}: Emu3 VQ tensors do not match the vq_config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.config = Emu3VQInfo(self.model.config.codebook_size, self.model.spatial_scale_factor, resolution)
        self.source = source

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] -> codes [B, (H/f)*(W/f)], row-major."""
        sizes = torch.tensor([pixels.shape[2:]] * pixels.shape[0])
        out = self.model.encode(pixels.to(self.model.dtype), sizes)
        return torch.stack([t.reshape(-1) for t in out.image_tokens]).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, h*w] row-major -> pixels [B,3,H,W] in [-1,1] (the VQ's [B, h, w] grid)."""
        if not self.has_decoder:
            raise NoVQDecoderError(f"Emu3 VQ weights from {self.source} have no decoder")
        codes = codes[None] if codes.ndim == 1 else codes
        n = codes.shape[1]
        h, w = shape if shape is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise VQError(f"Emu3 VQ decode: {n} codes do not form a {h}x{w} grid")
        K = self.config.num_embeddings
        if n and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise VQError(f"Emu3 VQ decode: codes must lie in [0, {K}), got [{int(codes.min())}, {int(codes.max())}]")
        grid = codes.long().to(self.model.quantize.embedding.weight.device).view(-1, h, w)
        return self.model.decode(grid).float().clamp(-1.0, 1.0)
