"""The one table of metric and encoder networks' weights files, and the one place they are looked for.

`WEIGHTS` maps a network key to its `WeightsFile`: file name, environment variable, the flag /
metric option that names the file, and how to get it. Every network is searched in one order:

1. the path the user named (an argument, a flag, `--set metrics.X.weights=PATH`) — only that one:
   a named path that does not exist is a typo, not a cue to use another file;
2. `$<ENV>` of the network;
3. `<cache>/weights/<file>` (`tasks.cache.cache_dir`: `$CM3EVAL_CACHE`, else ~/.cache/cm3eval);
4. `$TORCH_HOME/hub/checkpoints/<file>` (where torch hub and pytorch-fid keep downloads).

Nothing downloads: a missing file is `WeightsNotFound`, one line naming the file, every place
looked and how to get it. Pure standard library (`tasks` sits below `evals`): the task schema reads
the encoder names from here, the metrics load through `evals.metrics.weights`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cm3leon.errors import Cm3evalError
from tasks.cache import cache_dir


class WeightsNotFound(Cm3evalError, FileNotFoundError):
    """A network's weights file is in none of the places it is looked for (exit 2: missing input)."""


class InceptionWeightsNotFound(WeightsNotFound):
    pass


class DinoWeightsNotFound(WeightsNotFound):
    pass


@dataclass(frozen=True)
class WeightsFile:
    key: str  # the table key, e.g. "inception"
    what: str  # e.g. "FID Inception weights"
    filename: str
    url: str  # where a user downloads it on a connected machine
    env: str  # environment variable naming the file
    flag: str  # the `cm3eval score` flag that names the file
    option: str  # the metric option that names it in a task (`cm3eval run --set OPTION=PATH`)
    encoder: str | None = None  # a named encoder (`open_clip:ARCH:FILE`): its open_clip architecture
    not_found: type[WeightsNotFound] = WeightsNotFound

    def search_paths(self, explicit: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
        """Where the file is looked for, in order, as (how it was named, path)."""
        if explicit is not None:
            return [("argument", Path(explicit).expanduser())]
        places: list[tuple[str, Path]] = []
        if os.environ.get(self.env):
            places.append((f"${self.env}", Path(os.environ[self.env]).expanduser()))
        places.append(("the cache", cache_dir("weights", self.filename)))
        torch_home = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser()
        places.append(("torch hub cache", torch_home / "hub" / "checkpoints" / self.filename))
        return places

    def find_or_none(self, explicit: str | os.PathLike | None = None) -> Path | None:
        return next((p for _, p in self.search_paths(explicit) if p.is_file()), None)

    def find(self, explicit: str | os.PathLike | None = None) -> Path:
        found = self.find_or_none(explicit)
        if found is None:
            raise self.not_found(self.missing(explicit))
        return found

    def missing(self, explicit: str | os.PathLike | None = None) -> str:
        """One line: the file, where it was looked for, and how to get and name it."""
        looked = "; ".join(f"{how}: {path}" for how, path in self.search_paths(explicit))
        flag = f" or {self.flag} (cm3eval score)" if self.flag else ""
        return (f"{self.what} {self.filename} not found (looked in {looked}). Download {self.url} on a connected "
                f"machine and pass it with --set {self.option}=PATH (cm3eval run){flag}, set ${self.env}, or save "
                f"it as {cache_dir('weights', self.filename)}")


_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"

WEIGHTS: dict[str, WeightsFile] = {w.key: w for w in (
    WeightsFile("inception", "FID Inception weights", "pt_inception-2015-12-05-6726825d.pth",
                "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                "pt_inception-2015-12-05-6726825d.pth",
                "CM3EVAL_INCEPTION_WEIGHTS", "--weights", "metrics.fid.weights", not_found=InceptionWeightsNotFound),
    # clean-fid's network: NVIDIA's TorchScript export of the same TF graph (protocol "clean")
    WeightsFile("clean-fid-inception", "clean-fid Inception TorchScript", "inception-2015-12-05.pt",
                "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
                "CM3EVAL_CLEANFID_WEIGHTS", "--weights", "metrics.fid.weights", not_found=InceptionWeightsNotFound),
    WeightsFile("dino-vits16", "DINO ViT-S/16 weights", "dino_deitsmall16_pretrain.pth",
                "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                "CM3EVAL_DINO_WEIGHTS", "--dino-weights", "metrics.dino.weights", not_found=DinoWeightsNotFound),
    WeightsFile("dinov2-vitl14", "DINOv2 ViT-L/14 weights", "dinov2_vitl14_pretrain.pth",
                _DINOV2 + "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                "CM3EVAL_DINOV2_WEIGHTS", "--dinov2-weights", "metrics.fd_dinov2.weights"),
    WeightsFile("dinov2-vitb14", "DINOv2 ViT-B/14 weights", "dinov2_vitb14_pretrain.pth",
                _DINOV2 + "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                "CM3EVAL_DINOV2_VITB14_WEIGHTS", "--dinov2-weights", "metrics.fd_dinov2.weights"),
    WeightsFile("dinov2-vits14", "DINOv2 ViT-S/14 weights", "dinov2_vits14_pretrain.pth",
                _DINOV2 + "dinov2_vits14/dinov2_vits14_pretrain.pth",
                "CM3EVAL_DINOV2_VITS14_WEIGHTS", "--dinov2-weights", "metrics.fd_dinov2.weights"),
    # named encoders (evals.encoders): open_clip state dicts saved as safetensors
    WeightsFile("clip-vit-b-32", "open_clip ViT-B-32 weights", "open_clip_vit_b32.safetensors",
                "open_clip's ViT-B-32 'laion2b_s34b_b79k' (huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K, "
                "open_clip_model.safetensors) or 'openai' weights, saved as safetensors",
                "CM3EVAL_CLIP_WEIGHTS", "", "metrics.clip_score.encoder", encoder="ViT-B-32"),
    # CMMD's network: OpenAI CLIP ViT-L/14 at 336 px
    WeightsFile("clip-vit-l-14-336", "open_clip ViT-L-14-336 weights", "open_clip_vit_l14_336.safetensors",
                "huggingface.co/timm/vit_large_patch14_clip_336.openai (open_clip_model.safetensors; OpenAI's "
                "ViT-L/14@336px)",
                "CM3EVAL_CLIP_L14_336_WEIGHTS", "--cmmd-encoder", "metrics.cmmd.encoder", encoder="ViT-L-14-336"),
)}

NAMED_ENCODERS = tuple(k for k, w in WEIGHTS.items() if w.encoder)
