"""Metric networks' weights come from local files only: the table and search order are
`tasks.weights` (re-exported here); this module loads a found file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.weights import (  # noqa: F401 - re-exported: the one weights finder
    NAMED_ENCODERS,
    WEIGHTS,
    DinoWeightsNotFound,
    InceptionWeightsNotFound,
    WeightsFile,
    WeightsNotFound,
)


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
