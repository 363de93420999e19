"""Random networks saved in the real weights files' layouts, for the new image metrics' tests:
clean-fid's Inception TorchScript, the official DINOv2 checkpoint, the open_clip CLIP file."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE = Path(__file__).resolve().parent / "reference"


class _TorchScriptInception(nn.Module):
    """The calling interface of NVIDIA's `inception-2015-12-05.pt` that clean-fid relies on: a `layers`
    submodule ([N,3,299,299] in [-1,1] -> [N,2048,1,1]) and `forward(img, return_features)` on [0,255]
    images of any size. Its parameter names are ours (clean-fid, like us, never reads them)."""

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


class _Pool4d(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None, None]  # NVIDIA's layers end in a [N,2048,1,1] pool


def save_cleanfid_inception(path: Path, seed: int = 0) -> Path:
    """A seeded random Inception as a TorchScript file in clean-fid's layout, named inception-2015-12-05.pt."""
    from evals.metrics.inception import FIDInceptionV3
    from real_fixtures import random_inception_state

    net = FIDInceptionV3()
    net.load_state_dict(random_inception_state(seed))
    layers = torch.jit.trace(_Pool4d(net.eval()), torch.zeros(1, 3, 299, 299))
    scripted = torch.jit.script(_TorchScriptInception(layers).eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return path


def official_dinov2(arch: str = "vit_small", seed: int = 0) -> nn.Module:
    """facebookresearch/dinov2's ViT (vendored) as torch.hub builds it, with seeded random weights."""
    if str(REFERENCE / "dinov2_official") not in sys.path:
        sys.path.insert(0, str(REFERENCE / "dinov2_official"))
    from dinov2.models import vision_transformer as vits

    torch.manual_seed(seed)
    model = getattr(vits, arch)(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                                num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    with torch.no_grad():  # move every tensor off its init value (LayerNorm 1/0, LayerScale 1, zero biases)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_dinov2(path: Path, arch: str = "vit_small", seed: int = 0) -> Path:
    """A random DINOv2 in the official `dinov2_vit?14_pretrain.pth` layout (a plain state dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_dinov2(arch, seed).state_dict(), path)
    return path


MJHQ_CATEGORIES = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people", "plants", "vehicles")


def write_mjhq(root: Path, per_category: int = 3, categories: tuple[str, ...] = ("animals", "people")) -> Path:
    """The MJHQ-30K release layout under root/mjhq: meta_data.json ({image_id: {category, prompt}}) and
    mjhq30k_imgs/<category>/<image_id>.jpg; ids are 40-hex like the release's, images real COCO photos."""
    import hashlib
    import json

    from PIL import Image

    from real_data import COCO_MINI_CAPTIONS, COCO_MINI_IMAGES

    captions = {a["image_id"]: a["caption"] for a in json.loads(COCO_MINI_CAPTIONS.read_text())["annotations"]}
    files = sorted(COCO_MINI_IMAGES.glob("*.jpg"))
    meta, k = {}, 0
    for category in categories:
        for _ in range(per_category):
            src = files[k]
            k += 1
            image_id = hashlib.sha1(src.name.encode()).hexdigest()
            out = root / "mjhq" / "mjhq30k_imgs" / category / f"{image_id}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(src).convert("RGB").save(out, quality=95)
            meta[image_id] = {"category": category, "prompt": captions[int(src.stem)]}
    (root / "mjhq" / "meta_data.json").write_text(json.dumps(meta, indent=1))
    return root
