"""`cm3eval train ...`: the training recipe (demo scale), the `train_app` command group.

`train demo` rebuilds the shipped demo model from scratch: the shapes world (tasks.shapes, default
WorldConfig) is generated in memory, its train split turned into cm3leon.train.DemoData
(tasks.shapes.training) and handed to cm3leon.train.train_demo, which resumes from OUT/work/ when a
previous run was interrupted (--fresh starts over). `train untrained` writes the untrained baseline.
torch, cm3leon and tasks load inside the commands, so `cm3eval --help` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from cm3leon.train import DemoRecipe
    from tasks.shapes import World

train_app = typer.Typer(help="The training recipe (demo scale).", no_args_is_help=True)


@train_app.callback()
def _group() -> None:
    """Train models with the package's own recipe."""


def _torch_threads(threads: int) -> int:
    """--threads 0: 2, or 1 when other processes keep the CPU busy (load average over 0.5)."""
    if threads > 0:
        return threads
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy > 0.5 or (os.cpu_count() or 1) < 2 else 2


def _finish(out: Path, summary: dict, keep_work: bool, total: float) -> None:
    """Print what ran, drop OUT/work/ unless kept, print the folder's size."""
    import shutil

    typer.echo(f"stages run: {', '.join(summary['stages_run']) or 'none (all done already)'}; "
               f"seconds per stage: {json.dumps(summary['seconds'])}")
    if not keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "work" not in f.relative_to(out).parts)
    typer.echo(f"wrote {out}: {size / 1e6:.1f} MB (without work/); total time {total / 60:.1f} min")


def _sanity_check(out: Path, world: "World", recipe: "DemoRecipe", eval_n: int) -> None:
    """quick_eval on the first eval_n val images (not the harness metrics)."""
    from cm3leon import checkpoint
    from cm3leon.train import quick_eval
    from tasks.shapes.training import demo_data

    t0 = time.perf_counter()
    res = quick_eval(checkpoint.load(out), demo_data(world, "val").images, recipe, n=eval_n)
    res.pop("t2i_images", None)
    typer.echo("quick val sanity check (not the harness metrics): " + json.dumps(res, indent=1))
    typer.echo(f"evaluation {time.perf_counter() - t0:.0f} s")


@train_app.command("demo")
def demo(
    out: Optional[Path] = typer.Option(None, help="checkpoint folder to write (resumes from OUT/work/); "
                                                  "default: the shipped demo folder, cm3leon/zoo/shapes-demo"),
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
    from cm3leon.train import DemoRecipe, train_demo
    from tasks.shapes import WorldConfig, generate_world
    from tasks.shapes.training import demo_data, t2i_extra_scenes

    out = out or checkpoint.ALIASES["demo"]
    threads = _torch_threads(threads)
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
    _finish(out, summary, keep_work, time.perf_counter() - t0)
    if eval_n > 0:
        _sanity_check(out, world, recipe, eval_n)


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
    from cm3leon.errors import Cm3evalError
    from cm3leon.transformer import Transformer

    try:
        bundle = checkpoint.load(source)
    except (Cm3evalError, FileNotFoundError, ValueError) as e:
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
