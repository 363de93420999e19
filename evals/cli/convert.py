"""`cm3eval convert SRC --out DIR [--vq PATH]`: any checkpoint the library reads -> a native folder.

SRC is an HF-layout Chameleon / Anole folder, Meta's original release (models/<size>/ + tokenizer/)
or a native folder; `--vq` attaches Meta's vqgan.ckpt (vqgan.yaml beside it) so the native folder
can decode images (transformers' conversion drops the VQ decoder). The weights keep the source's
dtype unless `--dtype` says otherwise. torch and the model library load inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

_DTYPES = ("auto", "float32", "bfloat16", "float16")
NATIVE_FAMILIES = ("cm3leon", "chameleon")  # the families a native folder's tokenizer is detected as


def convert(
    src: str = typer.Argument(..., help="checkpoint folder: HF Chameleon/Anole, Meta's release, or native"),
    out: Path = typer.Option(..., "--out", help="native folder to write (must not exist or be empty)"),
    vq: Path = typer.Option(None, "--vq", help="Meta's tokenizer/vqgan.ckpt (vqgan.yaml beside it) or a vq.safetensors"),
    dtype: str = typer.Option("auto", help=f"weights dtype: {', '.join(_DTYPES)} (auto: the source's)"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Write a native cm3eval folder (config.json, model.safetensors, vq.safetensors, tokenizer.json)."""
    import torch

    from cm3leon import checkpoint
    from cm3leon.weights import SAFETENSORS_DTYPES

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise checkpoint.CheckpointError(f"--out {out}: exists and is not an empty folder; choose a new one")
    info = checkpoint.inspect(src, vq=vq)
    if info.family not in NATIVE_FAMILIES:  # a native folder keeps no family: it would be read as Chameleon
        raise checkpoint.CheckpointError(f"{src}: a {info.family} checkpoint is evaluated from its own folder "
                                         f"(cm3eval run TASK --model {src}); convert writes "
                                         f"{' and '.join(NATIVE_FAMILIES)} checkpoints only")
    target = SAFETENSORS_DTYPES.get(info.dtype, torch.float32) if dtype == "auto" else getattr(torch, dtype)
    bundle = checkpoint.load(src, vq=vq, dtype=target, with_encoder=True)
    checkpoint.save(bundle, out)
    summary = {"out": str(out), "source": str(info.path), "layout": info.layout, "family": info.family,
               "n_params": info.n_params, "dtype": str(target).removeprefix("torch."),
               "vq_decoder": bundle.vq is not None and bundle.vq.has_decoder}
    if json_out:
        typer.echo(json.dumps(summary))
        return
    decoder = "with a VQ decoder" if summary["vq_decoder"] else "WITHOUT a VQ decoder (pass --vq to decode images)"
    typer.echo(f"{info.layout} {info.family} checkpoint, {info.n_params / 1e6:,.1f}M parameters "
               f"({summary['dtype']}), {decoder} -> {out}")
