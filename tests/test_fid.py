"""FID/KID: distances vs pytorch-fid and torch-fidelity, streaming statistics, the Inception network
(random weights in the real file layout), preprocessing protocols, the reference cache, the CLI."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from typer.testing import CliRunner

from evals.metrics import fid as M
from evals.metrics.inception import (WEIGHTS_ENV, WEIGHTS_FILENAME, WEIGHTS_URL, FIDInceptionV3,
                                     InceptionWeightsNotFound, find_weights, load_fid_inception)

from real_data import COCO_MINI_IMAGES as COCO


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def inception_like(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative, correlated features, like pooled ReLU activations."""
    rng = np.random.default_rng(seed)
    k = max(dim // 8, 2)
    mix = rng.standard_normal((k, dim)) / np.sqrt(k)
    return np.maximum(rng.standard_normal((n, k)) @ mix + 0.5 * rng.standard_normal((n, dim)) + shift, 0.0)


# ------------------------------------------------------------------ distances and statistics


@pytest.mark.parametrize("dim,n", [(64, 300), pytest.param(2048, 2500, marks=pytest.mark.slow)])
def test_frechet_distance_matches_pytorch_fid(dim, n):
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = inception_like(n, dim, 0), inception_like(n, dim, 1, shift=0.05)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy sqrtm's `disp`, passed by pytorch-fid
        ref = float(calculate_frechet_distance(mu1, s1, mu2, s2))
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_singular_matches_torch_fidelity():
    # Fewer samples than dimensions (rank-deficient covariances): the eigh route and torch-fidelity's
    # complex eigvals must still agree.
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = inception_like(40, 64, 2), inception_like(40, 64, 3, shift=0.1)
    st = [{"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
    ref = fid_statistics_to_metric(st[0], st[1], verbose=False)["frechet_inception_distance"]
    ours = M.frechet_distance(st[0]["mu"], st[0]["sigma"], st[1]["mu"], st[1]["sigma"])
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_compute_fid_thin_factor_matches_moments():
    # fewer samples than dimensions: compute_fid factors through the n x n problem
    a, b = inception_like(20, 64, 7), inception_like(25, 64, 8, shift=0.1)
    expect = M.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    both = M.compute_fid(a, M.FeatureStats.from_features(b, keep_features=True))  # reference factor
    gen_only = M.compute_fid(a, M.FeatureStats.from_features(b))  # generated factor
    big, big_ref = inception_like(200, 64, 9), inception_like(150, 64, 10)
    full = M.compute_fid(big, M.FeatureStats.from_features(big_ref, keep_features=True))  # Cholesky of sigma_ref
    # (the D x D route takes square roots of rounding-level eigenvalues of a singular product:
    # ~1e-8 noise, which the thin route does not have)
    assert both.value == pytest.approx(expect, rel=1e-6) and gen_only.value == pytest.approx(both.value, rel=1e-8)
    assert full.value == pytest.approx(M.frechet_distance(big.mean(0), np.cov(big, rowvar=False), big_ref.mean(0),
                                                          np.cov(big_ref, rowvar=False)), rel=1e-9)
    boot = M.compute_fid(a, M.FeatureStats.from_features(b), bootstrap=30)
    assert boot.ci[0] < boot.ci[1] and boot.extra["bootstrap"] == 30


def test_frechet_distance_rejects_bad_input():
    mu, s = np.zeros(4), np.eye(4)
    bad = s.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        M.frechet_distance(mu, bad, mu, s)
    with pytest.raises(ValueError, match="dims differ"):
        M.frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        M.frechet_distance(mu, -np.eye(4), mu, s)


def test_streaming_stats_merge_equals_one_pass_and_np_cov(tmp_path):
    x = inception_like(301, 32, 4, shift=0.3)
    one = M.FeatureStats.from_features(x)
    shards = [M.FeatureStats.from_features(x[i::3], keep_features=True) for i in range(3)]
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.n == one.n == 301
    np.testing.assert_allclose(merged.mu, x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(merged.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(merged.sigma, one.sigma, rtol=1e-12, atol=1e-14)
    assert merged.features.shape == (301, 32)  # kept features concatenate across shards
    # streaming in batches gives the same moments
    streamed = M.FeatureStats(32)
    for i in range(0, 301, 50):
        streamed.update(torch.from_numpy(x[i:i + 50]))
    np.testing.assert_allclose(streamed.sigma, one.sigma, rtol=1e-12, atol=1e-14)

    merged.meta = {"protocol": "pytorch-fid", "extractor": "x"}
    merged.save(tmp_path / "s.npz")
    back = M.FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 301 and back.meta == merged.meta
    np.testing.assert_array_equal(back.sum_outer, merged.sum_outer)
    np.testing.assert_array_equal(back.features, merged.features)
    with np.load(tmp_path / "s.npz") as z:  # what pytorch-fid reads from a stats file
        np.testing.assert_allclose(z["sigma"], merged.sigma)


def test_stats_errors(tmp_path):
    x = np.ones((3, 4))
    x[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        M.FeatureStats.from_features(x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.FeatureStats.from_features(np.ones((1, 4))).sigma
    with pytest.raises(ValueError, match="dims differ"):
        M.FeatureStats(4).merge(M.FeatureStats(5))
    a = M.FeatureStats(4, meta={"protocol": "clean"})
    with pytest.raises(ValueError, match="protocol differs"):
        a.merge(M.FeatureStats(4, meta={"protocol": "pytorch-fid"}))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        M.FeatureStats.load(tmp_path / "junk.npz")


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = inception_like(60, 64, 5), inception_like(50, 64, 6, shift=0.1)
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=30, kid_subset_size=20,
                                 rng_seed=2020, verbose=False)
    ours = M.kid(a, b, subsets=30, subset_size=20)
    assert ours.mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert ours.std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    # the default subset size (1000) is clipped to the smaller set, where torch-fidelity would refuse
    ref50 = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=5, kid_subset_size=50,
                                   rng_seed=2020, verbose=False)
    clipped = M.kid(a, b, subsets=5)
    assert clipped.subset_size == 50
    assert clipped.mean == pytest.approx(ref50["kernel_inception_distance_mean"], rel=1e-10)
    with pytest.raises(ValueError, match="NaN"):
        M.kid(np.full((5, 64), np.nan), b)


# ------------------------------------------------------------------ preprocessing


def test_tf1_resize_is_bit_exact_with_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1

    g = torch.Generator().manual_seed(0)
    for h, w in [(37, 50), (480, 640), (299, 299), (300, 200)]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
        ref = (tf1(x.float(), size=(299, 299), align_corners=False) - 128) / 128
        assert torch.equal(M.preprocess(x, "torch-fidelity"), ref), (h, w)


def test_pytorch_fid_and_clean_preprocessing():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    # at 299 the resize is the identity in every protocol; only the scaling differs
    assert torch.allclose(M.preprocess(x, "pytorch-fid"), 2 * (x.float() / 255) - 1, atol=1e-6)
    assert torch.equal(M.preprocess(x, "clean"), (x.float() - 128) / 128)
    big = torch.randint(0, 256, (1, 3, 400, 520), generator=g, dtype=torch.uint8)
    clean = M.preprocess(big, "clean")
    assert clean.shape == (1, 3, 299, 299) and clean.min() >= -1 and clean.max() <= 127 / 128
    # clean-fid resizes each channel alone in float (mode "F"), bicubic
    ch = Image.fromarray(big[0, 1].numpy().astype(np.float32)).resize((299, 299), Image.BICUBIC)
    expect = (np.clip(np.asarray(ch), 0, 255) - 128) / 128
    np.testing.assert_array_equal(clean[0, 1].numpy(), expect.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        M.preprocess(big.float(), "clean")
    with pytest.raises(ValueError, match="RGB"):
        M.preprocess(big[:, :1], "pytorch-fid")
    with pytest.raises(ValueError, match="unknown FID protocol"):
        M.preprocess(big, "tf2")


# ------------------------------------------------------------------ the Inception network


from real_fixtures import random_inception_state as _random_inception_state  # noqa: E402


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(_random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """12 real COCO images (original sizes) and 12 others transformed (crop, flip, colour), as PNG."""
    files = sorted(COCO.glob("*.jpg"))
    if len(files) < 24:
        pytest.skip(f"needs the COCO images in {COCO}")
    out = tmp_path_factory.mktemp("transformed")
    transformed = []
    for i, f in enumerate(files[12:24]):
        with Image.open(f) as im:
            im = im.convert("RGB")
        w, h = im.size
        im = im.crop((w // 8, h // 10, w - w // 6, h - h // 12)).transpose(Image.FLIP_LEFT_RIGHT)
        im = Image.fromarray(np.clip(np.asarray(im, np.float32) * [1.2, 0.9, 0.8] + 10, 0, 255).astype(np.uint8))
        transformed.append(out / f"t{i:02d}.png")
        im.save(transformed[-1])
    return files[:12], transformed


def test_weights_layout_matches_pytorch_fid_and_torch_fidelity(weights_file):
    import pytorch_fid.inception as pfi
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = FIDInceptionV3().state_dict()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))
    assert {k: v.shape for k, v in tf.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    tv = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # pytorch-fid swaps in its FID blocks; they have the same parameter names as torchvision's
    assert set(tv.state_dict()) == set(ours)
    # files from older torch lack `num_batches_tracked`; they still load strictly
    state = {k: v for k, v in torch.load(weights_file, weights_only=True).items() if "num_batches" not in k}
    torch.save(state, weights_file.parent / "old.pth")
    load_fid_inception(weights_file.parent / "old.pth")


def test_missing_weights_error_names_file_and_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(InceptionWeightsNotFound) as e:
        find_weights()
    msg = str(e.value)
    assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg
    assert str(tmp_path / "env.pth") in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / WEIGHTS_FILENAME) in msg
    with pytest.raises(InceptionWeightsNotFound, match="argument"):
        find_weights(tmp_path / "typo.pth")
    hub = tmp_path / "th" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert find_weights() == hub  # env path missing -> falls through to the hub cache
    (tmp_path / "env.pth").write_bytes(b"x")
    assert find_weights() == tmp_path / "env.pth"
    with pytest.raises(ValueError, match="cannot load Inception weights"):
        load_fid_inception()  # not a torch file
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "env.pth")
    with pytest.raises(ValueError, match="do not match the FID Inception layout"):
        load_fid_inception()


class _FileImages(torch.utils.data.Dataset):
    """Images as torch-fidelity reads them: uint8 [3,H,W] tensors, original sizes."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


KID_ARGS = dict(kid_subsets=20, kid_subset_size=10)


@pytest.fixture(scope="module")
def ours_torch_fidelity(weights_file, image_sets):
    """Our whole pipeline, protocol torch-fidelity: generated = transformed set, reference = real set."""
    real, fake = image_sets
    ext = M.inception_extractor(weights_file)
    ref_stats = M.image_stats(real, ext, protocol="torch-fidelity", batch_size=8, keep_features=True)
    res = M.compute_fid(fake, ref_stats, protocol="torch-fidelity", feature_extractor=ext, batch_size=8, **KID_ARGS)
    assert res.name == "FID" and res.n == 12 and res.extra["n_ref"] == 12
    assert res.extra["protocol"] == "torch-fidelity" and res.extra["extractor"] == ext.id
    return res, ref_stats.features


def test_pipeline_matches_torch_fidelity_extractor(weights_file, image_sets, ours_torch_fidelity):
    """torch-fidelity's FeatureExtractorInceptionV3 (its resize, its network) on the same weights and images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = image_sets
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))
    with torch.no_grad():
        theirs = {name: torch.cat([net(x.unsqueeze(0))[0] for x in _FileImages(files)])
                  for name, files in (("real", real), ("fake", fake))}
    res, our_real = ours_torch_fidelity
    assert np.abs(our_real - theirs["real"].double().numpy()).max() <= 1e-5 * float(theirs["real"].abs().max())
    ref_fid = M.compute_fid(theirs["fake"].numpy(), M.FeatureStats.from_features(theirs["real"].numpy())).value
    assert res.value == pytest.approx(ref_fid, rel=1e-4)
    # torch-fidelity's KID on its float32 features (float32 arithmetic, as calculate_metrics does)
    kid_ref = kid_features_to_metric(theirs["fake"], theirs["real"], rng_seed=2020, verbose=False, **KID_ARGS)
    assert res.extra["kid"]["mean"] == pytest.approx(kid_ref["kernel_inception_distance_mean"], rel=1e-4)
    assert res.extra["kid"]["std"] == pytest.approx(kid_ref["kernel_inception_distance_std"], rel=1e-4)


@pytest.mark.slow  # torch-fidelity's FID takes the general eigenvalues of a 2048 x 2048 product
def test_pipeline_matches_torch_fidelity_calculate_metrics(weights_file, image_sets, ours_torch_fidelity):
    """End to end: torch_fidelity.calculate_metrics (FID and KID) on the same weights and images."""
    import torch_fidelity

    real, fake = image_sets
    ref = torch_fidelity.calculate_metrics(
        input1=_FileImages(fake), input2=_FileImages(real), cuda=False, fid=True, kid=True,
        feature_extractor_weights_path=str(weights_file), batch_size=1, cache=False, save_cpu_ram=True,
        verbose=False, **KID_ARGS)
    res, _ = ours_torch_fidelity
    assert res.value == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert res.extra["kid"]["mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert res.extra["kid"]["std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-4)


def test_pytorch_fid_protocol_matches_pytorch_fid(weights_file, image_sets, monkeypatch):
    """protocol pytorch-fid: features vs pytorch-fid's InceptionV3 + get_activations, same random weights."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    state = torch.load(weights_file, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)  # no download
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    real, fake = image_sets
    files = [str(f) for f in real[:4] + fake[:4]]
    theirs = get_activations(files, model, batch_size=1, dims=2048, device="cpu", num_workers=0)
    ext = M.inception_extractor(weights_file)
    ours = M.extract_features(files, ext, protocol="pytorch-fid", batch_size=4)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    # FID from each side's features (pytorch-fid's own sqrtm at 2048-d costs minutes on a busy CPU;
    # the distance itself is checked against it in test_frechet_distance_matches_pytorch_fid)
    ref = M.compute_fid(theirs[:4], M.FeatureStats.from_features(theirs[4:])).value
    res = M.compute_fid(ours[:4], M.FeatureStats.from_features(ours[4:]))
    assert res.value == pytest.approx(ref, rel=1e-4)


# ------------------------------------------------------------------ other feature spaces, cache, errors


class TinyEncoder(nn.Module):
    """A cheap stand-in feature space (FD-tiny): 4x4 average pooled colours."""

    input_size = 32

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _write_pngs(folder: Path, n: int, seed: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_reference_stats_cache(tmp_path, monkeypatch):
    files = _write_pngs(tmp_path / "ref", 12, 0)
    enc = M.Extractor(TinyEncoder(), "tiny", input_size=32)
    kw = dict(protocol="clean", feature_extractor=enc, batch_size=5)
    first = M.reference_stats(tmp_path / "ref", tmp_path / "cache", **kw)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and first.n == 12 and first.meta["protocol"] == "clean"

    calls = []
    real_image_stats = M.image_stats
    monkeypatch.setattr(M, "image_stats", lambda *a, **k: calls.append(1) or real_image_stats(*a, **k))
    again = M.reference_stats(tmp_path / "ref", tmp_path / "cache", **kw)
    assert not calls and np.array_equal(again.sum_outer, first.sum_outer)
    # another protocol is another key
    M.reference_stats(tmp_path / "ref", tmp_path / "cache", **{**kw, "protocol": "pytorch-fid"})
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # corrupt cache file: warned about and recomputed, not trusted
    cached[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="recomputing"):
        fixed = M.reference_stats(tmp_path / "ref", tmp_path / "cache", **kw)
    assert len(calls) == 2 and np.allclose(fixed.sigma, first.sigma)
    # a changed image changes the fingerprint
    os.utime(files[0], ns=(1, 1))
    M.reference_stats(tmp_path / "ref", tmp_path / "cache", **kw)
    assert len(calls) == 3
    # asking for features when the cached file has none recomputes and keeps them
    with_feats = M.reference_stats(tmp_path / "ref", tmp_path / "cache", keep_features=True, **kw)
    assert len(calls) == 4 and with_feats.features.shape == (12, 48)


def test_compute_fid_other_feature_space_and_errors(tmp_path):
    gen = _write_pngs(tmp_path / "gen", 10, 1)
    _write_pngs(tmp_path / "ref", 10, 2, size=(33, 50))
    assert M.fid_name("inception") == "FID" and M.fid_name("clip-vit-l14") == "FD-clip-vit-l14"
    ref = M.reference_stats(tmp_path / "ref", tmp_path / "cache", feature_extractor=TinyEncoder(),
                            extractor_name="tiny", keep_features=True)
    res = M.compute_fid(tmp_path / "gen", ref, feature_extractor=TinyEncoder(), extractor_name="tiny",
                        kid_subsets=5, bootstrap=20)
    assert res.name == "FD-tiny" and res.n == 10 and res.value > 0
    assert res.ci is not None and res.ci[0] <= res.ci[1] and res.extra["kid"]["subset_size"] == 10
    # features in, same number out
    feats = M.extract_features(gen, M.get_extractor(TinyEncoder(), "tiny"))
    assert M.compute_fid(feats, ref, extractor_name="tiny").value == pytest.approx(res.value, rel=1e-12)
    with pytest.raises(ValueError, match="reserved"):
        M.Extractor(TinyEncoder(), "inception")
    with pytest.raises(ValueError, match="needs a name"):
        M.compute_fid(tmp_path / "gen", ref, feature_extractor=TinyEncoder())
    with pytest.raises(ValueError, match="protocol differs"):
        M.compute_fid(tmp_path / "gen", ref, protocol="clean", feature_extractor=TinyEncoder(), extractor_name="tiny")
    (tmp_path / "gen" / "img005.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="img005.png"):
        M.compute_fid(tmp_path / "gen", ref, feature_extractor=TinyEncoder(), extractor_name="tiny")
    ext = M.get_extractor(TinyEncoder(), "tiny")
    with pytest.raises(ValueError, match="uint8"):
        M.extract_features(torch.rand(2, 3, 8, 8), ext)
    with pytest.raises(ValueError, match="RGB"):
        M.extract_features([torch.zeros(4, 8, 8, dtype=torch.uint8)], ext)

    class NaNEncoder(TinyEncoder):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(ValueError, match="NaN or inf"):
        M.extract_features(gen[:5], M.get_extractor(NaNEncoder(), "nan"))
    no_feats = M.FeatureStats.from_features(feats)
    with pytest.raises(ValueError, match="KID needs the features"):
        M.compute_fid(feats, no_feats, extractor_name="tiny", kid_subsets=5)


def test_score_fid_cli(weights_file, image_sets, tmp_path):
    import typer

    from evals.cli import app as root
    from evals.cli.score import fid

    assert "fid" in typer.main.get_command(root).commands["score"].commands  # mounted as `cm3eval score fid`
    app = typer.Typer()
    app.command()(fid)
    real, fake = image_sets
    for name, files in (("gen", fake[:3]), ("ref", real[:3])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f.name).symlink_to(f)
    args = [str(tmp_path / "gen"), str(tmp_path / "ref"), "--weights", str(weights_file), "--cache-dir",
            str(tmp_path / "cache"), "--kid", "--device", "cpu", "--save-ref-stats", str(tmp_path / "ref.npz"),
            "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip())
    assert out["name"] == "FID" and out["n"] == 3 and out["extra"]["kid"]["subset_size"] == 3
    # the saved reference stats give the same number
    res2 = CliRunner().invoke(app, [str(tmp_path / "gen"), "--ref-stats", str(tmp_path / "ref.npz"), "--weights",
                                    str(weights_file), "--device", "cpu", "--json"])
    assert res2.exit_code == 0, res2.output
    assert json.loads(res2.stdout.strip())["value"] == pytest.approx(out["value"], rel=1e-9)
    # errors are one clear line, exit code 2
    res3 = CliRunner().invoke(app, [str(tmp_path / "gen"), str(tmp_path / "ref"), "--weights",
                                    str(tmp_path / "nope.pth")])
    assert res3.exit_code == 2 and WEIGHTS_FILENAME in res3.output
    res4 = CliRunner().invoke(app, [str(tmp_path / "gen"), "--weights", str(weights_file)])
    assert res4.exit_code != 0 and "exactly one of REF_DIR or --ref-stats" in res4.output


def test_the_split_modules_are_the_public_api(tmp_path, monkeypatch):
    """fid.py re-exports its seams (stats, resize, features); one square crop; one cache variable."""
    from evals.metrics import fid_features, fid_resize, fid_stats

    assert M.FeatureStats is fid_stats.FeatureStats and M.frechet_distance is fid_stats.frechet_distance
    assert M.preprocess is fid_resize.preprocess and M.square_resize is fid_resize.square_resize
    assert M.Extractor is fid_features.Extractor and M.inception_extractor is fid_features.inception_extractor
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    assert fid_resize.square_resize(img, 16).size == (16, 16)
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "c"))
    assert M.default_cache_dir() == tmp_path / "c" / "fid-stats"
    monkeypatch.delenv("CM3EVAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.default_cache_dir() == tmp_path / "x" / "cm3eval" / "fid-stats"
