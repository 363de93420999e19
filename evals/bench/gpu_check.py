"""The GPU check (scripts/gpu-check.sh): what only a GPU can show, as ONE JSON object.

Checks, each independent (one that fails records its error string and the others still run):

  text_vs_transformers   tokens/s of our sampler vs transformers' generate (text, bf16, compiled, batch 8)
                         and identical greedy tokens (evals/bench/sampler.py's comparison)
  roofline_batch1        a batch-1 decode step over the weight-read roofline (weights / bandwidth)
  images_per_s           images/s with guidance at the Chameleon-1B and -7B shapes (random weights,
                         fewer layers so it fits the time), prefix sharing on (cm3leon.sampling.Sampler)
                         and off (evals/bench/sampler_previous.PreviousSampler, where it exists)
  counter_rng            the counter RNG's uniforms on CUDA equal to the CPU's, bit for bit
  top_p_prefilter        the text top-p prefilter's tokens equal to a full sort over 10,000 random rows
  prompts_per_step       the same image tokens for each seed at 1, 4 and 16 prompts per step
  sdpa_backend_30b       the kernel SDPA picks at the Chameleon-30B shape (64 heads, 8 KV heads of 128),
                         with and without a mask, and which kernels accept it

It runs in under 8 minutes on one H100. `--smoke` runs the same code at tiny shapes on any machine
(CUDA-only checks say "skipped: no CUDA"), so CI checks the keys without a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
import traceback
from typing import Any, Callable

CUDA_ONLY = ("counter_rng", "top_p_prefilter", "prompts_per_step", "sdpa_backend_30b")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate(sampler, requests, sampling, prompts: int):
    """`prompts` whole prompts per sampler step, whichever parameter the sampler names it by."""
    if "prompts_per_step" in inspect.signature(sampler.generate).parameters:
        return sampler.generate(requests, sampling, prompts_per_step=prompts)
    return sampler.generate(requests, sampling, batch_size=prompts * sampling.n_candidates)


def _timed(fn: Callable[[], Any], dev) -> float:
    from evals.bench.sampler_probes import sync

    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- text, roofline
def check_text_vs_transformers(smoke: bool) -> dict:
    """evals/bench/sampler.py's side-by-side run: greedy tokens identical, tokens/s at batch 8."""
    import torch

    from evals.bench import sampler as bench
    from evals.bench.sampler_models import load_imported

    dev, dtype = _device(), torch.float32 if smoke else torch.bfloat16
    cfg, model, hf = load_imported("tiny" if smoke else "medium", dev, dtype)
    res: dict = {"size": "tiny" if smoke else "medium", "dtype": str(dtype), "compile": not smoke}
    bench._vs_transformers(res, hf, model, cfg, dev, 4 if smoke else 64, 8, 1 if smoke else 3, not smoke)
    res["ok"] = res["identical_greedy_tokens"]
    return res


def check_roofline_batch1(smoke: bool) -> dict:
    import torch

    from evals.bench import sampler as bench
    from evals.bench.sampler_models import random_model

    dev = _device()
    name = "demo" if smoke else "chameleon-7b-shape"
    cfg, model = random_model(name, dev, torch.float32 if smoke else torch.bfloat16)
    res: dict = {"config": name}
    bench._roofline(res, model, cfg, dev, 4 if smoke else 32, 1 if smoke else 3, not smoke)
    return res


# ----------------------------------------------------------------------------- images/s with guidance
def image_model(shape: str, layers: int, smoke: bool, dev, dtype):
    """A named Chameleon shape with `layers` layers (random weights); tiny widths under --smoke."""
    import torch

    from cm3leon.config import ModelConfig
    from cm3leon.transformer import Transformer
    from evals.bench.sampler_models import NAMED_CONFIGS

    kw = dict(NAMED_CONFIGS[shape], n_layers=layers)
    if smoke:
        kw.update(d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, image_seq_len=16)
    cfg = ModelConfig(**kw)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():
        model.output.weight.mul_(10)
    return cfg, model


def image_requests(cfg, n: int, prefix_len: int):
    """coco-fid's geometry: a ~prefix_len-token conditional prompt (2 retrieved documents and the
    caption stand-in) ending in boi, the unconditional [bos, boi]."""
    import torch

    from cm3leon.sampling import GenerationRequest

    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        body = torch.randint(8200, cfg.vocab_size, (prefix_len - 2,), generator=g).tolist()
        out.append(GenerationRequest([cfg.bos_id, *body, cfg.boi_id], "image", seed=i,
                                     uncond_prompt=[cfg.bos_id, cfg.boi_id]))
    return out


