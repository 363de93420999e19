"""`cm3eval bench sampler`: our decode loop beside transformers' Chameleon generate, on the same weights.

One run builds a random Chameleon in transformers (no download), saves it in the HF layout, imports
it through cm3leon.checkpoint, checks that both emit identical greedy tokens, then measures:
tokens/s and images/s at several batch sizes with and without CFG, transformers' tokens/s at the
same batch, peak memory, and the decode-step roofline (weight bytes / measured memory bandwidth).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import typer

from cm3leon import checkpoint
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.text import chameleon_image_token
from cm3leon.transformer import param_bytes

SIZES = {  # name: (hidden, layers, heads, kv heads, intermediate, image codes, vq resolution)
    "tiny": (128, 2, 4, 4, 352, 512, 32),
    "small": (512, 8, 8, 8, 1408, 8192, 64),
    "medium": (1024, 16, 16, 16, 2816, 8192, 64),
}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # keeps --json output a single line


def build_chameleon(folder: Path, size: str) -> None:
    from tokenizers import Tokenizer, models
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    _quiet_transformers()

    d, layers, heads, kv, inter, n_codes, res = SIZES[size]
    names = ["<s>", "<pad>", "</s>", "<reserved08706>"] + sorted(chameleon_image_token(c) for c in range(n_codes))
    names += ["<eoss>", "<racm3:break>"] + [f"w{i}" for i in range(1000)]
    vocab = {n: i for i, n in enumerate(names)}
    vq = dict(embed_dim=8, num_embeddings=n_codes, latent_channels=8, resolution=res, base_channels=32,
              channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=len(vocab), hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                          vocabulary_map=vocab, vq_config=vq, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: greedy paths are not decided by float noise
    model.save_pretrained(folder, safe_serialization=True)
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")).save(str(folder / "tokenizer.json"))


def measure_bandwidth(device: torch.device, n_bytes: int = 256 << 20) -> float:
    """Bytes/s of a large device copy, counting bytes read and written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompts(cfg, batch: int, length: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    lo = cfg.vocab_size - 1000
    return [[cfg.bos_id] + torch.randint(lo, cfg.vocab_size, (length - (i % 5),), generator=g).tolist()
            for i in range(batch)]


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(size: str = "small", batches: tuple[int, ...] = (1, 8, 32), new_tokens: int = 32,
              device: str = "cpu", dtype: str = "float32", repeats: int = 2, hf_batch: int = 8,
              threads: int | None = None) -> dict:
    # On a shared CPU, intra-op threads that wait for a descheduled sibling make small decode ops
    # 10x slower; --threads 1 gives stable numbers there (both sides use the same setting).
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_chameleon(folder, size)
        bundle = checkpoint.load(folder, device=dev, dtype=torch_dtype)
        from transformers import ChameleonForConditionalGeneration

        hf = ChameleonForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype).to(dev).eval()
    cfg, model = bundle.config, bundle.model
    sampler = Sampler(model, cfg, text_barred=[])  # transformers only bars image codes
    result: dict = {"size": size, "device": str(dev), "dtype": dtype, "params": model.num_parameters(),
                    "threads": torch.get_num_threads(),
                    "new_tokens": new_tokens, "torch": torch.__version__}

    # 1. identical greedy tokens at the transformers batch
    prompts = _prompts(cfg, hf_batch)
    T = max(map(len, prompts))
    ids = torch.tensor([[cfg.pad_id] * (T - len(p)) + p for p in prompts], device=dev)
    mask = (torch.arange(T, device=dev)[None] >= torch.tensor([T - len(p) for p in prompts], device=dev)[:, None]).long()
    hf_kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False, pad_token_id=cfg.pad_id)
    reqs = [GenerationRequest(p, "text", seed=0, max_new_tokens=new_tokens) for p in prompts]
    greedy = SamplingConfig(greedy=True)
    with torch.no_grad():
        ref = hf.generate(**hf_kwargs)[:, T:].tolist()
    ours = sampler.generate(reqs, greedy, batch_size=hf_batch)
    identical = True
    for gen, row in zip(ours, ref):
        expected = []
        for t in row:
            if t in sampler.stop_set:
                break
            expected.append(t)
        identical &= gen.output == expected[: len(gen.output)] and len(gen.output) == len(expected)
    result["identical_greedy_tokens"] = bool(identical)

    # 2. transformers vs ours, same batch, same token budget. Stop tokens barred so every row runs the budget.
    no_stop = Sampler(model, cfg, text_barred=sorted(sampler.stop_set))
    no_stop.stop_ids = no_stop.stop_ids[:0]
    n_tokens = hf_batch * new_tokens
    t_hf = _time(lambda: hf.generate(**hf_kwargs), dev, repeats)
    t_ours = _time(lambda: no_stop.generate(reqs, greedy, batch_size=hf_batch), dev, repeats)
    result["transformers_tokens_per_s"] = n_tokens / t_hf
    result["tokens_per_s"] = n_tokens / t_ours
    result["speedup_vs_transformers"] = t_hf / t_ours
    result["batch_for_speedup"] = hf_batch

    # 3. ours across batch sizes, text and image, with and without CFG
    rows = []
    for b in batches:
        ps = _prompts(cfg, b)
        for cfg_scale in (1.0, 3.0):
            s = SamplingConfig(top_p=0.9, cfg_scale=cfg_scale)
            txt = [GenerationRequest(p, "text", seed=i, max_new_tokens=new_tokens, uncond_prompt=[cfg.bos_id, cfg.mask_id])
                   for i, p in enumerate(ps)]
            t = _time(lambda: no_stop.generate(txt, s, batch_size=b), dev, 1)
            img = [GenerationRequest(p + [cfg.boi_id], "image", seed=i, uncond_prompt=[cfg.bos_id, cfg.mask_id, cfg.boi_id])
                   for i, p in enumerate(ps)]
            ti = _time(lambda: no_stop.generate(img, s, batch_size=b), dev, 1)
            rows.append({"batch": b, "cfg_scale": cfg_scale, "tokens_per_s": b * new_tokens / t,
                         "images_per_s": b / ti, "image_tokens": cfg.image_seq_len})
    result["by_batch"] = rows

    # 4. roofline: a batch-1 decode step must at least read every weight once
    bw = measure_bandwidth(dev)
    weights = param_bytes(model)
    roofline_s = weights / bw  # bw is the bytes moved per second (read + write); a step reads each weight once
    one = [GenerationRequest(_prompts(cfg, 1)[0], "text", seed=0, max_new_tokens=new_tokens)]
    t_one = _time(lambda: no_stop.generate(one, greedy, batch_size=1), dev, repeats)
    step_s = t_one / new_tokens  # includes the (short) prefill: a slight overestimate of the step
    result.update(memory_bandwidth_gb_s=bw / 1e9, weight_bytes=weights, roofline_step_ms=roofline_s * 1e3,
                  step_ms=step_s * 1e3, step_over_roofline=step_s / roofline_s, peak_memory_bytes=_peak_memory(dev))
    return result


