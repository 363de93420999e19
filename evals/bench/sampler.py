"""`cm3eval bench sampler`: our decode loop beside transformers' Chameleon generate and a minimal loop.

`--size` (tiny | small | medium) builds a random Chameleon in transformers (no download), imports
it through cm3leon.checkpoint, checks that both emit identical greedy tokens and times both
generate loops. `--config` (demo | chameleon-1b-shape | chameleon-7b-shape) runs a native model of
that shape with random weights instead (sampler-side numbers only). Both then measure: tokens/s
and images/s across batch sizes with and without CFG, images/s with CFG at batch 32, the step time
over a minimal gpt-fast-style loop on the same weights (`overhead_vs_minimal_loop`), eager aten
ops and host reads per step, peak memory, and the decode-step roofline (weight bytes / measured
memory bandwidth). Every timing is the median of `--repeats` runs after a warm-up.
`--geometry coco-fid` instead runs the paper's FID prompt geometry through the previous engine and
the library's sampler side by side and reports counters (evals/bench/sampler_geometry.py).
"""

from __future__ import annotations

import json
import resource

import typer

from evals.bench.sampler_models import NAMED_CONFIGS, SIZES
from evals.bench.sampler_probes import (eager_ops_per_step, host_syncs_per_step, measure_bandwidth, median_time,
                                        minimal_loop, paired_step_seconds)

CFG_IMAGE_BATCH = 32  # the images/s-with-guidance figure's batch (the issue's; --image-batch for quick runs)


def _text_ids(cfg) -> list[int]:
    specials = {cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.boi_id, cfg.eoi_id, cfg.break_id, cfg.mask_id, cfg.infill_id}
    image = set(cfg.image_token_id_tensor().tolist())
    return [i for i in range(cfg.vocab_size) if i not in image and i not in specials]


def _prompts(cfg, batch: int, length: int = 16, ragged: bool = True) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(batch)
    ids = torch.tensor(_text_ids(cfg))
    return [[cfg.bos_id] + ids[torch.randint(0, len(ids), (length - (i % 5 if ragged else 0),), generator=g)].tolist()
            for i in range(batch)]


def _text(cfg, prompts, new_tokens: int, uncond: bool = False):
    from cm3leon.sampling import GenerationRequest

    u = [cfg.bos_id, cfg.mask_id] if uncond else None
    return [GenerationRequest(p, "text", seed=i, max_new_tokens=new_tokens, uncond_prompt=u) for i, p in enumerate(prompts)]


def _images(cfg, prompts):
    from cm3leon.sampling import GenerationRequest

    return [GenerationRequest(p + [cfg.boi_id], "image", seed=i, uncond_prompt=[cfg.bos_id, cfg.mask_id, cfg.boi_id])
            for i, p in enumerate(prompts)]


def _no_stop_sampler(model, cfg, compile: bool):
    """A sampler that can emit no stop token, so every row runs its whole budget."""
    from cm3leon.sampling import Sampler

    plain = Sampler(model, cfg, text_barred=[])
    s = Sampler(model, cfg, text_barred=sorted(plain.stop_set), compile=compile)
    s.stop_ids = s.stop_ids[:0]
    return s


def _vs_transformers(res: dict, hf, model, cfg, dev, new_tokens: int, hf_batch: int, repeats: int, compile: bool) -> None:
    """Identical greedy tokens, then both generate loops at the same batch and token budget."""
    import torch

    from cm3leon.sampling import Sampler, SamplingConfig

    sampler = Sampler(model, cfg, text_barred=[])  # transformers only bars image codes
    prompts = _prompts(cfg, hf_batch)
    T = max(map(len, prompts))
    ids = torch.tensor([[cfg.pad_id] * (T - len(p)) + p for p in prompts], device=dev)
    mask = (torch.arange(T, device=dev)[None] >= torch.tensor([T - len(p) for p in prompts], device=dev)[:, None]).long()
    hf_kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False, pad_token_id=cfg.pad_id)
    reqs, greedy = _text(cfg, prompts, new_tokens), SamplingConfig(greedy=True)
    with torch.no_grad():
        ref = hf.generate(**hf_kwargs)[:, T:].tolist()
    identical = True
    for gen, row in zip(sampler.generate(reqs, greedy, prompts_per_step=hf_batch), ref):
        expected = []
        for t in row:
            if t in sampler.stop_set:
                break
            expected.append(t)
        identical &= gen.output == expected
    no_stop = _no_stop_sampler(model, cfg, compile)
    t_hf = median_time(lambda: hf.generate(**hf_kwargs), dev, repeats)
    t_ours = median_time(lambda: no_stop.generate(reqs, greedy, prompts_per_step=hf_batch), dev, repeats)
    n_tokens = hf_batch * new_tokens
    res.update(identical_greedy_tokens=bool(identical), transformers_tokens_per_s=n_tokens / t_hf,
               tokens_per_s=n_tokens / t_ours, speedup_vs_transformers=t_hf / t_ours, batch_for_speedup=hf_batch)


