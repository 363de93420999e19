"""`cm3eval bench sampler --geometry coco-fid`: the paper's FID prompt geometry through the previous
engine (evals/bench/sampler_previous.py) and the library's sampler, side by side in one run.

A prompt is 2 retrieved documents (caption + boi + 1,024 image codes + eoi + break) and the query
caption + boi; 8 candidates with classifier-free guidance against the unconditional stream
`<s> <racm3:break>`. The engines run a random-weight model with Chameleon-7B's token layout (65,536
ids, 8,192 image codes, 1,024 codes per image) scaled down in depth and width so both finish on a
CPU; every counter is read from what the engines do (KV positions from the attention calls, prefill
tokens from the prefill calls, cache sizes from the caches they allocate), per layer, and the
byte/FLOP figures then put those counts on the full Chameleon-7B (bf16, 32 layers x 32 KV heads x
128) on an H100 (80 GB, 3.35 TB/s, 990 dense bf16 TFLOP/s): step time = max(bytes / bandwidth,
FLOPs / peak), bytes = the weights + the KV read.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

GEOMETRIES = ("coco-fid",)
HBM_BYTES, BANDWIDTH, PEAK_FLOPS = 80e9, 3.35e12, 990e12  # one H100 SXM 80 GB
WORKSPACE_RESERVE = 4e9  # activations of a prefill, logits, the fp32 image head, allocator slack
FID_PROMPTS = 30_000
N_DOCS, CAPTIONS, N_CANDIDATES, CFG_SCALE = 2, (13, 11), 8, 3.0  # two prompts per step, ragged captions
KV_BYTES_7B = 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 32 KV heads of 128, bf16: bytes per position


def _configs(image_seq_len: int):
    from cm3leon.config import ModelConfig
    from evals.bench.sampler_models import NAMED_CONFIGS

    full = ModelConfig(**NAMED_CONFIGS["chameleon-7b-shape"])
    small = ModelConfig(**{**NAMED_CONFIGS["chameleon-7b-shape"], "d_model": 64, "n_layers": 2, "n_heads": 2,
                           "n_kv_heads": 2, "d_ff": 128, "image_seq_len": image_seq_len})
    return full, small


def _prompts(cfg, captions) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(9000, 60000, (n,), generator=g).tolist()  # noqa: E731
    codes = lambda: (torch.randint(0, cfg.image_codebook_size, (cfg.image_seq_len,), generator=g)  # noqa: E731
                     + cfg.image_token_offset).tolist()
    out = []
    for n in captions:
        docs = [t for _ in range(N_DOCS) for t in text(n) + [cfg.boi_id] + codes() + [cfg.eoi_id, cfg.break_id]]
        out.append([cfg.bos_id] + docs + text(n) + [cfg.boi_id])
    return out


@contextmanager
def _recording(model):
    """Record the engines' prefill tokens, cache slots and per-forward KV reads (per layer call)."""
    import torch.nn.functional as F

    from cm3leon import attention

    rec = {"prefill": 0, "cache": 0, "reads": [], "sdpa": 0}
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):  # the previous engine's decode attention: one query per row
        if q.shape[2] == 1:
            rec["sdpa"] += k.shape[0] * k.shape[2]
        return real_sdpa(q, k, v, *args, **kwargs)

    def wrap(name, count):
        real = getattr(model, name)

        def counted(*args, **kwargs):
            out = real(*args, **kwargs)
            count(args, out)
            return out
        setattr(model, name, counted)

    def forward_reads(args, out):
        rec["reads"].append(rec["sdpa"] + counter.positions)
        rec["sdpa"] = counter.positions = 0

    wrap("prefill", lambda a, out: rec.__setitem__("prefill", rec["prefill"] + a[0].numel()))
    wrap("prefill_prefix", lambda a, out: rec.__setitem__("prefill", rec["prefill"] + a[1].numel()))
    wrap("new_cache", lambda a, out: rec.__setitem__("cache", rec["cache"] + a[0] * a[1]))
    wrap("new_prefix_cache", lambda a, out: rec.__setitem__(
        "cache", rec["cache"] + sum(x.numel() for x in out.prefix_valid) + out.next_pos.numel() * out.max_len))
    wrap("step_tensors", forward_reads)
    wrap("extend_tensors", forward_reads)
    F.scaled_dot_product_attention = sdpa
    try:
        with attention.count_kv_reads() as counter:
            yield rec
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for name in ("prefill", "prefill_prefix", "new_cache", "new_prefix_cache", "step_tensors", "extend_tensors"):
            delattr(model, name)


