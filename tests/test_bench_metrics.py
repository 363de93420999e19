"""`cm3eval bench metrics`: JSON shape, identical numbers, the optional FID part. No timing asserts."""

from __future__ import annotations

import json
import sys
import types

import pytest
import typer
from typer.testing import CliRunner

from evals.bench import metrics as bench_metrics


def _app():
    app = typer.Typer()
    app.command()(bench_metrics.command)
    return app


def test_json_output_small_n():
    out = CliRunner().invoke(_app(), ["--json", "--n-questions", "2000", "--no-fid", "--no-networks"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert {"vqa_speedup", "vqa_identical", "vqa", "fid"} <= set(got)
    assert got["vqa_identical"] is True and got["vqa"]["mismatches"] == []
    assert got["vqa"]["n_questions"] == 2000 and got["vqa_speedup"] > 0
    assert 0 < got["vqa"]["accuracy"] < 100
    assert got["fid"] == {"skipped": "--no-fid"}


def test_fid_part_is_included_when_the_module_exists(monkeypatch):
    fake = types.ModuleType("evals.bench.fid")
    fake.run_fid_bench = lambda: {"fd_speedup": 3.0, "dim": 2048}
    monkeypatch.setitem(sys.modules, "evals.bench.fid", fake)
    out = CliRunner().invoke(_app(), ["--json", "--n-questions", "300", "--no-networks"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["fid"] == {"fd_speedup": 3.0, "dim": 2048}


def test_mismatch_fails_the_command(monkeypatch):
    from evals.metrics import vqa as vqa_lib

    real = vqa_lib.vqa_accuracy

    def off_by_one(preds, anns, **kw):
        r = real(preds, anns, **kw)
        r.per_sample = r.per_sample.copy()
        r.per_sample[0] += 1e-9
        return r

    monkeypatch.setattr(vqa_lib, "vqa_accuracy", off_by_one)
    out = CliRunner().invoke(_app(), ["--json", "--n-questions", "200", "--no-fid", "--no-networks"])
    assert out.exit_code == 1 and "differs from the reference" in out.output


def test_legacy_loop_is_benchmarked_too():
    out = CliRunner().invoke(_app(), ["--json", "--n-questions", "500", "--no-fid", "--legacy", "--no-networks"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)["vqa"]
    assert got["evaluation"] == "legacy-2017" and got["identical"] is True


def test_table_output():
    out = CliRunner().invoke(_app(), ["--n-questions", "300", "--no-fid", "--no-networks"])
    assert out.exit_code == 0, out.output
    assert "vectorised" in out.stdout and "identical numbers: yes" in out.stdout


def test_network_part_reports_each_network_beside_its_plain_forward():
    import torch

    from evals.bench.networks import run_network_bench

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = run_network_bench(n_images=2, batch=2, repeats=1, image_size=64)
    finally:
        torch.set_num_threads(before)
    for name in ("inception (pytorch-fid)", "inception (clean)", "dinov2-vits14", "clip ViT-B-32"):
        r = got[name]
        assert r["images"] == 2 and r["extract_images_per_s"] > 0 and r["forward_images_per_s"] > 0, name
        assert r["ratio"] == pytest.approx(r["extract_images_per_s"] / r["forward_images_per_s"]), name
    assert got["min_ratio"] == min(got[n]["ratio"] for n in got if isinstance(got[n], dict) and "ratio" in got[n])
