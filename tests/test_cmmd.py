"""CMMD equals google-research's `cmmd/distance.py` (vendored unmodified, run under numpy) on the same
embeddings; the embedding pipeline is the CLIP tower on cmmd's preprocessing."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.metrics import cmmd as C
from real_data import COCO_MINI_IMAGES as COCO

DISTANCE = Path(__file__).resolve().parent / "reference" / "cmmd_official" / "distance.py"


def reference_mmd():
    """The vendored file's `mmd`, converted mechanically to run without JAX: `import jax` and
    `import jax.numpy as jnp` become `import numpy as jnp` and the `@jax.jit` decorator is dropped
    (jit only compiles; every jnp call it makes exists in numpy with the same meaning). numpy keeps
    float64 inputs in float64 (JAX would compute in float32 unless x64 is enabled)."""
    src = DISTANCE.read_text()
    converted = src.replace("import jax\nimport jax.numpy as jnp\n", "import numpy as jnp\n").replace("@jax.jit\n", "")
    assert "jax" not in converted and converted.count("\n") == src.count("\n") - 2  # 3 lines became 1
    module = types.ModuleType("cmmd_distance")
    exec(compile(converted, str(DISTANCE), "exec"), module.__dict__)  # noqa: S102 - the vendored oracle
    return module.mmd


def _embeddings(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) + shift * rng.standard_normal(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # CLIP embeddings are unit-norm


@pytest.mark.parametrize("n_gen,n_ref,dim,shift,scale", [(300, 280, 64, 0.3, 1.0), (2500, 2100, 32, 0.5, 1.0),
                                                          (200, 150, 16, 0.0, 8.0)])
def test_equals_google_research_distance(n_gen, n_ref, dim, shift, scale):
    mmd = reference_mmd()
    gen, ref = _embeddings(n_gen, dim, 0, shift) * scale, _embeddings(n_ref, dim, 1) * scale
    expect = float(mmd(ref, gen))  # cmmd's main computes mmd(ref_embs, eval_embs)
    ours = C.cmmd_from_embeddings(gen, ref, bootstrap=30, seed=0)
    assert abs(ours.value - expect) <= 1e-6 * abs(expect), (ours.value, expect)
    assert C.mmd(ref, gen) == pytest.approx(expect, rel=1e-6)
    assert ours.name == "CMMD" and ours.higher_is_better is False and ours.n == n_gen
    lo, hi = ours.ci
    assert lo < hi and lo <= ours.value * 1.5 and ours.value > 0


def test_bootstrap_resamples_are_the_reference_on_resampled_sets():
    mmd = reference_mmd()
    gen, ref = _embeddings(80, 8, 2, 0.4), _embeddings(90, 8, 3)
    res = C.cmmd_from_embeddings(gen, ref, bootstrap=40, seed=5)
    rng = np.random.default_rng(5)
    values = [float(mmd(ref, gen[rng.integers(0, 80, 80)])) for _ in range(40)]
    lo, hi = np.quantile(values, [0.025, 0.975])
    assert res.ci == pytest.approx((lo, hi), rel=1e-9)


@pytest.fixture(scope="module")
def clip_encoder(tmp_path_factory):
    from cm3leon.encoder import load_encoder
    from real_fixtures import CLIP_ARCH, save_open_clip

    torch.set_num_threads(1)
    path = save_open_clip(tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors")
    return load_encoder(f"open_clip:{CLIP_ARCH}:{path}")


def test_embeddings_are_the_clip_tower_on_cmmds_preprocessing(clip_encoder):
    from PIL import Image

    from evals.metrics.image_features import net_features

    net = C.cmmd_net(clip_encoder)
    files = sorted(COCO.glob("*.jpg"))[:4]
    ours = net_features(files, net, batch_size=3)
    assert ours.shape == (4, 512) and np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # on a square image cmmd's crop-then-resize is open_clip's own resize-then-crop eval transform
    square = [Image.open(f).convert("RGB").crop((0, 0, 300, 300)) for f in files]
    with torch.no_grad():
        expect = clip_encoder.model.encode_image(torch.stack([clip_encoder.preprocess(im) for im in square]),
                                                 normalize=True).double().numpy()
    assert np.abs(net_features(square, net) - expect).max() < 1e-5
    # a non-square image is center-cropped first: the two pipelines differ there
    res = C.compute_cmmd(files[:2], files[2:], net, bootstrap=10)
    assert res.value > 0 and res.extra["encoder"] == clip_encoder.fingerprint()