def _vs_minimal_loop(res: dict, model, cfg, dev, batches, new_tokens: int, repeats: int, compile: bool) -> None:
    """Greedy text step time of the sampler over the minimal loop's, at each batch (equal-length prompts)."""
    import torch

    from cm3leon.sampling import SamplingConfig

    sampler, minimal = _no_stop_sampler(model, cfg, compile), minimal_loop(model, compile)
    greedy, rows = SamplingConfig(greedy=True), []
    for b in batches:
        prompts = _prompts(cfg, b, ragged=False)
        ids = torch.tensor(prompts, device=dev)
        t = paired_step_seconds({"ours": lambda n: sampler.generate(_text(cfg, prompts, n), greedy, prompts_per_step=b),
                                 "minimal": lambda n: minimal(ids, n)}, new_tokens, dev, repeats)
        ours, mini = t["ours"], t["minimal"]
        rows.append({"batch": b, "step_ms": ours * 1e3, "minimal_step_ms": mini * 1e3, "overhead": ours / mini,
                     "tokens_per_s": b / ours, "minimal_tokens_per_s": b / mini})
    res["minimal_loop"] = rows
    res["overhead_vs_minimal_loop"] = max(r["overhead"] for r in rows)  # the worst batch: a bound, not a best case


def _batch_table(res: dict, model, cfg, dev, batches, new_tokens: int, repeats: int, compile: bool,
                 image_batch: int) -> None:
    """Ours across batch sizes, text and image, with and without CFG (top-p 0.9 sampling)."""
    from cm3leon.sampling import SamplingConfig

    sampler, rows = _no_stop_sampler(model, cfg, compile), []
    for b in batches:
        ps = _prompts(cfg, b)
        for cfg_scale in (1.0, 3.0):
            s = SamplingConfig(top_p=0.9, cfg_scale=cfg_scale)
            txt, img = _text(cfg, ps, new_tokens, uncond=True), _images(cfg, ps)
            t = median_time(lambda: sampler.generate(txt, s, prompts_per_step=b), dev, repeats)
            ti = median_time(lambda: sampler.generate(img, s, prompts_per_step=b), dev, repeats)
            rows.append({"batch": b, "cfg_scale": cfg_scale, "tokens_per_s": b * new_tokens / t,
                         "images_per_s": b / ti, "image_tokens": cfg.image_seq_len})
    res["by_batch"] = rows
    s = SamplingConfig(top_p=0.9, cfg_scale=3.0)
    img = _images(cfg, _prompts(cfg, image_batch))
    res["images_per_s"] = image_batch / median_time(lambda: sampler.generate(img, s, prompts_per_step=image_batch), dev, repeats)
    res["images_per_s_batch"] = image_batch


def _probes(res: dict, model, cfg) -> None:
    """Eager aten ops and host reads per decode step (greedy text, and image with CFG)."""
    from cm3leon.sampling import SamplingConfig

    eager = _no_stop_sampler(model, cfg, compile=False)
    greedy, cfg_img = SamplingConfig(greedy=True), SamplingConfig(top_p=0.9, cfg_scale=3.0)
    txt, img = _text(cfg, _prompts(cfg, 2), 32), _images(cfg, _prompts(cfg, 2))
    res["eager_ops_per_step"] = eager_ops_per_step(eager, txt, greedy, 2)
    res["eager_ops_per_step_image_cfg"] = eager_ops_per_step(eager, img, cfg_img, 2)
    res["eager_ops_per_layer_step"] = res["eager_ops_per_step"] / max(1, cfg.n_layers)
    inside_t, loop_t = host_syncs_per_step(eager, txt, greedy, 2)
    inside_i, loop_i = host_syncs_per_step(eager, img, cfg_img, 2)
    res["host_syncs_per_step"] = max(inside_t, inside_i)  # reads inside a decode step (the goal: 0)
    res["host_syncs_per_step_amortised"] = {"text": loop_t, "image_cfg": loop_i}  # the whole loop's reads / steps