def _run(engine: str, model, cfg, prompts) -> tuple[dict, list]:
    from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
    from evals.bench.sampler_previous import PreviousSampler

    s = SamplingConfig(temperature=1.0, top_p=0.9, cfg_scale=CFG_SCALE, n_candidates=N_CANDIDATES)
    reqs = [GenerationRequest(p, "image", seed=i, uncond_prompt=[cfg.bos_id, cfg.break_id]) for i, p in enumerate(prompts)]
    with _recording(model) as rec:
        if engine == "previous":  # its rule at these settings: one prompt (8 samples) per batch
            gens = PreviousSampler(model, cfg).generate(reqs, s, batch_size=N_CANDIDATES)
        else:
            gens = Sampler(model, cfg).generate(reqs, s, prompts_per_step=len(reqs))
    return rec, [g.candidates for g in gens]


def _counters(rec: dict, prompts, n_layers: int, rows: int) -> dict:
    """Per prompt, per layer: what the engine read and stored, and the distinct minimum."""
    P, steps = len(prompts), len(rec["reads"])
    per_step = [r / n_layers / P for r in rec["reads"]]  # KV positions read per forward per prompt
    prefix = sum(len(p) + 2 for p in prompts) / P  # the conditional prompt + the 2-token unconditional one
    minimum = [prefix + rows * (i + 1) for i in range(steps)]  # prefix once + each row's filled suffix
    return {"per_step": per_step, "read": sum(per_step) / steps, "min": sum(minimum) / steps,
            "prefill": rec["prefill"] / P, "prefix": prefix, "kv_bytes": rec["cache"] / P * KV_BYTES_7B}


def _n_params(cfg) -> int:
    """Transformer's parameter count for `cfg` (embeddings, output, blocks with their norms), from shapes."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * hd * 2 * (cfg.n_heads + cfg.n_kv_heads) + (2 * (cfg.n_heads + cfg.n_kv_heads) * hd if cfg.qk_norm else 0)
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * (attn + mlp + 2 * d) + d


def _model_7b(c: dict, full, weights: float, prompts_per_step: int, rows: int) -> dict:
    """Modelled H100 time for FID-30K at 7B from one engine's per-prompt counters."""
    from cm3leon.transformer import estimate_flops_per_token

    per_token, d, L = estimate_flops_per_token(full), full.d_model, full.n_layers
    P = prompts_per_step
    cond_len = c["prefix"] - 2
    prefill_flops = P * (c["prefill"] * per_token + 2 * d * L * c["prefill"] * cond_len)  # linear + causal attention
    batch_s = max(prefill_flops / PEAK_FLOPS, weights / BANDWIDTH)
    for i, read in enumerate(c["per_step"]):
        attended = rows * (cond_len + i + 1)  # each row's queries over its prefix and suffix
        flops = P * (rows * per_token + 4 * d * L * attended)
        batch_s += max((weights + P * read * KV_BYTES_7B) / BANDWIDTH, flops / PEAK_FLOPS)
    n_batches = math.ceil(FID_PROMPTS / P)
    return {"hours": n_batches * batch_s / 3600, "weight_passes_per_image": (len(c["per_step"]) + 1) / (P * N_CANDIDATES)}


