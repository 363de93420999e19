"""Edited images in folders (MagicBrush-style pairs) -> the records a run's edit metrics score.

Layout: `--target` holds the ground-truth edited images, `--generated` the model's outputs named
like the targets, `--source` (optional) the input images named like the targets too. Files are
matched by their path relative to the folder without the extension (so `139/out1.png` matches
`139/out1.jpg`); every target needs its generated image and, when `--source` is given, its source.

`cm3eval score edit` scores them with the edit adapters of `evals.scoring` (the same functions
and metric set as a run's edit metrics, `scoring.EDIT_METRICS`). Always: "L1" and "L2 (MSE)"
(MagicBrush; generated resized to the target's size). With an encoder (`--encoder`, resolved by
`evals.encoders`): CLIP-I, and with `--captions` CLIP-T (generated vs target caption) and, with
`--source` and source captions, InstructPix2Pix's CLIP-dir; with `--source`, CLIP-img (source vs
generated). DINO when its weights are present (`--dino-weights`, `$CM3EVAL_DINO_WEIGHTS` or the
torch hub cache), otherwise skipped with the reason.

Captions (`--captions FILE.json`): an object whose keys are sample keys (relative path without
extension), target file names, or MagicBrush's nesting {session dir: {file name: caption}}; a
value is the target caption, or {"source": ..., "target": ...} (also "input"/"output").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cm3leon.errors import Cm3evalError
from evals.metrics.result import MetricResult

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CLI_ENCODER = "--encoder"  # the name the command's encoder is registered under in the scoring context
_SHOWN = {"pixel_distances": "L1", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "clip_dir": "CLIP-dir",
          "clip_img": "CLIP-img"}  # metric key -> the result name a skip is reported under


class EditScoreError(Cm3evalError, ValueError):
    """Folders or captions that cannot be scored (exit 2: bad input)."""


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


def edit_records(keys: list[str], files: dict[str, dict[str, Path]], captions: dict[str, Any] | None
                 ) -> list[dict[str, Any]]:
    """Sample records in the run's layout (absolute paths), so the run's edit adapters score them."""
    records = []
    for k in keys:
        src_cap, tgt_cap = caption_pair(captions, k, files["target"][k]) if captions is not None else (None, None)
        src = files.get("source", {}).get(k)
        records.append({"id": k, "images": {"output": str(files["generated"][k])},
                        "input": {"text": None, "image": str(src) if src else None, "target": str(files["target"][k])},
                        "references": [tgt_cap] if tgt_cap is not None else [],
                        "meta": {"input_caption": src_cap} if src_cap is not None else {}})
    return records


def _edit_plan(encoder: Any, dino: Any, source: Path | None, captions: dict[str, Any] | None,
               records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({metric key: options} to run, {result name: why skipped}) for what the command was given."""
    block: dict[str, dict[str, Any]] = {"pixel_distances": {}}
    skipped: dict[str, str] = {}
    if dino is not None:
        block["dino"] = {}
    if encoder is None:
        return block, {n: "no --encoder given" for n in ("CLIP-I", "CLIP-T", "CLIP-dir", "CLIP-img")}
    enc = {"encoder": CLI_ENCODER}
    block["clip_i"] = enc
    if source is not None:
        block["clip_img"] = enc
    else:
        skipped["CLIP-img"] = "no --source given"
    if captions is None:
        skipped.update({"CLIP-T": "no --captions given", "CLIP-dir": "no --captions given"})
        return block, skipped
    block["clip_t"] = enc
    if source is None:
        skipped["CLIP-dir"] = "no --source given"
    elif any(not r["meta"].get("input_caption") for r in records):
        skipped["CLIP-dir"] = "captions give no source caption for some samples"
    else:
        block["clip_dir"] = enc
    return block, skipped


def score_edit_folders(
    target: Path, generated: Path, source: Path | None = None, *, captions: dict[str, Any] | None = None,
    encoder=None, dino=None, seed: int = 0,
) -> tuple[dict[str, MetricResult], dict[str, str], int]:
    """(metrics, skipped {name: reason}, number of samples) for the folders; see the module docstring."""
    from evals import scoring
    from evals.scoring_inputs import Context

    keys, files = match_folders(target, generated, source)
    records = edit_records(keys, files, captions if encoder is not None else None)
    block, skipped = _edit_plan(encoder, dino, source, captions, records)
    ctx = Context.build(records, Path(generated), Path(target), seed=seed)
    if encoder is not None:
        ctx.encoders.put(CLI_ENCODER, encoder)
    if dino is not None:
        ctx.put_dino(None, dino)
    order = [k for k in scoring.EDIT_METRICS if k in block]
    scored = scoring.score_metrics({k: block[k] for k in order}, ctx, label="score edit")
    for key, why in scored.unavailable.items():
        skipped[_SHOWN[key]] = why
    return scored.metrics, skipped, len(keys)