def _roofline(res: dict, model, cfg, dev, new_tokens: int, repeats: int, compile: bool) -> None:
    """A batch-1 decode step must at least read every weight once."""
    from cm3leon.sampling import SamplingConfig
    from cm3leon.transformer import param_bytes

    sampler, greedy = _no_stop_sampler(model, cfg, compile), SamplingConfig(greedy=True)
    p = _prompts(cfg, 1)
    run = lambda n: sampler.generate(_text(cfg, p, n), greedy, prompts_per_step=1)  # noqa: E731
    step_s = paired_step_seconds({"ours": run}, new_tokens, dev, repeats)["ours"]
    bw, weights = measure_bandwidth(dev), param_bytes(model)
    roofline_s = weights / bw  # bw counts bytes moved per second (read + write); a step reads each weight once
    res.update(memory_bandwidth_gb_s=bw / 1e9, weight_bytes=weights, roofline_step_ms=roofline_s * 1e3,
               step_ms=step_s * 1e3, step_over_roofline=step_s / roofline_s, peak_memory_bytes=_peak_memory(dev))


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(size: str | None = "small", batches: tuple[int, ...] = (1, 8, 32), new_tokens: int = 32,
              device: str = "cpu", dtype: str = "float32", repeats: int = 3, hf_batch: int = 8,
              threads: int | None = None, config: str | None = None, compile: bool = False,
              image_batch: int = CFG_IMAGE_BATCH) -> dict:
    import torch

    # On a shared CPU, intra-op threads that wait for a descheduled sibling make small decode ops
    # 10x slower; --threads 1 gives stable numbers there (both sides use the same setting).
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf = None
    if config is not None:
        from evals.bench.sampler_models import random_model

        cfg, model = random_model(config, dev, torch_dtype)
    else:
        from evals.bench.sampler_models import load_imported

        cfg, model, hf = load_imported(size, dev, torch_dtype)
    from cm3leon.attention import prefill_backend

    res: dict = {"size": size if config is None else None, "config": config, "device": str(dev), "dtype": dtype,
                 "params": model.num_parameters(), "threads": torch.get_num_threads(), "new_tokens": new_tokens,
                 "compile": compile, "repeats": repeats, "torch": torch.__version__,
                 # the SDPA kernel of a prefix prefill at Chameleon-30B's head shape on this device and dtype
                 "attention_backend": prefill_backend(dev, torch_dtype)}
    if hf is not None:
        _vs_transformers(res, hf, model, cfg, dev, new_tokens, hf_batch, repeats, compile)
    _vs_minimal_loop(res, model, cfg, dev, batches, new_tokens, repeats, compile)
    if hf is None:  # no transformers side: tokens/s is the sampler's at the speedup batch (or the largest)
        row = next((r for r in res["minimal_loop"] if r["batch"] == hf_batch), res["minimal_loop"][-1])
        res.update(tokens_per_s=row["tokens_per_s"], batch_for_speedup=row["batch"])
    _batch_table(res, model, cfg, dev, batches, new_tokens, repeats, compile, image_batch)
    _probes(res, model, cfg)
    _roofline(res, model, cfg, dev, new_tokens, repeats, compile)
    return res


