"""How an image becomes the FID network's input: the resize protocols and the one square crop.

Protocols (how a uint8 image becomes the 299x299 network input):
- "pytorch-fid" (default; what CM3leon reported): x/255 in float32, `F.interpolate` bilinear
  to 299 with align_corners=False (no antialias), then 2x-1.
- "torch-fidelity": float32 in [0,255], TensorFlow-1 `resize_bilinear` (align_corners=False:
  source coordinate = dst * in/out, no half-pixel offset, neighbours clamped at the border),
  then (x-128)/128 — the arithmetic of torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`.
- "clean" (clean-fid's "clean" mode): each channel as a float32 PIL image (mode "F") resized to
  299 with PIL bicubic (antialiased when downsampling), clipped to [0,255], then (x-128)/128; the
  network is then clean-fid's own (NVIDIA's TorchScript file, `evals.metrics.cleanfid`).

`square_resize` is the optional first step of every protocol (a task's `resolution`): resize the
short side (PIL bicubic) and center-crop a square. Scoring uses the same function for the
encoder-space FD, so both feature spaces see the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evals.metrics.inception import INPUT_SIZE

PROTOCOLS = ("pytorch-fid", "torch-fidelity", "clean")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def _resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` on float [N,C,H,W], in torch-fidelity's float32 op order."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # TF1 maps dst pixel i to src i * in/out (no half-pixel centres); the scale is
        # rounded to float32 before the product, as in torch-fidelity.
        src = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, src - lo.to(src.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x.index_select(2, ylo), x.index_select(2, yhi)
    dx = dx.view(1, 1, 1, size)
    t = top.index_select(3, xlo) + (top.index_select(3, xhi) - top.index_select(3, xlo)) * dx
    b = bottom.index_select(3, xlo) + (bottom.index_select(3, xhi) - bottom.index_select(3, xlo)) * dx
    return t + (b - t) * dy.view(1, 1, size, 1)


def _resize_clean(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid: every channel resized alone as a float32 PIL image with bicubic, clipped to [0,255]."""
    out = np.empty((x.shape[0], x.shape[1], size, size), np.float32)
    arr = x.cpu().numpy().astype(np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            ch = Image.fromarray(arr[i, c])  # 2-D float32 -> mode "F"
            out[i, c] = np.asarray(ch.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(np.clip(out, 0.0, 255.0)).to(x.device)


def preprocess(images: torch.Tensor, protocol: str = "pytorch-fid", size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 [N,3,size,size] in [-1,1], resized as `protocol` does."""
    check_uint8_batch(images)
    if protocol == "pytorch-fid":
        x = images.to(torch.float32) / 255  # torchvision ToTensor
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if protocol == "torch-fidelity":
        return (_resize_tf1_bilinear(images.to(torch.float32), size) - 128) / 128
    if protocol == "clean":
        return (_resize_clean(images, size) - 128) / 128
    raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def check_uint8_batch(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch.Tensor [N,3,H,W], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0,255], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB [N,3,H,W], got shape {tuple(images.shape)}")


def square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` (PIL bicubic), then center-crop to a square."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))

