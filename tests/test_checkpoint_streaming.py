"""Loading streams: peak host memory while loading a sharded checkpoint, measured in a fresh process.

The decoder is built on the meta device, allocated once on the target device in the target dtype,
and filled tensor by tensor from memory-mapped shards. On a CPU-only machine the target is the host,
so the loaded model's own bytes are host memory too: the bound is on what loading costs ABOVE the
baseline process plus the model it returns (peak - baseline - model bytes <= 1.25 x largest shard
+ 0.5 GiB). The old loader read every shard and built an fp32 model beside them (3.55x the bf16 size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chameleon_fixture import VOCAB_SIZE, VQ_CONFIG, chameleon_vocab, write_tokenizer

GiB = 1 << 30

_MEASURE = r"""
import json, sys, torch
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gc
import cm3leon.checkpoint as ck  # imports done before the baseline
# warm-up: the first load pages in torch's and safetensors' code (file-backed RSS that any process
# that has loaded once already holds); the demo model is small and native
warm = ck.load("demo", dtype=getattr(torch, sys.argv[2]), with_encoder=False)
del warm
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
bundle = ck.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), with_encoder=False)
peak = status("VmHWM:")
model_bytes = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
print(json.dumps({"base": base, "peak": peak, "model_bytes": model_bytes, "n_params": bundle.model.num_parameters(),
                  "largest": bundle.info.largest_file_bytes, "files": len(bundle.info.files)}))
"""


def write_random_hf(out: Path, *, d: int, layers: int, d_ff: int, heads: int, n_shards: int = 5,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random HF-layout Chameleon written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import ChameleonConfig

    out.mkdir(parents=True)
    vocab = chameleon_vocab(hf=True)
    ChameleonConfig(vocab_size=VOCAB_SIZE, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                    vocabulary_map=vocab, vq_config=dict(VQ_CONFIG)).save_pretrained(out)
    write_tokenizer(vocab, out / "tokenizer.json")
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (VOCAB_SIZE, d)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "self_attn.q_norm.weight": (heads, d // heads), p + "self_attn.q_norm.bias": (heads, d // heads),
                       p + "self_attn.k_norm.weight": (heads, d // heads), p + "self_attn.k_norm.bias": (heads, d // heads),
                       p + "mlp.gate_proj.weight": (d_ff, d), p + "mlp.up_proj.weight": (d_ff, d),
                       p + "mlp.down_proj.weight": (d, d_ff), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    groups.append({"model.norm.weight": (d,), "lm_head.weight": (VOCAB_SIZE, d)})
    # layers spread over the middle shards; embeddings first, head last
    middle = [g for g in groups[1:-1]]
    per = -(-len(middle) // (n_shards - 2))
    shards = [groups[0]] + [{k: v for g in middle[i:i + per] for k, v in g.items()} for i in range(0, len(middle), per)]
    shards.append(groups[-1])
    assert len(shards) == n_shards, len(shards)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shapes in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return out


def measure(folder: Path, dtype: str = "bfloat16") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), dtype], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["above_base"] = r["peak"] - r["base"]
    r["overhead"] = r["above_base"] - r["model_bytes"]  # what loading costs beyond the model it returns
    r["ratio_above_base"] = r["above_base"] / r["largest"]
    r["ratio_overhead"] = r["overhead"] / r["largest"]
    return r


def _report(r: dict) -> str:
    return (f"{r['n_params'] / 1e6:.0f}M params in {r['files']} shards, largest {r['largest'] / 2**20:.0f} MiB: "
            f"peak RSS above baseline {r['above_base'] / 2**20:.0f} MiB = {r['ratio_above_base']:.2f}x the largest "
            f"shard (model itself {r['model_bytes'] / 2**20:.0f} MiB, on the host here); loading overhead "
            f"{r['overhead'] / 2**20:.0f} MiB = {r['ratio_overhead']:.2f}x the largest shard")


def _bound(r: dict) -> float:
    return 1.25 * r["largest"] + 0.5 * GiB


@pytest.mark.slow
def test_loading_a_650m_checkpoint_peaks_near_one_shard(tmp_path):
    folder = write_random_hf(tmp_path / "big", d=2048, layers=5, d_ff=5632, heads=16)
    r = measure(folder)
    print("\n" + _report(r))
    assert r["n_params"] >= 500_000_000 and r["files"] == 5
    assert r["overhead"] <= _bound(r), _report(r)
    # the old loader: every shard in RAM, then an fp32 model (3.55x the bf16 size)
    assert r["above_base"] < 1.6 * r["model_bytes"], _report(r)


def test_loading_streams_a_small_sharded_checkpoint(tmp_path):
    folder = write_random_hf(tmp_path / "small", d=512, layers=3, d_ff=1536, heads=8)
    r = measure(folder)
    print("\n" + _report(r))
    assert r["files"] == 5
    assert r["overhead"] <= _bound(r), _report(r)
    # same code path in float32: the cast happens tensor by tensor, never for a whole shard
    r32 = measure(folder, "float32")
    assert r32["model_bytes"] == 2 * r["model_bytes"]
    assert r32["overhead"] <= _bound(r32), _report(r32)
