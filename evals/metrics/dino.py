"""DINO ViT-S/16 image features, as MagicBrush's DINO similarity uses them.

MagicBrush loads `torch.hub.load('facebookresearch/dino:main', 'dino_vits16')` and takes its
forward output: the CLS token after the final LayerNorm (the hub model has no head). This is
that network (DINO's `vit_small`: dim 384, 12 blocks, 6 heads, MLP x4, qkv bias, LayerNorm
eps 1e-6, exact GELU) with the parameter names of the official checkpoint
`dino_deitsmall16_pretrain.pth`, so that file loads strictly:

    cls_token [1,1,384], pos_embed [1,197,384], patch_embed.proj.{weight,bias},
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}, norm.{weight,bias}

Preprocessing (`dino_transform`) is MagicBrush's: Resize(256, bicubic) on the PIL image,
CenterCrop(224), ToTensor, ImageNet mean/std. Inputs must be 224x224: DINO's positional-
embedding interpolation for other sizes is not needed by this protocol and is not implemented.

Weights come only from a local file, found by `tasks.weights` (an explicit path, `$CM3EVAL_DINO_WEIGHTS`,
the cache, the torch hub cache), loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from evals.metrics.weights import WEIGHTS, DinoWeightsNotFound, load_state_dict_file  # noqa: F401

WEIGHTS_FILE = WEIGHTS["dino-vits16"]
WEIGHTS_FILENAME = WEIGHTS_FILE.filename
WEIGHTS_URL = WEIGHTS_FILE.url
WEIGHTS_ENV = WEIGHTS_FILE.env
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # DINO's layout: qkv output is (3, heads, head_dim) along the feature axis.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, as DINO
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINO's VisionTransformer without head; defaults are ViT-S/16 (`dino_vits16`)."""

    def __init__(self, img_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.img_size = img_size
        self.weights_path: Path | None = None  # set by load_dino, for reports
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] normalised pixels, S = img_size -> CLS features [B, dim]."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"DinoViT expects [B,3,{self.img_size},{self.img_size}], got {tuple(x.shape)}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def dino_transform() -> transforms.Compose:
    """MagicBrush's DINO preprocessing (PIL image -> [3,224,224])."""
    return transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def weights_search_paths(explicit: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Where the weights are looked for, in order, as (how it was named, path)."""
    return WEIGHTS_FILE.search_paths(explicit)


def find_weights(explicit: str | os.PathLike | None = None) -> Path:
    return WEIGHTS_FILE.find(explicit)


def load_dino(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DinoViT:
    """DINO ViT-S/16 with weights from a local file (see `find_weights`), in eval mode."""
    path = find_weights(weights)
    model = load_state_dict_file(DinoViT(), path, "DINO ViT-S/16 weights", "dino_vits16")
    model.weights_path = path
    return model.to(device)


class DinoEncoder:
    """Image-only encoder over `DinoViT`: `encode_image(list[PIL]) -> [N,384]` unit-norm CLS features."""

    name = "dino_vits16"

    def __init__(self, model: DinoViT, batch_size: int = 32):
        self.model = model.eval()
        self.dim = model.norm.normalized_shape[0]
        self.batch_size = batch_size
        self.transform = dino_transform()

    @classmethod
    def load(cls, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DinoEncoder:
        return cls(load_dino(weights, device))

    @torch.no_grad()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.transform(im.convert("RGB")) for im in images[i:i + self.batch_size]])
            feats.append(self.model(x.to(device)).float().cpu())
        return F.normalize(torch.cat(feats), dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise TypeError("DINO is an image-only encoder: it has no text embeddings")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return f"{self.name}:{h.hexdigest()[:16]}"
