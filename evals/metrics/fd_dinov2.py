"""FD-DINOv2 (Stein et al., "Exposing flaws of generative model evaluation metrics", dgm-eval):
the Fréchet distance in the feature space of DINOv2 ViT-L/14 (ViT-B/14 as a cheaper tracking option).

Network: timm's `vit_{large,base,small}_patch14_dinov2` (the DINOv2 ViT: LayerScale, LayerNorm eps
1e-6, exact GELU), built at 224 px with no head, loaded strictly from the official
`dinov2_vit?14_pretrain.pth` of facebookresearch/dinov2. The official file's positional embedding
is for 518 px (37x37 patches); it is resampled to 16x16 once at load time exactly as the official
model does it on every forward (`interpolate_pos_encoding`: bicubic, no antialias, scale factor
(16 + 0.1) / 37), and the official `mask_token` (training only) is dropped. Output: the CLS token
after the final LayerNorm (`x_norm_clstoken`, what torch.hub's model returns and dgm-eval uses).

Preprocessing as dgm-eval's `DINOv2Encoder.transform` (default, not `--clean_resize`): PIL
bicubic resize to 224x224, ToTensor, ImageNet mean/std. Statistics and the distance are FID's
(`FeatureStats`, mergeable; reference statistics cached on disk; `compute_fid`'s bootstrap CI).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from evals.metrics import fid as fid_lib
from evals.metrics.fid_features import _file_sha256
from evals.metrics.image_features import FeatureNet, cached_net_stats, net_stats
from evals.metrics.result import MetricResult
from evals.metrics.weights import WEIGHTS

NAME = "DINOv2"  # FD-DINOv2
INPUT_SIZE = 224
PATCH = 14
INTERPOLATE_OFFSET = 0.1  # the official hub models' `interpolate_offset`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = "dgm-eval: PIL bicubic 224x224, ImageNet mean/std"
TIMM_ARCH = {"vitl14": "vit_large_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
             "vits14": "vit_small_patch14_dinov2"}


def weights_file(arch: str):
    if arch not in TIMM_ARCH:
        raise ValueError(f"DINOv2 arch {arch!r}: choose one of {', '.join(TIMM_ARCH)}")
    return WEIGHTS[f"dinov2-{arch}"]


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The official `interpolate_pos_encoding` for a grid x grid input, applied to the stored embedding."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"DINOv2 pos_embed has {n} patch positions, not a square grid")
    if m == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    dim = pos_embed.shape[-1]
    s = (grid + INTERPOLATE_OFFSET) / m
    patch_pos = F.interpolate(patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(s, s),
                              mode="bicubic", antialias=False)
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"DINOv2 pos_embed resampled to {tuple(patch_pos.shape[-2:])}, expected {grid}x{grid}")
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], 1).to(pos_embed.dtype)


def load_dinov2(arch: str = "vitl14", weights: str | os.PathLike | None = None,
                device: str | torch.device = "cpu") -> torch.nn.Module:
    """The DINOv2 backbone (timm) with the official weights file, in eval mode; `weights` or the finder's places."""
    import timm

    path = weights_file(arch).find(weights)
    try:
        state = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"cannot load DINOv2 weights {path}: {e}") from e
    state.pop("mask_token", None)  # used only in training (masked image modelling)
    if "pos_embed" not in state:
        raise ValueError(f"DINOv2 weights {path}: no pos_embed: not the official dinov2_{arch}_pretrain.pth layout")
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], INPUT_SIZE // PATCH)
    with torch.device("meta"):  # no random init of 300M parameters: the file fills every tensor
        model = timm.create_model(TIMM_ARCH[arch], pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"DINOv2 weights {path} do not match the official dinov2_{arch} layout: "
                         f"{' '.join(str(e).split())[:300]}") from None
    model.weights_path = path
    return model.to(device).eval().requires_grad_(False)


def dgm_eval_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((INPUT_SIZE, INPUT_SIZE), transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def dinov2_net(arch: str = "vitl14", weights: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> FeatureNet:
    model = load_dinov2(arch, weights, device)
    return FeatureNet(NAME, f"dinov2-{arch}:{_file_sha256(model.weights_path)}", dgm_eval_transform(), model,
                      torch.device(device), PREPROCESS)


def compute_fd_dinov2(generated, reference, net: FeatureNet, *, cache_dir: str | os.PathLike | None = None,
                      resolution: int | None = None, batch_size: int = 32, bootstrap: int = 0,
                      seed: int = 0) -> MetricResult:
    """FD-DINOv2 of generated images against reference images (or their FeatureStats); lower is better."""
    gen = net_stats(generated, net, batch_size=batch_size, resolution=resolution, keep_features=bootstrap > 0)
    ref: Any = reference if isinstance(reference, fid_lib.FeatureStats) else \
        cached_net_stats(reference, net, cache_dir, batch_size=batch_size, resolution=resolution)
    res = fid_lib.compute_fid(gen, ref, bootstrap=bootstrap, seed=seed)
    res.extra.update(protocol=PREPROCESS, extractor=net.id, resolution=resolution)
    return res


def fd_from_features(generated: np.ndarray, reference: np.ndarray) -> float:
    """The Fréchet distance of two feature sets (our statistics code), for tests and callers with features."""
    return fid_lib.compute_fid(generated, fid_lib.FeatureStats.from_features(reference)).value