def previous_sampler():
    """The engine before prefix sharing, kept in the bench; None where this tree has none."""
    try:
        from evals.bench.sampler_previous import PreviousSampler
    except ImportError:
        return None
    return PreviousSampler


def check_images_per_s(smoke: bool) -> dict:
    import torch

    from cm3leon.sampling import Sampler, SamplingConfig

    dev, dtype = _device(), torch.float32 if smoke else torch.bfloat16
    sampling = SamplingConfig(top_p=0.9, cfg_scale=3.0, n_candidates=2 if smoke else 8)
    prompts, prefix = (2, 40) if smoke else (4, 2100)
    previous = previous_sampler()
    out: dict = {"candidates": sampling.n_candidates, "prompts_per_step": prompts, "prefix_tokens": prefix}
    # a decode step is launch-bound at these batches: the layers, not the width, set the time
    for shape, layers in (("chameleon-1b-shape", 1 if smoke else 11), ("chameleon-7b-shape", 1 if smoke else 6)):
        cfg, model = image_model(shape, layers, smoke, dev, dtype)
        reqs = image_requests(cfg, prompts, prefix)
        row: dict = {"layers": layers, "image_tokens": cfg.image_seq_len}
        on = Sampler(model, cfg)
        generate(on, reqs[:1], sampling, 1)  # warm-up
        row["prefix_sharing_on"] = prompts * sampling.n_candidates / _timed(
            lambda: generate(on, reqs, sampling, prompts), dev)
        if previous is None:
            row["prefix_sharing_off"] = "unavailable: no evals/bench/sampler_previous.py"
        else:
            off = previous(model, cfg)
            off.generate(reqs[:1], sampling, batch_size=sampling.n_candidates)
            row["prefix_sharing_off"] = prompts * sampling.n_candidates / _timed(
                lambda: off.generate(reqs, sampling, batch_size=prompts * sampling.n_candidates), dev)
        out[shape] = row
        del model, on
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- exactness on the device
def check_counter_rng(smoke: bool, dev=None) -> dict:
    import torch

    from cm3leon.counter_rng import sample_uniform, sample_uniforms

    dev = torch.device(dev) if dev is not None else _device()
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(-2**62, 2**62, (256,), generator=g).tolist() + [0, 1, 2**63 - 1, 2**64 - 1]
    cands = [i % 16 for i in range(len(seeds))]
    on_dev = sample_uniforms(seeds, cands, 512, device=dev).cpu()
    on_cpu = sample_uniforms(seeds, cands, 512, device="cpu")
    host = [sample_uniform(seeds[i], cands[i], s) for i in (0, len(seeds) - 1) for s in (0, 511)]
    bits = torch.equal(on_dev.view(torch.int64), on_cpu.view(torch.int64))
    same_host = host == [on_cpu[i, s].item() for i in (0, len(seeds) - 1) for s in (0, 511)]
    return {"ok": bool(bits and same_host), "uniforms": on_cpu.numel(), "device": str(dev)}


def check_top_p_prefilter(smoke: bool, dev=None, rows: int = 10_000) -> dict:
    """Random rows at temperatures from peaked to flat: wherever the prefilter says it is exact,
    its token is the full sort's; `exact_rows` says how often the fallback is not needed."""
    import torch

    from cm3leon.processors import sample_from_logits, sample_top_p_prefiltered

    dev = torch.device(dev) if dev is not None else _device()
    vocab, k, top_p, chunk = (4096, 256, 0.9, 500) if smoke else (65536, 1024, 0.9, 1000)
    g = torch.Generator().manual_seed(0)
    exact_rows = wrong_where_exact = differ = 0
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scale = torch.linspace(0.5, 12.0, n)[:, None]
        logits = (torch.randn(n, vocab, generator=g) * scale).to(dev)
        u = torch.rand(n, generator=g, dtype=torch.float64).to(dev)
        fast, exact = sample_top_p_prefiltered(logits, u, top_p, k)
        full = sample_from_logits(logits, u, top_p)
        same = fast == full
        exact_rows += int(exact.sum())
        wrong_where_exact += int((exact & ~same).sum())
        differ += int((~same).sum())
    return {"ok": wrong_where_exact == 0, "rows": rows, "exact_rows": exact_rows,
            "wrong_where_exact": wrong_where_exact, "differ_anywhere": differ, "k": k, "vocab": vocab}


