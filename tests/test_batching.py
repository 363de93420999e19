"""cm3leon/batching.py (the one batch-size rule and the roofline), evals/sizing.py (a task's
geometry for it) and evals/devices.py (--device / --dtype auto, refused devices)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tasks
from cm3leon import batching, families
from cm3leon.config import ModelConfig
from cm3leon.transformer import Transformer
from evals import devices, sizing
from evals.devices import DeviceChoice, DeviceError

GB = 10**9
# Chameleon-7B: 32 layers, 32 KV heads of 128, SwiGLU 11008, 65,536 ids, 1,024 codes per image
CHAMELEON_7B = ModelConfig(vocab_size=65536, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096,
                           qk_norm=True, image_codebook_size=8192, image_seq_len=1024, image_token_offset=4,
                           bos_id=0, pad_id=1, eos_id=2, boi_id=8197, eoi_id=8196, break_id=8198)
H100 = DeviceChoice("cuda:0", "bfloat16", auto=True, name="NVIDIA H100 80GB HBM3", total_memory=80 * GB)


def test_a_7b_coco_fid_prompt_fits_six_times_on_an_80gb_gpu():
    """The paper's coco-fid geometry (2 retrieved documents, 8 candidates, guidance) at 7B in bf16:
    one shared prefix per stream kind and 16 suffix rows of 1,024 codes per prompt."""
    per_position = batching.position_bytes(CHAMELEON_7B, torch.bfloat16)
    assert per_position == 2 * 32 * 32 * 128 * 2 == 524_288  # K and V, 32 layers, 0.5 MiB
    cond = 1 + 2 * (64 + 1026 + 1) + 64 + 1 + 1  # bos, 2 documents (text, image, eot), caption, eot, boi
    kv = batching.kv_bytes_per_prompt(CHAMELEON_7B, [cond, 2], n_rows=16, budget=1024, dtype="bfloat16")
    assert cond == 2249 and kv == (2249 + 2 + 16 * 1024) * per_position == 9_770_106_880  # 9.8 GB
    weights = batching.weight_bytes(CHAMELEON_7B, torch.bfloat16)
    assert weights == 2 * 7_013_666_816  # 14.0 GB
    budget = batching.kv_budget(80 * GB, weights)
    assert budget == 80 * GB - weights - batching.WORKSPACE_RESERVE == 59_530_215_424  # 59.5 GB
    assert batching.prompts_per_step(kv, budget) == 6
    # every row storing the whole left-padded prompt again (16 rows x (2249 + 1024)) holds one
    padded = 16 * (2249 + 1024) * per_position
    assert batching.prompts_per_step(padded, budget) == 2 and padded > 2.8 * kv


def test_the_plan_sizes_the_registry_task_the_same_way():
    fid = tasks.get("coco-fid")
    assert sizing.stream_kinds(fid) == ["cond", "uncond"]
    assert [sizing.prefix_len(CHAMELEON_7B, fid, families.CHAMELEON, k) for k in ("cond", "uncond")] == [2249, 2]
    s = sizing.size_task(fid, CHAMELEON_7B, families.CHAMELEON, H100, n_samples=30_000)
    assert (s.prompts_per_step, s.kv_bytes_per_prompt, s.roofline) == (6, 9_770_106_880, "this NVIDIA H100")
    # decoding is bandwidth-bound: 1,024 steps reading the weights + 6 half-full caches, 5,000 chunks;
    # the prefills (6 x 2,251 tokens, compute-bound) add under 2 %
    step = (14_027_333_632 + 6 * (2251 + 16 * 512) * 524_288) / 3.35e12
    assert 5000 * 1024 * step < s.gpu_seconds < 1.02 * 5000 * 1024 * step
    assert 19 < s.gpu_seconds / 3600 < 21
    line = s.describe("coco-fid")
    assert line.startswith("coco-fid: 6 prompts per step (KV 9.8 GB per prompt of a 59.5 GB budget), modelled ")
    assert "of GPU time for 30,000 prompts on this NVIDIA H100" in line and "\n" not in line
    # --batch-size overrides; editing's image-only stream is the conditional one without its text
    assert sizing.size_task(fid, CHAMELEON_7B, families.CHAMELEON, H100, override=3).prompts_per_step == 3
    edit = tasks.get("magicbrush-edit")
    kinds = sizing.stream_kinds(edit)
    lens = {k: sizing.prefix_len(CHAMELEON_7B, edit, families.CHAMELEON, k) for k in kinds}
    if "image_cond" in kinds:
        assert lens["image_cond"] == lens["cond"] - 64


def test_a_cpu_run_models_an_h100_as_the_reference():
    cpu = DeviceChoice("cpu", "float32", auto=True)
    s = sizing.size_task(tasks.get("coco-fid"), CHAMELEON_7B, families.CHAMELEON, cpu, n_samples=30_000)
    assert s.prompts_per_step == 1 and s.kv_budget == batching.CPU_KV_BUDGET  # fp32: 19.5 GB per prompt
    gpu = sizing.size_task(tasks.get("coco-fid"), CHAMELEON_7B, families.CHAMELEON, H100, n_samples=30_000)
    assert s.gpu_seconds == gpu.gpu_seconds  # the same H100 in bf16, at the 6 prompts its memory holds
    assert "reference; this run is on cpu" in s.describe("coco-fid")


@pytest.mark.parametrize("kw", [{}, dict(norm="layernorm", mlp="gelu", bias=True, pos_encoding="learned"),
                                dict(qk_norm=True, n_kv_heads=2, tie_embeddings=True),
                                dict(norm="layernorm", norm_affine=False, mlp="relu")])
def test_weight_params_count_the_models_parameters(kw):
    cfg = ModelConfig(**kw)
    assert batching.weight_params(cfg) == Transformer(cfg).num_parameters()


def test_budget_cap_override_and_tensor_parallel():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    assert batching.kv_budget(None, 123) == batching.CPU_KV_BUDGET
    assert batching.kv_budget(10, 123) == 0
    assert batching.prompts_per_step(10, 0) == 1  # never zero
    assert batching.prompts_per_step(1, 10**12) == batching.MAX_PROMPTS_PER_STEP
    assert batching.prompts_per_step(1, 10**12, override=5) == 5
    one = batching.kv_bytes_per_prompt(cfg, [10], 2, 8, torch.float32)
    assert one == (10 + 2 * 8) * 2 * 2 * 2 * 16 * 4
    assert batching.kv_bytes_per_prompt(cfg, [10], 2, 8, torch.float32, tp=2) * 2 == one  # KV heads split
    assert batching.position_bytes(cfg, "float32", tp=4) == batching.position_bytes(cfg, "float32", tp=2)


def test_rooflines_by_device_name():
    assert batching.roofline_for("NVIDIA H100 80GB HBM3") == (batching.ROOFLINES["H100"], True)
    assert batching.roofline_for("NVIDIA H200") == (batching.ROOFLINES["H200"], True)
    assert batching.roofline_for("Some Future GPU") == (batching.REFERENCE, False)
    assert batching.roofline_for(None) == (batching.REFERENCE, False)


def test_the_demo_keeps_its_batch():
    """The shipped demo model's tasks are capped at 64 prompts per step on a CPU, as before."""
    from cm3leon.checkpoint import inspect

    info = inspect("demo")
    cpu = DeviceChoice("cpu", "float32")
    for name in tasks.suites()["demo"]:
        s = sizing.size_task(tasks.get(name), info.config, families.get(info.family), cpu)
        assert s.prompts_per_step == 64 and s.kv_bytes_per_prompt * 64 < batching.CPU_KV_BUDGET


