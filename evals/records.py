"""What one sample line holds: the sample, its inputs' digests, and the predictor's output
(images saved as PNG files beside the lines, before the line that names them is written)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image

from evals import runs
from evals.disk import THUMBNAIL  # input/target images are copied into the run as PNG thumbnails
from evals.protocol import Item
from evals.provenance import file_digest
from tasks.images import confined
from tasks.loaders import DataError, Sample
from tasks.spec import TaskSpec

# The first REPORT_SAMPLES samples of a task are the report's sample cards: for them (only, so a
# 30K-prompt run writes no extra gigabytes) the t2i reference, the candidates the reranker
# decoded anyway and the retrieved documents' images are saved as small thumbnails too.
REPORT_SAMPLES = 24
SMALL_THUMBNAIL = 128

def input_files(root: Path, s: Sample) -> dict[str, str | None]:
    """{path under the data root: content digest (None: missing)} of every image a sample reads,
    its shots' included: stored in the sample line, so a resume sees swapped image bytes."""
    rels = [s.image, s.target] + [x.image for x in s.shots]
    out: dict[str, str | None] = {}
    for rel in rels:
        if rel is None or rel in out:
            continue
        try:
            out[rel] = file_digest(confined(root, rel))  # never read a file outside the data root
        except (OSError, DataError):
            out[rel] = None
    return out


def base_record(spec: TaskSpec, s: Sample, inputs: dict[str, str | None] | None) -> dict[str, Any]:
    return {"id": s.id, "index": s.index, "seed": s.seed, "kind": spec.kind, "prompt": s.text,
            "prediction": None, "references": s.references, "images": {}, "candidates": [], "scores": None,
            "best": 0, "failure": None, "retrieved": [], "per_sample": {},
            "input": {"text": s.text, "image": s.image, "target": s.target}, "meta": s.meta,
            "shots": [x.id for x in s.shots], "input_files": inputs}


def failure_record(spec: TaskSpec, s: Sample, inputs: dict[str, str | None] | None, error: str,
                   stage: str) -> dict[str, Any]:
    """stage "data": the inputs are unreadable (final until they change); "predict": retried."""
    rec = base_record(spec, s, inputs)
    rec["failure"], rec["failure_stage"] = error, stage
    return rec


def output_record(spec: TaskSpec, task_dir: Path, item: Item, inputs: dict[str, str | None] | None,
                  out: dict[str, Any]) -> dict[str, Any]:
    s = item.sample
    rec = base_record(spec, s, inputs)
    stem = f"{s.index:07d}-{re.sub(r'[^A-Za-z0-9._-]', '_', s.id)[:60]}"
    img_dir = Path(task_dir) / runs.IMAGES
    paths: dict[str, str] = {}
    digests: dict[str, str] = {}  # a resume checks the files against these (a changed PNG is regenerated)

    def save(img: Any, name: str, max_side: int | None = None) -> str:
        rel = f"{runs.IMAGES}/{name}"
        digests[rel] = runs.save_png(img, img_dir / name, max_side)
        return rel

    for role, img in (out.get("images") or {}).items():
        paths[role] = save(img, f"{stem}-{re.sub(r'[^A-Za-z0-9_-]', '_', role)}.png")
    # thumbnails of the input and the ground truth, for the report (source → edited → target)
    shown = s.index < REPORT_SAMPLES
    for role, img in (("input", item.images.get("image")), ("target", item.report_images.get("target")),
                      ("reference", item.report_images.get("reference") if shown else None)):
        if img is not None:
            paths[role] = save(img, f"{stem}-{role}.png", THUMBNAIL)
    cands = [save(img, f"{stem}-cand{j:02d}.png") for j, img in enumerate(out.get("candidates") or [])]
    if shown and not cands:
        rec["candidate_thumbnails"] = [save(img, f"{stem}-cand{j:02d}-small.png", SMALL_THUMBNAIL)
                                       for j, img in enumerate(out.get("candidate_images") or [])]
    retrieved = []
    for j, doc in enumerate(out.get("retrieved") or []):
        doc = dict(doc)
        img = doc.pop("image_data", None)
        if shown and isinstance(img, Image.Image):
            doc["thumbnail"] = save(img, f"{stem}-doc{j}.png", SMALL_THUMBNAIL)
        retrieved.append(doc)
    rec.update(prompt=out.get("prompt", s.text), prediction=out.get("prediction"), images=paths,
               candidates=cands, scores=out.get("scores"), best=int(out.get("best") or 0),
               retrieved=retrieved, image_digests=digests)
    if out.get("extra"):
        rec["extra"] = out["extra"]
    return rec


def metric_json(m: Any) -> dict[str, Any]:
    """A MetricResult as metrics.json stores it, with its direction from the metric definition."""
    out = m.to_json()
    out.setdefault("higher_is_better", getattr(m, "higher_is_better", None))
    return out


def missing_metrics(spec: TaskSpec, scored: Any, metrics: dict[str, dict]) -> dict[str, str]:
    """Requested metric keys (spec.metrics) that produced no number, with the reason."""
    unavailable = dict(scored.unavailable)
    if not metrics and not unavailable:  # nothing scored at all (e.g. every sample failed)
        why = scored.notes[0] if scored.notes else "no metric value was produced"
        unavailable = {key: why for key in spec.metrics}
    for name, m in metrics.items():
        if m.get("value") is None:
            unavailable.setdefault(name, "the value is not a finite number")
    return unavailable