def command(
    size: str = typer.Option("small", help="imported Chameleon size (vs transformers): " + ", ".join(SIZES)),
    config: str = typer.Option("", help="named random shape instead of --size: " + ", ".join(NAMED_CONFIGS)),
    new_tokens: int = typer.Option(32, help="tokens generated per row"),
    batches: str = typer.Option("1,8,32", help="batch sizes for the scaling table"),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on cuda)"),
    image_batch: int = typer.Option(CFG_IMAGE_BATCH, help="batch of the images/s-with-CFG figure"),
    repeats: int = typer.Option(3, help="timed repeats per measurement (the median is kept)"),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    geometry: str = typer.Option("", help="instead: counters of both engines at a prompt geometry (coco-fid)"),
    decoding: str = typer.Option("ar", help="with --geometry: jacobi = speculative Jacobi beside plain decoding"),
    model: str = typer.Option("", help="with --decoding jacobi: demo = the trained demo model's weights"),
    window: int = typer.Option(16, help="with --decoding jacobi: the Jacobi window"),
) -> None:
    """Decode speed beside transformers' generate and a minimal loop, host reads, ops, and the roofline."""
    if geometry and decoding == "jacobi":
        from evals.bench.sampler_jacobi import run_jacobi_bench

        if model not in ("", "demo") or not 2 <= window <= 128:
            raise typer.BadParameter("--model must be demo or unset, --window in [2, 128]")
        res = run_jacobi_bench(model or None, window)
        print(json.dumps(res) if as_json else json.dumps(res, indent=1))
        return
    if geometry:
        from evals.bench.sampler_geometry import GEOMETRIES, print_geometry, run_geometry

        if geometry not in GEOMETRIES:
            raise typer.BadParameter(f"unknown geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
        if threads:
            import torch

            torch.set_num_threads(threads)
        res = run_geometry(geometry)
        print(json.dumps(res)) if as_json else print_geometry(res)
        return
    if config and config not in NAMED_CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r}; choose from {', '.join(NAMED_CONFIGS)}")
    if not config and size not in SIZES:
        raise typer.BadParameter(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose from auto, float32, bfloat16, float16")
    from evals import devices

    choice = devices.resolve(device)  # a device that is not there: one line, exit 2
    device, dtype = choice.device, choice.dtype if dtype == "auto" else dtype
    typer.echo(f"device: {device}{' (auto)' if choice.auto else ''}, dtype {dtype}", err=True)
    res = run_bench(None if config else size, tuple(int(b) for b in batches.split(",")), new_tokens, device, dtype,
                    repeats, threads=threads or None, config=config or None, compile=compile, image_batch=image_batch)
    if as_json:
        print(json.dumps(res))
        return
    _print_table(res)


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    name = res["config"] or res["size"]
    con.print(f"[bold]sampler bench[/] {name} ({res['params'] / 1e6:.1f}M params) on {res['device']} {res['dtype']}, "
              f"{res['threads']} thread(s), compile={res['compile']}, medians of {res['repeats']}")
    if "speedup_vs_transformers" in res:
        con.print(f"identical greedy tokens vs transformers: {res['identical_greedy_tokens']}")
        con.print(f"batch {res['batch_for_speedup']}: ours {res['tokens_per_s']:.0f} tok/s, transformers "
                  f"{res['transformers_tokens_per_s']:.0f} tok/s -> {res['speedup_vs_transformers']:.2f}x")
    for r in res["minimal_loop"]:
        con.print(f"batch {r['batch']}: step {r['step_ms']:.3f} ms vs minimal loop {r['minimal_step_ms']:.3f} ms "
                  f"-> overhead {r['overhead']:.2f}x")
    con.print(f"eager ops per step {res['eager_ops_per_step']:.0f} ({res['eager_ops_per_layer_step']:.0f} per layer), "
              f"host syncs per step {res['host_syncs_per_step']:g}; images/s with CFG at batch "
              f"{res['images_per_s_batch']}: {res['images_per_s']:.2f}")
    con.print(f"batch-1 step {res['step_ms']:.2f} ms, roofline {res['roofline_step_ms']:.2f} ms "
              f"({res['weight_bytes'] / 1e6:.0f} MB at {res['memory_bandwidth_gb_s']:.1f} GB/s) -> "
              f"{res['step_over_roofline']:.2f}x; peak memory {res['peak_memory_bytes'] / 2**20:.0f} MiB")
    t = Table("batch", "CFG", "text tok/s", "images/s", "codes/image")
    for r in res["by_batch"]:
        t.add_row(str(r["batch"]), f"{r['cfg_scale']:g}", f"{r['tokens_per_s']:.0f}", f"{r['images_per_s']:.2f}",
                  str(r["image_tokens"]))
    con.print(t)