def command(
    size: str = typer.Option("small", help="model size: " + ", ".join(SIZES)),
    new_tokens: int = typer.Option(32, help="tokens generated per row"),
    batches: str = typer.Option("1,8,32", help="batch sizes for the scaling table"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    repeats: int = typer.Option(2, help="timed repeats (best is kept)"),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Decode speed beside transformers' ChameleonForConditionalGeneration.generate, and the roofline."""
    if size not in SIZES:
        raise typer.BadParameter(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    res = run_bench(size, tuple(int(b) for b in batches.split(",")), new_tokens, device, dtype, repeats,
                    threads=threads or None)
    if as_json:
        print(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]sampler bench[/] {size} ({res['params'] / 1e6:.1f}M params) on {res['device']} {res['dtype']}, "
              f"{res['threads']} thread(s)")
    con.print(f"identical greedy tokens vs transformers: {res['identical_greedy_tokens']}")
    con.print(f"batch {res['batch_for_speedup']}: ours {res['tokens_per_s']:.0f} tok/s, transformers "
              f"{res['transformers_tokens_per_s']:.0f} tok/s -> {res['speedup_vs_transformers']:.2f}x")
    con.print(f"batch-1 step {res['step_ms']:.2f} ms, roofline {res['roofline_step_ms']:.2f} ms "
              f"({res['weight_bytes'] / 1e6:.0f} MB at {res['memory_bandwidth_gb_s']:.1f} GB/s) -> "
              f"{res['step_over_roofline']:.2f}x; peak memory {res['peak_memory_bytes'] / 2**20:.0f} MiB")
    t = Table("batch", "CFG", "text tok/s", "images/s", "codes/image")
    for r in res["by_batch"]:
        t.add_row(str(r["batch"]), f"{r['cfg_scale']:g}", f"{r['tokens_per_s']:.0f}", f"{r['images_per_s']:.2f}",
                  str(r["image_tokens"]))
    con.print(t)
