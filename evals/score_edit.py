"""`cm3eval score edit`: score edited images in folders (MagicBrush-style pairs).

Layout: `--target` holds the ground-truth edited images, `--generated` the model's outputs named
like the targets, `--source` (optional) the input images named like the targets too. Files are
matched by their path relative to the folder without the extension (so `139/out1.png` matches
`139/out1.jpg`); every target needs its generated image and, when `--source` is given, its source.

Always: "L1" and "L2 (MSE)" (MagicBrush; generated resized to the target's size). With
`--encoder SPEC` (parsed by `cm3leon.encoder.load_encoder`): CLIP-I, and with `--captions`
CLIP-T (generated vs target caption) and, with `--source` and source captions, InstructPix2Pix's
CLIP-dir; with `--source`, CLIP-img (source vs generated). DINO when its weights are present
(`--dino-weights`, `$CM3EVAL_DINO_WEIGHTS` or the torch hub cache), otherwise skipped with the reason.

Captions (`--captions FILE.json`): an object whose keys are sample keys (relative path without
extension), target file names, or MagicBrush's nesting {session dir: {file name: caption}}; a
value is the target caption, or {"source": ..., "target": ...} (also "input"/"output").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image

from evals.metrics.clip_score import clip_i, clip_t
from evals.metrics.editing import (
    clip_directional_similarity,
    clip_image_similarity,
    distance_results,
    dino_similarity,
    pixel_distance_pair,
)
from evals.metrics.result import MetricResult

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CHUNK = 32  # images held in memory at once


class EditScoreError(ValueError):
    pass


def collect_images(folder: Path, role: str) -> dict[str, Path]:
    """{relative path without extension: file} of the images under `folder`."""
    if not folder.is_dir():
        raise EditScoreError(f"--{role}: {folder} is not a directory")
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in out:
                raise EditScoreError(f"--{role}: two images for sample {key!r}: {out[key].name} and {p.name}")
            out[key] = p
    if not out:
        raise EditScoreError(f"--{role}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return out


def _few(names: set[str] | list[str], k: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def match_folders(target: Path, generated: Path, source: Path | None) -> tuple[list[str], dict[str, dict[str, Path]]]:
    """Sample keys (sorted) and {role: {key: path}}; any missing counterpart is an error."""
    files = {"target": collect_images(target, "target"), "generated": collect_images(generated, "generated")}
    if source is not None:
        files["source"] = collect_images(source, "source")
    keys = set(files["target"])
    for role, found in files.items():
        if role == "target":
            continue
        if missing := keys - set(found):
            raise EditScoreError(f"{len(missing)} target image(s) have no {role} counterpart: {_few(missing)}")
        if extra := set(found) - keys:
            raise EditScoreError(f"{len(extra)} {role} image(s) have no target counterpart: {_few(extra)}")
    return sorted(keys), files


def load_captions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EditScoreError(f"--captions {path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise EditScoreError(f"--captions {path}: expected a JSON object, got {type(data).__name__}")
    return data


def caption_pair(captions: dict[str, Any], key: str, target_file: Path) -> tuple[str | None, str]:
    """(source caption or None, target caption) of one sample."""
    entry = captions.get(key, captions.get(target_file.name))
    parent = captions.get(target_file.parent.name)
    if entry is None and isinstance(parent, dict):
        entry = parent.get(target_file.name, parent.get(target_file.stem))
    if isinstance(entry, str):
        return None, entry
    if isinstance(entry, dict):
        src = entry.get("source", entry.get("input"))
        tgt = entry.get("target", entry.get("output"))
        if isinstance(tgt, str) and (src is None or isinstance(src, str)):
            return src, tgt
    raise EditScoreError(f"--captions: no usable caption for sample {key!r} (looked up {key!r}, "
                         f"{target_file.name!r} and {target_file.parent.name!r}/{target_file.name!r})")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise EditScoreError(f"cannot read image {path}: {e}") from None


def score_edit_folders(
    target: Path, generated: Path, source: Path | None = None, *, captions: dict[str, Any] | None = None,
    encoder=None, dino=None, seed: int = 0,
) -> tuple[dict[str, MetricResult], dict[str, str], int]:
    """(metrics, skipped {name: reason}, number of samples) for the folders; see the module docstring."""
    keys, files = match_folders(target, generated, source)
    l1, mse = np.empty(len(keys)), np.empty(len(keys))
    emb: dict[str, list[torch.Tensor]] = {"gen": [], "tgt": [], "src": [], "dino_gen": [], "dino_tgt": []}
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start:start + CHUNK]
        gen = [_open(files["generated"][k]) for k in chunk]
        tgt = [_open(files["target"][k]) for k in chunk]
        for j, (g, t) in enumerate(zip(gen, tgt)):
            l1[start + j], mse[start + j] = pixel_distance_pair(g, t)
        if encoder is not None:
            emb["gen"].append(encoder.encode_image(gen))
            emb["tgt"].append(encoder.encode_image(tgt))
            if source is not None:
                emb["src"].append(encoder.encode_image([_open(files["source"][k]) for k in chunk]))
        if dino is not None:
            emb["dino_gen"].append(dino.encode_image(gen))
            emb["dino_tgt"].append(dino.encode_image(tgt))
    cat = {k: torch.cat(v) for k, v in emb.items() if v}

    metrics = distance_results(l1, mse, seed=seed)
    skipped: dict[str, str] = {}
    if dino is not None:
        metrics["DINO"] = dino_similarity(cat["dino_gen"], cat["dino_tgt"], seed=seed)
    clip_names = ["CLIP-I", "CLIP-T", "CLIP-dir", "CLIP-img"]
    if encoder is None:
        skipped.update({n: "no --encoder given" for n in clip_names})
        return metrics, skipped, len(keys)

    metrics["CLIP-I"] = clip_i(cat["gen"], cat["tgt"], seed=seed)
    if source is not None:
        metrics["CLIP-img"] = clip_image_similarity(cat["src"], cat["gen"], seed=seed)
    else:
        skipped["CLIP-img"] = "no --source given"
    if captions is None:
        skipped.update({"CLIP-T": "no --captions given", "CLIP-dir": "no --captions given"})
        return metrics, skipped, len(keys)
    pairs = [caption_pair(captions, k, files["target"][k]) for k in keys]
    tgt_txt = encoder.encode_text([t for _, t in pairs])
    metrics["CLIP-T"] = clip_t(cat["gen"], tgt_txt, seed=seed)
    if source is None:
        skipped["CLIP-dir"] = "no --source given"
    elif any(s is None for s, _ in pairs):
        skipped["CLIP-dir"] = "captions give no source caption for some samples"
    else:
        src_txt = encoder.encode_text([s for s, _ in pairs])
        metrics["CLIP-dir"] = clip_directional_similarity(cat["src"], cat["gen"], src_txt, tgt_txt, seed=seed)
    return metrics, skipped, len(keys)


def _load_encoder(spec: str):
    try:
        from cm3leon.encoder import load_encoder
    except ModuleNotFoundError as e:
        if e.name != "cm3leon.encoder":
            raise
        raise EditScoreError("--encoder needs cm3leon.encoder, which this install does not have") from None
    try:
        return load_encoder(spec)
    except (ValueError, OSError, ImportError) as e:
        raise EditScoreError(f"--encoder {spec!r}: {e}") from None


def _load_dino(weights: Path | None) -> tuple[Any, str | None]:
    """(DinoEncoder or None, reason it was skipped). An explicit --dino-weights that fails is an error."""
    from evals.metrics.dino import DinoEncoder, DinoWeightsNotFound

    try:
        return DinoEncoder.load(weights), None
    except DinoWeightsNotFound as e:
        if weights is not None:
            raise EditScoreError(str(e)) from None
        return None, f"weights not present: {e}"
    except ValueError as e:
        raise EditScoreError(str(e)) from None


def edit(
    generated: Path = typer.Option(..., "--generated", help="folder of generated (edited) images, named like the targets"),
    target: Path = typer.Option(..., "--target", help="folder of ground-truth edited images"),
    source: Path | None = typer.Option(None, "--source", help="folder of input images, named like the targets"),
    captions: Path | None = typer.Option(None, "--captions", help="JSON captions (target, or {source, target})"),
    encoder: str | None = typer.Option(None, "--encoder", help="CLIP encoder spec, e.g. open_clip:ViT-B-32:PATH"),
    dino_weights: Path | None = typer.Option(None, "--dino-weights", help="dino_deitsmall16_pretrain.pth"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """MagicBrush / InstructPix2Pix editing metrics: L1, L2 (MSE), CLIP-I, CLIP-T, CLIP-dir, CLIP-img, DINO."""
    try:
        caps = load_captions(captions) if captions is not None else None
        enc = _load_encoder(encoder) if encoder is not None else None
        dino, dino_reason = _load_dino(dino_weights)
        metrics, skipped, n = score_edit_folders(target, generated, source, captions=caps, encoder=enc, dino=dino,
                                                 seed=seed)
    except EditScoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if dino_reason is not None:
        skipped["DINO"] = dino_reason
    if as_json:
        print(json.dumps({"n_samples": n, "metrics": {k: m.to_json() for k, m in metrics.items()},
                          "skipped": skipped, "encoder": encoder}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "95% CI", "n", title=f"edit scores ({n} samples)")
    for name, m in metrics.items():
        ci = f"[{m.ci[0]:.4f}, {m.ci[1]:.4f}]" if m.ci is not None else "-"
        table.add_row(name, f"{m.value:.4f}", ci, str(m.n))
    con = Console()
    con.print(table)
    for name, reason in skipped.items():
        con.print(f"skipped {name}: {reason}")
