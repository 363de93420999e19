"""`cm3eval bench sampler --json` runs end to end and reports the agreed keys."""

import json

import pytest
from typer.testing import CliRunner


def test_bench_sampler_json():
    pytest.importorskip("transformers")
    from evals.cli import app

    res = CliRunner().invoke(app, ["bench", "sampler", "--size", "tiny", "--new-tokens", "8", "--batches", "1,2",
                                   "--repeats", "1", "--image-batch", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    for key in ("tokens_per_s", "transformers_tokens_per_s", "speedup_vs_transformers", "step_over_roofline",
                "overhead_vs_minimal_loop", "images_per_s"):
        assert out[key] > 0
    assert out["identical_greedy_tokens"] is True
    assert out["host_syncs_per_step"] == 0
    assert {r["batch"] for r in out["by_batch"]} == {1, 2}


def test_bench_sampler_named_config_json():
    from evals.cli import app

    res = CliRunner().invoke(app, ["bench", "sampler", "--config", "demo", "--new-tokens", "6", "--batches", "1,2",
                                   "--repeats", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["config"] == "demo" and out["params"] > 1e6
    assert out["host_syncs_per_step"] == 0
    assert 0 < out["host_syncs_per_step_amortised"]["text"] <= 1 / 5  # one flag read per 16 steps, and collect
    assert out["host_syncs_per_step_amortised"]["image_cfg"] == 0
    assert out["eager_ops_per_step"] > 10 * 4  # counted: more than ten aten ops per layer of the 4-layer demo
    assert [r["batch"] for r in out["minimal_loop"]] == [1, 2]
    assert out["overhead_vs_minimal_loop"] == max(r["overhead"] for r in out["minimal_loop"]) > 0
    assert out["images_per_s"] > 0 and out["images_per_s_batch"] == 32  # the default: the batch


def test_bench_sampler_refuses_unknown_names():
    from evals.cli import app

    res = CliRunner().invoke(app, ["bench", "sampler", "--config", "gpt-9"])
    assert res.exit_code != 0 and "unknown config" in res.output


def test_bench_sampler_geometry_counters_come_from_the_engines():
    """The coco-fid geometry at 40 codes per image (the CLI runs 1,024): the new engine reads each
    prefix once plus each row's suffix, prefills one prefix set, and keeps the previous engine's tokens."""
    from evals.bench.sampler_geometry import run_geometry

    out = run_geometry("coco-fid", image_seq_len=40)
    read, least = out["kv_positions_read_per_step_per_prompt"], out["kv_positions_min_per_step_per_prompt"]
    prefill, prefix = out["prefill_tokens_per_prompt"], out["prefix_tokens_per_prompt"]
    T = out["prompt_tokens"][0]
    assert prefix["new"] == sum(out["prompt_tokens"]) / 2 + 2  # conditional prompts + `<s> <racm3:break>`
    assert prefill["previous"] == 16 * T  # 8 candidates x 2 streams, each row the padded prompt
    assert least["new"] <= read["new"] <= 1.1 * least["new"]
    assert read["previous"] > 2 * read["new"]
    assert prefix["new"] <= prefill["new"] <= 1.05 * prefix["new"]
    assert out["kv_bytes_per_prompt"]["new"] < out["kv_bytes_per_prompt"]["previous"]
    assert out["same_tokens_first_prompt"] is True
    assert out["attention_backend"] in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def test_bench_sampler_device_defaults_to_auto_and_refuses_an_absent_one(monkeypatch):
    import torch

    from evals.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "sampler", "--config", "demo", "--device", "cuda:banana"]) == 2
    assert main(["bench", "sampler", "--config", "demo", "--device", "cuda"]) == 2
    import evals.bench.sampler as bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: seen.setdefault("args", a) and {})
    monkeypatch.setattr(bench, "_print_table", lambda res: None)
    assert main(["bench", "sampler", "--config", "demo"]) == 0
    assert seen["args"][3:5] == ("cpu", "float32")  # device, dtype: auto on a machine without CUDA