def run_geometry(geometry: str = "coco-fid", image_seq_len: int = 1024) -> dict:
    """The counters of both engines; `image_seq_len` below 1,024 shrinks the images (tests only)."""
    import torch

    from cm3leon.attention import prefill_backend
    from cm3leon.transformer import Transformer
    from evals.bench.sampler_previous import previous_batch_rule

    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
    full, small = _configs(image_seq_len)
    torch.manual_seed(0)
    model = Transformer(small).eval()
    with torch.no_grad():
        model.output.weight.mul_(10)
    weights = 2.0 * _n_params(full)  # bf16
    prompts = _prompts(small, CAPTIONS)
    rows = 2 * N_CANDIDATES  # conditional + unconditional row per candidate
    rec_prev, toks_prev = _run("previous", model, small, prompts[:1])
    rec_new, toks_new = _run("new", model, small, prompts)
    prev, new = _counters(rec_prev, prompts[:1], small.n_layers, rows), _counters(rec_new, prompts, small.n_layers, rows)
    free = HBM_BYTES - weights
    row_bytes = prev["kv_bytes"] / rows
    per_step = {"previous": max(1, previous_batch_rule(row_bytes, free, streams=2) // N_CANDIDATES),
                "new": int((free - WORKSPACE_RESERVE) // new["kv_bytes"])}
    model_prev = _model_7b(prev, full, weights, per_step["previous"], rows)
    model_new = _model_7b(new, full, weights, per_step["new"], rows)
    pair = lambda key: {"previous": prev[key], "new": new[key]}  # noqa: E731
    return {
        "geometry": geometry, "model": "random, Chameleon-7B token layout, d_model 64, 2 layers (counters per layer)",
        "prompt_tokens": [len(p) for p in prompts], "candidates": N_CANDIDATES, "cfg_scale": CFG_SCALE,
        "kv_positions_read_per_step_per_prompt": pair("read"), "kv_positions_min_per_step_per_prompt": pair("min"),
        "prefill_tokens_per_prompt": pair("prefill"), "prefix_tokens_per_prompt": pair("prefix"),
        "kv_bytes_per_prompt": pair("kv_bytes"), "prompts_per_step_80gb": per_step,
        "weight_passes_per_image": {"previous": model_prev["weight_passes_per_image"],
                                    "new": model_new["weight_passes_per_image"]},
        "modelled_fid30k_gpu_hours": {"previous": model_prev["hours"], "new": model_new["hours"]},
        # a flat random model over 8,192 codes puts ~2,000 tokens in a top-p 0.9 nucleus: a candidate can
        # flip where its uniform falls within float32 rounding of a CDF edge, and then runs its own way
        "same_tokens_first_prompt": toks_prev[0] == toks_new[0],
        "identical_candidates_first_prompt": sum(a == b for a, b in zip(toks_prev[0], toks_new[0])),
        "weights_bytes_7b_bf16": weights, "workspace_reserve_bytes": WORKSPACE_RESERVE,
        "attention_backend": prefill_backend("cuda" if torch.cuda.is_available() else "cpu",
                                             torch.bfloat16 if torch.cuda.is_available() else torch.float32),
    }


def print_geometry(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]sampler bench --geometry {res['geometry']}[/]: prompts of {res['prompt_tokens']} tokens, "
              f"{res['candidates']} candidates, CFG {res['cfg_scale']:g}; {res['model']}; figures at Chameleon-7B bf16 "
              f"on one H100 80 GB; prefill attention backend {res['attention_backend']}")
    t = Table("counter", "previous", "new", "new / previous")
    for key, value in res.items():
        if isinstance(value, dict) and set(value) == {"previous", "new"}:
            ratio = value["new"] / value["previous"] if value["previous"] else float("nan")
            t.add_row(key, f"{value['previous']:,.1f}", f"{value['new']:,.1f}", f"{ratio:.3f}")
    con.print(t)
    con.print(f"identical candidates of the first prompt: {res['identical_candidates_first_prompt']} of {res['candidates']}")
