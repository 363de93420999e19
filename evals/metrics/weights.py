"""Metric networks' weights come from local files only: where they are looked for, and how they load."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cm3leon.errors import Cm3evalError


class WeightsNotFound(Cm3evalError, FileNotFoundError):
    """A metric network's weights file is in none of the places it is looked for (exit 2: missing input)."""


@dataclass(frozen=True)
class WeightsFile:
    what: str  # e.g. "FID Inception weights"
    filename: str
    url: str  # where a user downloads it on a connected machine
    env: str  # environment variable naming the file
    flag: str  # the `cm3eval score` flag that names the file
    option: str  # the metric option that names it in a task (`cm3eval run --set OPTION=PATH`)
    not_found: type[WeightsNotFound] = WeightsNotFound

    def search_paths(self, explicit: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
        """Where the file is looked for, in order, as (how it was named, path)."""
        if explicit is not None:
            # An explicit path that does not exist is a typo, not a cue to silently use another file.
            return [("argument", Path(explicit).expanduser())]
        places: list[tuple[str, Path]] = []
        if os.environ.get(self.env):
            places.append((f"${self.env}", Path(os.environ[self.env]).expanduser()))
        torch_home = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser()
        places.append(("torch hub cache", torch_home / "hub" / "checkpoints" / self.filename))
        return places

    def find(self, explicit: str | os.PathLike | None = None) -> Path:
        places = self.search_paths(explicit)
        for _, path in places:
            if path.is_file():
                return path
        looked = "; ".join(f"{how}: {path}" for how, path in places)
        raise self.not_found(
            f"{self.what} {self.filename} not found (looked in {looked}). Download {self.url} on a connected "
            f"machine and pass it with {self.flag} (cm3eval score) or --set {self.option}=PATH (cm3eval run), "
            f"set ${self.env}, or put it in $TORCH_HOME/hub/checkpoints/.")


def load_state_dict_file(model: nn.Module, path: Path, what: str, layout: str) -> nn.Module:
    """Strictly load a plain state_dict file (torch.load weights_only=True) into `model`, in eval mode."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"cannot load {what} {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path}: expected a state_dict, got {type(state).__name__}")
    try:
        # Strict: a file in another layout must fail loudly rather than leave layers random.
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what} {path} do not match the {layout} layout: {e}") from e
    return model.eval().requires_grad_(False)
