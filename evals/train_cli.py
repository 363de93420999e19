"""`cm3eval train demo`: rebuild the shipped demo model from scratch with the package's recipe.

The shapes world (tasks.shapes_world, default WorldConfig) is generated in memory; its train split
is turned into cm3leon.train.DemoData and handed to cm3leon.train.train_demo, which resumes from
OUT/work/ when a previous run was interrupted (--fresh starts over).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from cm3leon.checkpoint import ALIASES
from cm3leon.train import DemoData, DemoEdit, DemoImage, DemoRecipe

train_app = typer.Typer(help="The training recipe (demo scale).", no_args_is_help=True)


@train_app.callback()
def _group() -> None:
    """Train models with the package's own recipe."""


def majority_answer(answers: list[str], canonical: str) -> str:
    """The most frequent of the ten annotator answers (ties go to the canonical answer)."""
    counts = Counter(answers)
    best = max(counts.values())
    return canonical if counts.get(canonical) == best else max(counts, key=lambda a: (counts[a], -answers.index(a)))


def demo_data(world, split: str = "train") -> DemoData:
    """A shapes-world split as in-memory training data (images rendered, answers by majority)."""
    from tasks.shapes_world import render

    ws, size = world.splits[split], world.config.image_size
    questions: dict[int, list[tuple[str, str]]] = {}
    for q in ws.questions:
        questions.setdefault(q.image_id, []).append((q.question, majority_answer(q.answers, q.answer)))
    images = [DemoImage(str(im.image_id), render(im.scene, size), list(im.captions), questions.get(im.image_id, []))
              for im in ws.images]
    cache = {}

    def rendered(scene):
        if scene not in cache:
            cache[scene] = render(scene, size)
        return cache[scene]

    edits = [DemoEdit(t.instruction, rendered(t.source), rendered(t.target)) for es in ws.edits for t in es.turns]
    return DemoData(images, edits)


def t2i_extra_scenes(config, n: int) -> list[DemoImage]:
    """The n train-split scenes after the world's own (config.n_train of them), captions only.

    A split's i-th scene depends on (seed, split, i) alone, so these extend the same train split
    and never hold a val/test scene (the world reserves those by scene hash)."""
    import dataclasses

    from tasks.shapes_world import generate_world, render

    if n <= 0:
        return []
    big = generate_world(dataclasses.replace(config, n_train=config.n_train + n, n_val=0, n_test=0,
                                             questions_per_image=0, edit_fraction=0.0))
    return [DemoImage(str(im.image_id), render(im.scene, config.image_size), list(im.captions))
            for im in big.splits["train"].images[config.n_train:]]


@train_app.command("demo")
def demo(
    out: Path = typer.Option(ALIASES["demo"], help="checkpoint folder to write (resumes from OUT/work/)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    steps_scale: float = typer.Option(1.0, help="multiply every stage's step count"),
    seed: int = typer.Option(0, help="training seed (the world is always the default one)"),
    fresh: bool = typer.Option(False, "--fresh", help="discard OUT/work/ and train every stage again"),
    threads: int = typer.Option(0, help="CPU threads for torch; 0: 2, or 1 when other processes keep the CPU "
                                        "busy (with busy cores, a second OpenMP thread costs more than it gives)"),
    eval_n: int = typer.Option(50, help="quick sanity evaluation on this many val images after training (0: none)"),
    keep_work: bool = typer.Option(False, help="keep OUT/work/ (stage checkpoints, ~60 MB) after a finished build; "
                                   "an interrupted build always keeps it and resumes from it"),
    compile_lm: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the LM stages' forward (~1.3x on CPU; needs a C++ "
                                                "compiler); default: on when $CXX or g++ is found"),
) -> None:
    """Rebuild the demo model (VQ, tokenizer, encoder, bank, CM3 pretraining, SFT) in one command."""
    import shutil

    import torch

    from cm3leon import checkpoint
    from cm3leon.train import quick_eval, train_demo
    from tasks.shapes_world import WorldConfig, generate_world

    if threads <= 0:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = 1 if busy > 0.5 or (os.cpu_count() or 1) < 2 else 2
    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        typer.echo("error: --device cuda but torch sees no CUDA device", err=True)
        raise typer.Exit(2)
    t0 = time.perf_counter()
    world = generate_world(WorldConfig())
    data = demo_data(world, "train")
    typer.echo(f"torch threads: {threads}; device: {device}")
    typer.echo(f"world: {len(data.images)} train images, {sum(len(i.qa) for i in data.images)} questions, "
               f"{len(data.edits)} edit turns ({time.perf_counter() - t0:.1f} s)")
    recipe = DemoRecipe(seed=seed, steps_scale=steps_scale)
    data.t2i_extra = t2i_extra_scenes(world.config, recipe.t2i_extra_images)
    typer.echo(f"plus {len(data.t2i_extra)} text->image scenes ({time.perf_counter() - t0:.1f} s)")
    if compile_lm is None:
        compile_lm = shutil.which(os.environ.get("CXX", "g++")) is not None
    typer.echo(f"torch.compile for the LM stages: {'on' if compile_lm else 'off'}")
    summary = train_demo(data, recipe, out, device=device, fresh=fresh, compile_forward=compile_lm)
    total = time.perf_counter() - t0
    typer.echo(f"stages run: {', '.join(summary['stages_run']) or 'none (all done already)'}; "
               f"seconds per stage: {json.dumps(summary['seconds'])}")
    if not keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "work" not in f.relative_to(out).parts)
    typer.echo(f"wrote {out}: {size / 1e6:.1f} MB (without work/); total time {total / 60:.1f} min")
    if eval_n > 0:
        bundle = checkpoint.load(out)
        val = demo_data(world, "val").images
        res = quick_eval(bundle, val, recipe, n=eval_n)
        res.pop("t2i_images", None)
        typer.echo("quick val sanity check (not the harness metrics): " + json.dumps(res, indent=1))
        typer.echo(f"evaluation {time.perf_counter() - t0 - total:.0f} s")


@train_app.command("untrained")
def untrained(
    out: Path = typer.Option(..., help="checkpoint folder to write"),
    source: str = typer.Option("demo", "--from", help="checkpoint folder (or 'demo') whose parts are kept"),
    seed: int = typer.Option(0, help="seed of the fresh decoder initialisation"),
) -> None:
    """A baseline: SOURCE with its decoder re-initialised as training starts it (same VQ, tokenizer,
    encoder and bank), so metrics can say how far training moved them (e.g. FD vs an untrained model)."""
    import shutil

    import torch

    from cm3leon import checkpoint
    from cm3leon.transformer import Transformer

    try:
        bundle = checkpoint.load(source)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: --from {source}: {e}", err=True)
        raise typer.Exit(1)
    if out.exists() and any(out.iterdir()):
        typer.echo(f"error: {out} exists and is not empty", err=True)
        raise typer.Exit(1)
    torch.manual_seed(seed)  # train_demo seeds the same way before building its decoder
    bundle.model = Transformer(bundle.config).eval()
    checkpoint.save(bundle, out)
    if bundle.bank_dir is not None:
        shutil.copytree(bundle.bank_dir, out / "bank")
    typer.echo(f"wrote {out}: {source} with an untrained decoder (seed {seed})")
