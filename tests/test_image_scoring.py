"""FID, CMMD, FD-DINOv2 and PRDC from one `cm3eval score images` call on two folders of the vendored real
COCO images (random networks saved in the real files' layouts), and the metric table's directions."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from metric_fixtures import save_dinov2
from real_data import COCO_MINI_IMAGES as COCO

NEW = {"CMMD": False, "FD-DINOv2": False, "precision": True, "recall": True, "density": True, "coverage": True}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from real_fixtures import save_inception, save_open_clip

    root = tmp_path_factory.mktemp("images")
    images = sorted(COCO.glob("*.jpg"))
    for name, part in (("ref", images[:12]), ("gen", images[12:])):
        (root / name).mkdir()
        for f in part:
            shutil.copy(f, root / name / f.name)
    return {"root": root, "inception": save_inception(root / "inception.pth"),
            "dinov2": save_dinov2(root / "dinov2_vits14_pretrain.pth"),
            "clip": save_open_clip(root / "open_clip_model.safetensors")}


def _score(*args):
    from evals.cli.score import score_app

    return CliRunner().invoke(score_app, ["images", *map(str, args)])


def test_four_metrics_in_one_call_with_cis(files, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(files["root"] / "cache"))
    from real_fixtures import CLIP_ARCH

    root = files["root"]
    out = _score(root / "gen", root / "ref", "--weights", files["inception"], "--dinov2-weights", files["dinov2"],
                 "--dinov2-arch", "vits14", "--cmmd-encoder", f"open_clip:{CLIP_ARCH}:{files['clip']}",
                 "--resolution", "128", "--bootstrap", "20", "--device", "cpu", "--json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["not_computed"] == {} and got["n_generated"] == got["n_reference"] == 12
    metrics = got["metrics"]
    assert set(metrics) == {"FID", *NEW}
    for name, m in metrics.items():
        lo, hi = m["ci"]
        assert lo <= hi and m["value"] is not None and isinstance(m["higher_is_better"], bool), (name, m)
    assert metrics["FID"]["value"] > 0 and metrics["FD-DINOv2"]["value"] > 0 and metrics["CMMD"]["value"] > 0
    assert metrics["FD-DINOv2"]["extra"]["arch"] == "vits14" and metrics["precision"]["extra"]["nearest_k"] == 5


def test_a_requested_metric_not_computed_is_exit_3(files, tmp_path, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("CM3EVAL_DINOV2_WEIGHTS", raising=False)
    out = _score(files["root"] / "gen", files["root"] / "ref", "--metrics", "fd_dinov2", "--device", "cpu", "--json")
    assert out.exit_code == 3, out.output
    why = json.loads(out.stdout)["not_computed"]["fd_dinov2"]
    assert "dinov2_vitl14_pretrain.pth" in why and "\n" not in why


def test_every_new_result_has_its_direction_in_the_table():
    from evals.scoring import METRICS, check_metrics, higher_is_better

    for name, hib in NEW.items():
        assert higher_is_better(name) is hib, name
    assert {"cmmd", "fd_dinov2", "prdc"} <= set(METRICS)
    from tasks.registry import get

    check_metrics(get("coco-fid"), "coco-fid")  # its cmmd and fd_dinov2 blocks are valid
