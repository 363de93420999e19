"""Everything a new user evaluating a real Chameleon/Anole checkpoint has on disk, built small.

`build_real_setup(root)` writes, under `root`:
  chameleon/chameleon-hf/     tiny random HF Chameleon, REAL vocabulary layout, 5 shards, tokenizer.json,
                              no VQ decoder (tests/chameleon_fixture.py, owned by the model helper)
  chameleon/tokenizer/        Meta's vqgan.ckpt + vqgan.yaml (the decoder the HF folder lacks)
  data/                       one data root in the official layouts: COCO val2014 captions + images,
                              Karpathy's dataset_coco.json, VQAv2 val2014, MagicBrush test, and the
                              COCO train2014 captions + images a retrieval bank is built from
  weights/open_clip_model.safetensors               random open_clip ViT-B-32 (CM3leon's retriever/ranker)
  weights/pt_inception-2015-12-05-6726825d.pth      random FID Inception (pytorch-fid's file name)
  weights/dino_deitsmall16_pretrain.pth             random DINO ViT-S/16 (MagicBrush's DINO score)

Images are the real COCO val2017 photos vendored in tests/data (tests/real_data.py), downscaled.
The weights are random: the test checks that every task runs to its numbers, not the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from chameleon_fixture import build_chameleon
from fixtures import write_mini_coco, write_mini_magicbrush, write_mini_vqav2
from real_data import COCO_MINI_CAPTIONS, COCO_MINI_IMAGES

CLIP_ARCH = "ViT-B-32"
CLIP_FILE = "open_clip_model.safetensors"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid / torch hub use
DINO_FILE = "dino_deitsmall16_pretrain.pth"


@dataclass(frozen=True)
class RealSetup:
    hf: Path  # the HF Chameleon folder (no VQ decoder inside)
    vq: Path  # Meta's vqgan.ckpt (vqgan.yaml beside it)
    data_root: Path
    clip: Path
    inception: Path
    dino: Path

    @property
    def clip_spec(self) -> str:
        return f"open_clip:{CLIP_ARCH}:{self.clip}"


# ----------------------------------------------------------------------------- weights
def save_open_clip(path: Path, seed: int = 0) -> Path:
    """A random open_clip ViT-B-32 state_dict as safetensors (the hub file's format)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(CLIP_ARCH, pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID Inception weights that keep activations O(1) through its 94 convolutions
    (He init, jittered batch norms), so the features and FID stay finite."""
    from torch import nn

    from evals.metrics.inception import FIDInceptionV3

    torch.manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def save_inception(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception_state(seed), path)
    return path


def save_dino(path: Path, seed: int = 0) -> Path:
    """A random DINO ViT-S/16 in the official dino_deitsmall16_pretrain.pth layout."""
    from evals.metrics.dino import DinoViT

    torch.manual_seed(seed)
    torch.save(DinoViT().state_dict(), path)
    return path


# ----------------------------------------------------------------------------- COCO train2014 (the bank's documents)
def write_coco_train2014(root: Path, n: int = 8, exclude: set[int] = frozenset()) -> Path:
    """annotations/captions_train2014.json + train2014/COCO_train2014_<id:012d>.jpg (the official
    layout `cm3eval bank build --coco-root` reads), from the vendored COCO photos whose ids are not
    in `exclude` (the val prompts' images never go in the bank). Images already in train2014/ (the
    k-shot support of other writers) are kept as they are."""
    data = json.loads(COCO_MINI_CAPTIONS.read_text())
    caps: dict[int, list[str]] = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    chosen = [im for im in sorted(data["images"], key=lambda im: im["id"]) if im["id"] not in exclude][-n:]
    assert len(chosen) == n, f"only {len(chosen)} vendored COCO images outside the val set"
    images, anns = [], []
    folder = Path(root) / "train2014"
    folder.mkdir(parents=True, exist_ok=True)
    for im in chosen:
        name = f"COCO_train2014_{im['id']:012d}.jpg"
        if not (folder / name).is_file():
            with Image.open(COCO_MINI_IMAGES / im["file_name"]) as src:
                src = src.convert("RGB")
                src.thumbnail((96, 96))
                src.save(folder / name, format="JPEG", quality=90)
        images.append({"id": im["id"], "file_name": name, "height": 96, "width": 96, "license": 1})
        anns += [{"id": im["id"] * 10 + j, "image_id": im["id"], "caption": c} for j, c in enumerate(caps[im["id"]])]
    (Path(root) / "annotations").mkdir(parents=True, exist_ok=True)
    (Path(root) / "annotations" / "captions_train2014.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return Path(root)


def _val_ids(root: Path) -> set[int]:
    """Every COCO image id the val files of `root` name (captions val2014 and VQAv2 val2014)."""
    ids = {im["id"] for im in json.loads((root / "annotations" / "captions_val2014.json").read_text())["images"]}
    vqa = root / "annotations" / "v2_OpenEnded_mscoco_val2014_questions.json"
    ids |= {q["image_id"] for q in json.loads(vqa.read_text())["questions"]}
    return ids


def write_data_root(root: Path) -> Path:
    """One data root with every official layout the four tasks and the bank read."""
    write_mini_coco(root, n=4, n_train=2)
    write_mini_vqav2(root, n_images=2, per_image=2)
    write_mini_magicbrush(root, n_sessions=2)
    write_coco_train2014(root, n=6, exclude=_val_ids(root))
    return root


# ----------------------------------------------------------------------------- all of it
def build_real_setup(root: Path) -> RealSetup:
    root = Path(root)
    files = build_chameleon(root / "chameleon")
    weights = root / "weights"
    weights.mkdir(parents=True)
    return RealSetup(hf=files.hf, vq=files.vq_dir / "vqgan.ckpt", data_root=write_data_root(root / "data"),
                     clip=save_open_clip(weights / CLIP_FILE), inception=save_inception(weights / INCEPTION_FILE),
                     dino=save_dino(weights / DINO_FILE))
