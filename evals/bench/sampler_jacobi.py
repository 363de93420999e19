"""`cm3eval bench sampler --geometry coco-fid --decoding jacobi`: speculative Jacobi decoding beside
plain decoding, counted on the same requests.

Counters, not timings: forwards per image (the decode forwards of an image's batch: a batch waits
for its slowest row), accepted tokens per forward (each image's tokens over the forwards it needed
itself) and, from the forwards, the modelled FID-30K hours at Chameleon-7B on one H100 with the
coco-fid geometry's roofline (evals/bench/sampler_geometry.py): a forward costs max(bytes /
bandwidth, FLOPs / peak), its bytes the weights plus the KV read, its FLOPs the window's tokens.
`--model demo` runs the trained demo model on shapes-fid's prompts and generation settings, so the
acceptance is that of a model that has learned something; without it, a random model of the
Chameleon-7B token layout (acceptance of a model that has learned nothing: a lower bound).
"""

from __future__ import annotations

import math

from evals.bench.sampler_geometry import (BANDWIDTH, CAPTIONS, CFG_SCALE, FID_PROMPTS, HBM_BYTES, KV_BYTES_7B,
                                          N_CANDIDATES, PEAK_FLOPS, WORKSPACE_RESERVE, _configs, _n_params, _prompts)

DEMO_PROMPTS = 32  # shapes-fid test prompts the demo bench decodes


def _demo_requests(n: int):
    """The demo model, shapes-fid's first n test captions as the predictor builds them, its settings."""
    import json

    from cm3leon.checkpoint import load
    from cm3leon.document import DocumentCodec
    from tasks import prompts, registry
    from tasks.cache import cache_dir
    from tasks.shapes.world import demo_world_root

    bundle = load("demo", with_encoder=False)
    spec = registry.get("shapes-fid")
    sampling = spec.sampling_config()
    codec = DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution)
    data = json.loads((demo_world_root(cache_dir()) / spec.dataset.files["annotations"]).read_text())
    seen, captions = set(), []
    for a in data["annotations"]:
        if a["image_id"] not in seen:
            seen.add(a["image_id"])
            captions.append(a["caption"])
    reqs = [prompts.build(codec, "t2i", spec.prompt.template, c, seed=i, sampling=sampling,
                          max_new_tokens=1).request for i, c in enumerate(captions[:n])]
    return bundle.model, bundle.config, reqs, sampling


def _random_requests(image_seq_len: int):
    import torch

    from cm3leon.sampling import GenerationRequest, SamplingConfig
    from cm3leon.transformer import Transformer

    _, small = _configs(image_seq_len)
    torch.manual_seed(0)
    model = Transformer(small).eval()
    with torch.no_grad():
        model.output.weight.mul_(10)
    uncond = [small.bos_id, small.mask_id, small.boi_id]
    reqs = [GenerationRequest(p, "image", seed=i, uncond_prompt=uncond) for i, p in enumerate(_prompts(small, CAPTIONS))]
    return model, small, reqs, SamplingConfig(temperature=1.0, top_p=0.9, cfg_scale=CFG_SCALE, n_candidates=N_CANDIDATES)


def _hours_7b(forwards_per_image: float, window: int, image_seq_len: int, prompt_len: int) -> float:
    """Modelled FID-30K hours at Chameleon-7B (one H100, bf16) for images costing this many forwards
    of `window` tokens per row (2 rows per candidate, 8 candidates, prompts per step from the KV)."""
    full, _ = _configs(1024)
    weights = 2.0 * _n_params(full)
    per_token = 2 * _n_params(full)
    rows = 2 * N_CANDIDATES
    kv = KV_BYTES_7B * rows * (1024 + window)  # the suffix slots a prompt's rows hold (prefix shared)
    P = max(1, int((HBM_BYTES - weights - WORKSPACE_RESERVE) // kv))
    steps = forwards_per_image * 1024 / image_seq_len  # the demo's images are shorter than 7B's 1,024 codes
    read = P * KV_BYTES_7B * (prompt_len + rows * 1024 / 2)  # the prefix once, each row's mean suffix
    forward_s = max((weights + read) / BANDWIDTH, P * rows * window * per_token / PEAK_FLOPS)
    return math.ceil(FID_PROMPTS / P) * steps * forward_s / 3600


def run_jacobi_bench(model_name: str | None = None, window: int = 16, image_seq_len: int = 256,
                     n_prompts: int = DEMO_PROMPTS) -> dict:
    """Plain and Jacobi decoding of the same requests; `image_seq_len` sizes the random model's images."""
    from dataclasses import replace

    from cm3leon.sampling import Sampler

    if model_name == "demo":
        model, cfg, reqs, sampling = _demo_requests(n_prompts)
    else:
        model, cfg, reqs, sampling = _random_requests(image_seq_len)
    sampler = Sampler(model, cfg)
    plain = sampler.generate(reqs, sampling, prompts_per_step=len(reqs))
    sjd = sampler.generate(reqs, replace(sampling, decoding="jacobi", jacobi_window=window), prompts_per_step=len(reqs))
    codes = len(plain[0].output)
    budget = len(reqs[0].structure) if reqs[0].structure is not None else cfg.image_seq_len
    own = [o for g in sjd for o in g.own_forwards]
    fw = {"ar": float(budget - 1), "jacobi": float(sjd[0].forwards[0])}  # one batch: every image waits for it
    prompt_len = sum(len(r.prompt) for r in reqs) / len(reqs)
    return {
        "geometry": "coco-fid", "decoding": "jacobi", "jacobi_window": window,
        "model": "demo (trained), shapes-fid prompts and settings" if model_name == "demo"
        else "random, Chameleon-7B token layout, d_model 64, 2 layers",
        "prompts": len(reqs), "candidates": sampling.n_candidates, "image_tokens": codes, "decode_positions": budget,
        "forwards_per_image": fw,
        "forwards_ratio": fw["jacobi"] / fw["ar"],
        "accepted_tokens_per_forward": {"ar": 1.0, "jacobi": budget * len(own) / sum(own)},
        "own_forwards_per_image": {"ar": float(budget - 1), "jacobi": sum(own) / len(own)},
        "modelled_fid30k_gpu_hours": {"ar": _hours_7b(fw["ar"], 1, codes, prompt_len),
                                      "jacobi": _hours_7b(fw["jacobi"], window, codes, prompt_len)},
    }
