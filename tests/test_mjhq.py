"""mjhq-fid: the MJHQ-30K release layout (meta_data.json, images per category folder), its loader, and
FID per category with the clean-fid protocol (clean-fid's TorchScript layout, seeded random weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from metric_fixtures import save_cleanfid_inception, write_mjhq


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_mjhq(tmp_path_factory.mktemp("mjhq-root"))


def test_loader_reads_the_release_layout(root):
    from tasks.loaders import load_dataset
    from tasks.registry import get

    spec = get("mjhq-fid")
    samples = load_dataset(spec, root).samples
    assert len(samples) == 6 and {s.meta["category"] for s in samples} == {"animals", "people"}
    s = samples[0]
    assert len(s.id) == 40 and s.text and (root / s.image).is_file()
    assert s.image == f"mjhq/mjhq30k_imgs/{s.meta['category']}/{s.id}.jpg"
    assert spec.metrics["fid"]["protocol"] == "clean" and spec.metrics["fid_per_category"]["protocol"] == "clean"


def test_loader_errors_name_the_file(root, tmp_path):
    from tasks.errors import DataError
    from tasks.loaders import load_dataset
    from tasks.registry import get

    bad = tmp_path / "bad"
    shutil.copytree(root / "mjhq", bad / "mjhq")
    (bad / "mjhq" / "meta_data.json").write_text('{"abc": {"prompt": "a cat"}}')
    with pytest.raises(DataError, match=r"meta_data.json: abc: expected a field 'category'"):
        load_dataset(get("mjhq-fid"), bad)


class _Ctx:
    def __init__(self, records, gen, ref):
        self.records, self._gen, self._ref, self.device, self.seed = records, gen, ref, "cpu", 0

    def output_paths(self):
        return self._gen

    def data_images(self, role):
        return self._ref


def test_fid_per_category_with_the_clean_fid_network(root, tmp_path):
    from evals import image_scoring
    from evals.metrics import fid as M
    from evals.scoring import METRICS, higher_is_better
    from tasks.loaders import load_dataset
    from tasks.registry import get

    torch.set_num_threads(1)
    weights = save_cleanfid_inception(tmp_path / "inception-2015-12-05.pt")
    samples = load_dataset(get("mjhq-fid"), root).samples
    ref = [root / s.image for s in samples]
    gen = ref[1:] + ref[:1]  # "generated" images: the references shifted by one, across categories
    records = [{"id": s.id, "meta": s.meta} for s in samples]
    opts = {**METRICS["fid_per_category"].options, "weights": weights}
    res = image_scoring.fid_per_category(_Ctx(records, gen, ref), opts)
    assert set(res) == {"FID/animals", "FID/people"}
    ext = M.inception_extractor(weights, protocol="clean")
    for cat in ("animals", "people"):
        idx = [i for i, s in enumerate(samples) if s.meta["category"] == cat]
        expect = M.compute_fid([gen[i] for i in idx], [ref[i] for i in idx], protocol="clean", feature_extractor=ext)
        # 3 samples in 2048 dims: singular covariances amplify float32 feature rounding (batching differs
        # between the two extractions) to ~1e-4; a wrong grouping would differ by far more
        assert res[f"FID/{cat}"].value == pytest.approx(expect.value, rel=1e-3) and expect.value > 0
        assert higher_is_better(f"FID/{cat}", "fid_per_category") is False
