"""clean-fid's Inception network: NVIDIA's TorchScript `inception-2015-12-05.pt`, used as clean-fid uses it.

clean-fid (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation") computes
its "clean" FID with this file, not with pytorch-fid's port: `InceptionV3W` loads it with
`torch.jit.load` and, in "clean" mode, calls its `layers` submodule on the 299x299 PIL-bicubic
resized image scaled by (x - 128) / 128, taking the [N, 2048] pool features. `protocol: clean`
(`fid_resize`) is that resize and scaling; this module is that network. Our "pytorch-fid"
protocol is clean-fid's "legacy_pytorch" (bilinear `F.interpolate` without antialias, pytorch-fid's
network), up to the order of the /255 and the resize in float32.

The file is TorchScript, so it loads with `torch.jit.load` (TorchScript's own restricted
deserialiser, no arbitrary pickled Python), from the one weights finder (`tasks.weights`,
key "clean-fid-inception"); nothing downloads.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from evals.metrics.weights import WEIGHTS

WEIGHTS_FILE = WEIGHTS["clean-fid-inception"]
FEATURE_DIM = 2048


class CleanFIDInception(nn.Module):
    """[N,3,299,299] in [-1,1] -> [N,2048]: the TorchScript file's `layers`, as clean-fid's "clean" mode."""

    name = "inception"  # the FID network (results are named "FID")

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        if not hasattr(scripted, "layers"):
            raise ValueError("not clean-fid's Inception TorchScript: it has no `layers` submodule")
        self.layers = scripted.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(x.shape[0], FEATURE_DIM)


def load_cleanfid_inception(weights: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu") -> CleanFIDInception:
    path = WEIGHTS_FILE.find(weights)
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure means the file is unusable
        raise ValueError(f"cannot load clean-fid's Inception TorchScript {path}: {' '.join(str(e).split())[:200]}") \
            from e
    model = CleanFIDInception(scripted)
    model.weights_path = path
    return model.to(device).eval().requires_grad_(False)
