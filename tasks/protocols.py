"""Published evaluation protocols and the manifests that pin a run to one.

`coco-fid-30k` is the zero-shot MS-COCO FID of CM3leon's Table 1: 30,000 val2014 prompts (one
seeded caption per image, so 30,000 distinct reference images), FID at 256 px with the
pytorch-fid resize, 8 candidates per prompt reranked by CLIP, 2 retrieved documents.

A task spec names the protocol it reproduces (`protocol.name`); the plan phase then builds the
run's manifest (tasks/manifest.py) before any model loads: from the annotations with the task's
own selection rule (tasks/selection.py, the rule the engine applies), or from a saved file
(`dataset.manifest=PATH`). The manifest's hash goes into the resolved spec
(`protocol.manifest_hash`, hashed into the run's config, so a resume with another manifest is
refused naming that key), and `summary()` is what metrics.json records as the task's "protocol",
with whether the run matches the published setting (`compare` refuses differing ones).

The Inception weights' sha256 is given by the caller: tasks/ does not know where the metric
looks for its weights (evals.scoring does; tasks may not import evals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DataError
from .manifest import Manifest, Prompt, read_manifest
from .published import PUBLISHED, Published, published  # noqa: F401  (the table, re-exported here)
from .selection import selection_order
from .spec import TaskSpec


def run_settings(spec: TaskSpec, inception_sha256: str | None) -> dict[str, Any]:
    """The manifest settings this run measures with (from the resolved spec)."""
    fid = spec.metrics.get("fid") or {}
    inception = fid.get("feature_space", "inception") == "inception"
    r = spec.retrieval
    return {"split": spec.dataset.split, "resolution": fid.get("resolution"), "resize": fid.get("protocol"),
            "inception_sha256": inception_sha256 if inception else None,
            "candidates": spec.generation.n_candidates, "k": r.k if r.enabled else 0}


def manifest_size(spec: TaskSpec, pub: Published) -> int | None:
    """How many prompts the built manifest lists: the published n, or more when --limit asks for
    more (None: all). `--limit` below n takes a prefix, so 100 and 30,000 share one manifest and a
    run resumes across limits."""
    if spec.limit is None:
        return None
    return max(pub.n, spec.limit)


def build_manifest(spec: TaskSpec, root: str | Path, inception_sha256: str | None) -> Manifest:
    """The manifest of this task on this data root, by the task's own selection rule."""
    from dataclasses import replace

    from .loaders import load_dataset

    pub = published(spec.protocol.name)
    if spec.dataset.manifest is not None:  # the prompts must come from the data, not from another manifest
        spec = replace(spec, dataset=replace(spec.dataset, manifest=None))
    samples = load_dataset(spec, root).samples
    chosen = selection_order(samples, shuffle=spec.dataset.shuffle, seed=spec.seed,
                             limit=manifest_size(spec, pub))
    prompts = tuple(Prompt(s.id, s.meta.get("image_id"), s.meta.get("annotation_id"), s.text, s.image)
                    for s in chosen)
    ds = spec.dataset
    return Manifest(pub.name, spec.name, **run_settings(spec, inception_sha256), prompts=prompts,
                    selection={"loader": ds.loader, "seed": spec.seed, "shuffle": ds.shuffle,
                               "one_per_image": ds.one_per_image})


def check_saved(manifest: Manifest, spec: TaskSpec, inception_sha256: str | None, path: str) -> None:
    """A saved manifest must describe this run: same protocol and settings; one line naming the
    first setting that differs and the option that sets it."""
    where = {"split": "dataset.split", "resolution": "metrics.fid.resolution", "resize": "metrics.fid.protocol",
             "inception_sha256": "metrics.fid.weights", "candidates": "generation.n_candidates", "k": "retrieval.k"}
    if manifest.name != spec.protocol.name:
        raise DataError(f"dataset.manifest {path}: a {manifest.name} manifest, but task {spec.name} follows "
                        f"{spec.protocol.name}")
    mine = run_settings(spec, inception_sha256)
    for key, value in manifest.settings().items():
        if value != mine[key]:
            raise DataError(f"dataset.manifest {path}: {key} is {value!r} in the manifest but {mine[key]!r} in "
                            f"this run ({where[key]}); run with the manifest's settings or write a new one")
    one = manifest.selection.get("one_per_image")
    if one is not None and one != spec.dataset.one_per_image:
        raise DataError(f"dataset.manifest {path}: one_per_image is {one} in the manifest but "
                        f"{spec.dataset.one_per_image} in this run (dataset.one_per_image)")


def resolve_manifest(spec: TaskSpec, root: str | Path, inception_sha256: str | None) -> Manifest:
    """The run's manifest: the saved one (checked against the run), else built from the data."""
    if spec.dataset.manifest is None:
        return build_manifest(spec, root, inception_sha256)
    manifest = read_manifest(spec.dataset.manifest)
    check_saved(manifest, spec, inception_sha256, spec.dataset.manifest)
    return manifest


def summary(manifest: Manifest, n: int) -> dict[str, Any]:
    """metrics.json's "protocol" of a task evaluated on the first n prompts of the manifest, with
    whether that is the published setting (and, if not, how it differs)."""
    pub = published(manifest.name)
    out: dict[str, Any] = {"name": manifest.name, "manifest_hash": manifest.hash, "n": n, **manifest.settings()}
    expected = {"n": pub.n, "split": pub.split, "resolution": pub.resolution, "resize": pub.resize,
                "candidates": pub.candidates, "k": pub.k}
    deviations = [f"{key} {out[key]!r} (published: {want!r})" for key, want in expected.items() if out[key] != want]
    if manifest.inception_sha256 is None:
        deviations.append("FID not in Inception space")
    out["matches_published"] = not deviations
    out["deviations"] = deviations
    out["source"] = pub.source
    return out