def check_prompts_per_step(smoke: bool, dev=None) -> dict:
    """The same image tokens for each seed at 1, 4 and 16 prompts per step (1, 2, 4 under --smoke)."""
    import torch

    from cm3leon.sampling import Sampler, SamplingConfig

    dev = torch.device(dev) if dev is not None else _device()
    cfg, model = image_model("chameleon-1b-shape", 1, smoke, dev, torch.float32 if smoke else torch.bfloat16)
    sampling = SamplingConfig(top_p=0.9, cfg_scale=3.0, n_candidates=2)
    sizes = (1, 2, 4) if smoke else (1, 4, 16)
    reqs = image_requests(cfg, sizes[-1], 24 if smoke else 200)
    sampler = Sampler(model, cfg)
    codes = {p: [g.candidates for g in generate(sampler, reqs, sampling, p)] for p in sizes}
    return {"ok": all(codes[p] == codes[1] for p in sizes), "prompts": len(reqs), "device": str(dev),
            "differ": {p: sum(a != b for a, b in zip(codes[1], codes[p])) for p in sizes[1:]}}


def check_sdpa_backend_30b(smoke: bool, dev=None) -> dict:
    """Chameleon-30B attention (64 query heads, 8 KV heads of 128) in bf16: the kernel SDPA picks
    for a causal prefill and a masked decode step, and which kernels run each alone. MATH expands
    K/V by the group size (8x)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(dev) if dev is not None else _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    T, S = (16, 32) if smoke else (2048, 4096)
    cases = {"prefill_causal": (T, T, None, True), "decode_masked": (1, S, "mask", False),
             "prefill_masked": (T, T, "mask", False)}
    out: dict = {}
    for name, (tq, tk, mask, causal) in cases.items():
        q = torch.randn(1, 64, tq, 128, device=dev, dtype=dtype)
        k, v = (torch.randn(1, 8, tk, 128, device=dev, dtype=dtype) for _ in range(2))
        m = torch.zeros(1, 1, tq, tk, device=dev, dtype=dtype) if mask else None
        picked = SDPBackend(torch._fused_sdp_choice(q, k, v, m, 0.0, causal, enable_gqa=True)).name
        runs = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
                runs[backend.name] = True
            except RuntimeError:
                runs[backend.name] = False
        out[name] = {"picked": picked, "runs": runs, "math_fallback": picked == "MATH"}
    out["ok"] = not any(c["math_fallback"] for c in out.values() if isinstance(c, dict))
    return out


CHECKS: dict[str, Callable[[bool], dict]] = {
    "text_vs_transformers": check_text_vs_transformers,
    "roofline_batch1": check_roofline_batch1,
    "images_per_s": check_images_per_s,
    "counter_rng": check_counter_rng,
    "top_p_prefilter": check_top_p_prefilter,
    "prompts_per_step": check_prompts_per_step,
    "sdpa_backend_30b": check_sdpa_backend_30b,
}


TIME_BUDGET_S = 420  # a check that would start later is skipped: the whole run stays under 8 minutes


def run_checks(smoke: bool, only: list[str] | None = None, budget_s: float = TIME_BUDGET_S) -> dict:
    """Every check, each on its own: an error is recorded as its string and the rest still run."""
    import torch

    cuda = torch.cuda.is_available()
    res: dict = {"torch": torch.__version__, "smoke": smoke,
                 "device": torch.cuda.get_device_name(0) if cuda else "cpu", "checks": {}}
    start = time.perf_counter()
    # the cheap exactness checks first, so a slow GPU still answers them
    for name in sorted(CHECKS, key=lambda n: n not in CUDA_ONLY):
        check = CHECKS[name]
        if only and name not in only:
            continue
        if name in CUDA_ONLY and not cuda:
            res["checks"][name] = "skipped: no CUDA"
            continue
        if not smoke and time.perf_counter() - start > budget_s:
            res["checks"][name] = f"skipped: past the {budget_s:.0f} s budget"
            continue
        t0 = time.perf_counter()
        try:
            res["checks"][name] = {**check(smoke), "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            tb = traceback.extract_tb(e.__traceback__)[-1]
            res["checks"][name] = {"error": f"{type(e).__name__}: {e} ({tb.filename}:{tb.lineno})",
                                   "seconds": round(time.perf_counter() - t0, 2)}
        if cuda:
            torch.cuda.empty_cache()
    res["seconds"] = round(time.perf_counter() - start, 1)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any machine (CI)")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = p.parse_args(argv)
    print(json.dumps(run_checks(args.smoke, [c for c in args.only.split(",") if c] or None)))


if __name__ == "__main__":
    main()
