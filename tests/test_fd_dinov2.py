"""FD-DINOv2: our features equal dgm-eval's DINOv2 encoder (its transform, the official DINOv2 network)
on a random network saved in the official file layout, and our Fréchet distance equals dgm-eval's FD code."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.metrics import fd_dinov2 as D
from real_data import COCO_MINI_IMAGES as COCO

REFERENCE = Path(__file__).resolve().parent / "reference"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(autouse=True, scope="module")
def reference_on_path():
    paths = [str(REFERENCE / "dinov2_official"), str(REFERENCE / "dgm_eval_official")]
    sys.path[:0] = paths
    yield
    for p in paths:
        sys.path.remove(p)
    for name in [m for m in sys.modules if m == "dinov2" or m.startswith(("dinov2.", "dgm_eval"))]:
        del sys.modules[name]


def official_model(seed: int = 0):
    """The official DINOv2 ViT-S/14 as torch.hub builds it, with seeded random weights."""
    from dinov2.models import vision_transformer as vits

    torch.manual_seed(seed)
    model = vits.vit_small(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                           num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    with torch.no_grad():  # move every tensor off its init value (LayerNorm 1/0, LayerScale 1, zero biases)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, reference_on_path):
    model = official_model()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    assert {"mask_token", "pos_embed", "blocks.0.ls1.gamma"} <= set(model.state_dict())
    assert model.pos_embed.shape == (1, 37 * 37 + 1, 384)
    return path


def test_features_equal_dgm_eval_encoder_on_the_official_network(official_file, monkeypatch):
    from PIL import Image

    from dgm_eval.models import dinov2 as dgm_dinov2
    from evals.metrics.image_features import net_features

    reference_model = official_model()
    reference_model.load_state_dict(torch.load(official_file, weights_only=True))
    monkeypatch.setattr(torch.hub, "load", lambda repo, name: reference_model)
    encoder = dgm_dinov2.DINOv2Encoder(arch="vits14")
    files = sorted(COCO.glob("*.jpg"))[:6]
    with torch.no_grad():
        ref = encoder(torch.stack([encoder.transform(Image.open(f).convert("RGB")) for f in files])).double().numpy()
    net = D.dinov2_net("vits14", official_file)
    ours = net_features(files, net, batch_size=4)
    assert ours.shape == ref.shape == (6, 384)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err  # float32 rounding (timm's fused attention vs the explicit softmax)
    assert np.abs(ref[0] - ref[1]).max() > 100 * err * np.abs(ref).max()  # the images give different features


@pytest.mark.parametrize("n,dim", [(600, 64), (700, 256)])
def test_fd_equals_dgm_eval_fd(n, dim):
    from dgm_eval.metrics.fd import compute_FD_with_reps

    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    a = rng.standard_normal((n, dim)) @ mix
    b = rng.standard_normal((n + 37, dim)) @ mix * 1.1 + 0.2
    ref = float(compute_FD_with_reps(a, b))
    ours = D.fd_from_features(b, a)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_fd_dinov2_on_images_and_the_cache(official_file, tmp_path):
    files = sorted(COCO.glob("*.jpg"))
    net = D.dinov2_net("vits14", official_file)
    res = D.compute_fd_dinov2(files[:6], files[12:18], net, cache_dir=tmp_path, resolution=64, bootstrap=5)
    assert res.name == "FD-DINOv2" and res.value > 0 and res.n == 6 and res.higher_is_better is False
    assert res.ci[0] <= res.ci[1] and res.extra["resolution"] == 64 and res.extra["extractor"] == net.id
    assert len(list(tmp_path.glob("ref-*.npz"))) == 1  # the reference statistics were cached
    again = D.compute_fd_dinov2(files[:6], files[12:18], net, cache_dir=tmp_path, resolution=64)
    # 6 samples in 384 dims: without the generated features the singular covariances take the D x D route
    assert again.value == pytest.approx(res.value, rel=1e-5)


def test_missing_and_wrong_weights(tmp_path, monkeypatch):
    from tasks.weights import WeightsNotFound

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("CM3EVAL_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFound) as e:
        D.load_dinov2("vitl14")
    assert "dinov2_vitl14_pretrain.pth" in str(e.value) and "CM3EVAL_DINOV2_WEIGHTS" in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"pos_embed": torch.zeros(1, 6, 8)}, bad)
    with pytest.raises(ValueError, match="square grid"):
        D.load_dinov2("vits14", bad)
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, bad)
    with pytest.raises(ValueError, match="do not match the official dinov2_vits14 layout: .*Missing key"):
        D.load_dinov2("vits14", bad)
