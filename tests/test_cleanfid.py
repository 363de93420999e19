"""protocol "clean" is clean-fid's FID: its resize and its Inception TorchScript, checked by running the
clean-fid package on the same images with the same (seeded random, clean-fid layout) file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from evals.metrics import fid as M
from metric_fixtures import save_cleanfid_inception
from real_data import COCO_MINI_IMAGES as COCO


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cleanfid_file(tmp_path_factory):
    return save_cleanfid_inception(tmp_path_factory.mktemp("cleanfid") / "inception-2015-12-05.pt")


@pytest.fixture(scope="module")
def theirs(cleanfid_file, folders):
    """clean-fid's features of both folders: `get_folder_features` as `cleanfid.compute_fid` calls it."""
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(cleanfid_file.parent), download=False)  # loads <dir>/inception-2015-12-05.pt
    kw = dict(mode="clean", num_workers=0, batch_size=6, device=torch.device("cpu"), verbose=False)
    return {name: cleanfid.get_folder_features(str(d), model, **kw) for name, d in zip(("real", "fake"), folders)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    files = sorted(COCO.glob("*.jpg"))
    for name, part in (("real", files[:6]), ("fake", files[12:18])):
        (root / name).mkdir()
        for f in part:
            shutil.copy(f, root / name / f.name)
    return root / "real", root / "fake"


@pytest.fixture(scope="module")
def ours(cleanfid_file, folders):
    real, fake = folders
    ext = M.inception_extractor(cleanfid_file, protocol="clean")
    ours_real = M.extract_features(real, ext, protocol="clean", batch_size=6)
    res = M.compute_fid(fake, M.FeatureStats.from_features(ours_real, meta={"protocol": "clean", "extractor": ext.id}),
                        protocol="clean", feature_extractor=ext, batch_size=6)
    return ext, ours_real, res


def test_clean_protocol_features_equal_the_clean_fid_package(ours, theirs):
    ext, ours_real, res = ours
    assert ext.id.startswith("cleanfid-inception:") and res.name == "FID" and res.extra["protocol"] == "clean"
    assert np.abs(ours_real - theirs["real"]).max() <= 1e-6 * np.abs(theirs["real"]).max()
    # 6 images in 2048 dims: singular covariances make the distance ill-conditioned (float32 feature
    # rounding moves it by ~1e-5 relative), so the two feature sets' FIDs agree to 1e-4
    on_their_features = M.compute_fid(theirs["fake"], M.FeatureStats.from_features(theirs["real"])).value
    assert res.value == pytest.approx(on_their_features, rel=1e-4) and res.value > 0


@pytest.mark.slow  # scipy's sqrtm of a singular 2048 x 2048 product: minutes on 2 shared cores
def test_clean_fid_end_to_end(ours, theirs):
    from cleanfid import fid as cleanfid

    ref_fid = float(cleanfid.fid_from_feats(theirs["fake"], theirs["real"]))  # what compute_fid(fake, real) returns
    assert ours[2].value == pytest.approx(ref_fid, rel=1e-4), (ours[2].value, ref_fid)


def test_frechet_distance_equals_clean_fids(n=900, dim=64):
    """clean-fid's `frechet_distance` (scipy sqrtm) where it is accurate: well-conditioned covariances."""
    from cleanfid.fid import frechet_distance as reference

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
    b = a[::-1] * 1.05 + rng.standard_normal((n, dim)) * 0.3 + 0.1
    st = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    expect = float(reference(st[0][0], st[0][1], st[1][0], st[1][1]))
    assert M.frechet_distance(st[0][0], st[0][1], st[1][0], st[1][1]) == pytest.approx(expect, rel=1e-6)


def test_clean_fid_file_errors(tmp_path, monkeypatch):
    from evals.metrics.cleanfid import load_cleanfid_inception
    from tasks.weights import WeightsNotFound

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("CM3EVAL_CLEANFID_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFound) as e:
        M.inception_extractor(protocol="clean")
    assert "inception-2015-12-05.pt" in str(e.value) and "nvlabs" in str(e.value)
    bad = tmp_path / "inception-2015-12-05.pt"
    torch.save({"x": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="cannot load clean-fid's Inception TorchScript"):
        load_cleanfid_inception(bad)