# ----------------------------------------------------------------------------- devices
def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = devices.resolve("auto", "auto")
    assert choice == DeviceChoice("cpu", "float32", auto=True)
    assert choice.describe() == "device: cpu (auto: no CUDA), dtype float32"
    assert devices.resolve("cpu", "bfloat16").describe() == "device: cpu, dtype bfloat16"
    with pytest.raises(DeviceError, match=r"^--device cuda: torch sees no CUDA device .*--device cpu"):
        devices.resolve("cuda")
    with pytest.raises(DeviceError, match=r"^--device cuda:0: torch sees no CUDA device"):
        devices.resolve("cuda:0")


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=f"NVIDIA H100 80GB HBM3 #{i}", total_memory=85 * GB))


def test_auto_takes_the_ranks_gpu_in_bfloat16(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    choice = devices.resolve("auto")
    assert (choice.device, choice.dtype, choice.total_memory) == ("cuda:0", "bfloat16", 85 * GB)
    assert choice.describe() == "device: cuda:0 (auto; NVIDIA H100 80GB HBM3 #0, 79.2 GiB), dtype bfloat16"
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each rank its own GPU
    assert devices.resolve("auto").device == devices.resolve("cuda").device == "cuda:1"
    assert devices.resolve("cuda:0", "float32").dtype == "float32"
    with pytest.raises(DeviceError, match=r"^--device cuda:7: torch sees 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        devices.resolve("cuda:7")
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(DeviceError, match=r"LOCAL_RANK is 1"):
        devices.resolve("auto")


@pytest.mark.parametrize("device, dtype, expected", [
    ("cuda:banana", "auto", "--device cuda:banana: expected auto"),
    ("tpu", "auto", "--device tpu: expected"),
    ("cpu:0", "auto", "--device cpu:0: expected"),
    ("cpu", "float16", "--dtype float16: expected auto, float32 or bfloat16"),
])
def test_malformed_flags_are_refused_without_torch(device, dtype, expected):
    with pytest.raises(DeviceError, match=f"^{expected}"):
        devices.check_syntax(device, dtype)


def test_an_absent_mps_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="^--device mps: torch sees no Apple MPS device"):
        devices.resolve("mps")
