"""scripts/gpu-check.sh in --smoke mode (tiny shapes, any machine): one JSON object with every
check's key; a failing check records its error and the rest still run. The CUDA-only checks'
code runs here on the CPU at tiny shapes (the script itself reports them skipped without CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from evals.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_the_smoke_run_prints_one_json_object_with_every_check():
    pytest.importorskip("transformers")
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--smoke"], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHON": os.sys.executable})
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()
    out = json.loads(line)
    assert out["smoke"] is True and set(out["checks"]) == set(gpu_check.CHECKS)
    checks = out["checks"]
    for name, value in checks.items():
        if name in gpu_check.CUDA_ONLY and not torch.cuda.is_available():
            assert value == "skipped: no CUDA"
        else:
            assert "error" not in value, (name, value)
    assert checks["text_vs_transformers"]["identical_greedy_tokens"] is True
    assert checks["roofline_batch1"]["step_over_roofline"] > 0
    for shape in ("chameleon-1b-shape", "chameleon-7b-shape"):
        row = checks["images_per_s"][shape]
        assert row["prefix_sharing_on"] > 0
        off = row["prefix_sharing_off"]
        assert off > 0 if gpu_check.previous_sampler() else off.startswith("unavailable")


def test_a_failing_check_is_recorded_and_the_others_run(monkeypatch):
    def broken(smoke):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(gpu_check.CHECKS, "counter_rng", broken)
    monkeypatch.setattr(gpu_check, "CUDA_ONLY", ())
    out = gpu_check.run_checks(True, only=["counter_rng", "sdpa_backend_30b"])["checks"]
    assert out["counter_rng"]["error"].startswith("RuntimeError: out of memory")
    assert set(out["sdpa_backend_30b"]) >= {"prefill_causal", "decode_masked", "ok"}


def test_the_device_checks_code_on_the_cpu():
    assert gpu_check.check_counter_rng(True, dev="cpu")["ok"] is True
    top_p = gpu_check.check_top_p_prefilter(True, dev="cpu", rows=1000)
    assert top_p["ok"] and top_p["wrong_where_exact"] == 0 and top_p["exact_rows"] > 0
    same = gpu_check.check_prompts_per_step(True, dev="cpu")
    assert same["ok"] and same["differ"] == {2: 0, 4: 0}
    sdpa = gpu_check.check_sdpa_backend_30b(True, dev="cpu")
    assert sdpa["prefill_causal"]["runs"]["MATH"] is True and sdpa["prefill_causal"]["picked"] in {
        "MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}
