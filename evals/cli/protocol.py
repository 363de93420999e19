"""`cm3eval protocol write TASK --data-root DIR --out FILE`: save a task's protocol manifest.

The manifest (tasks/manifest.py) pins the FID-30K protocol: the prompts (ids, chosen captions,
reference images, in evaluation order), the split, resolution, resize protocol, the Inception
weights' sha256, candidates and retrieved documents. Written once and shared, it makes other
runs use exactly these prompts: `cm3eval run coco-fid --set dataset.manifest=FILE ...`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

protocol_app = typer.Typer(help="Protocol manifests (FID-30K): the prompts and settings a published number uses.",
                           no_args_is_help=True)


@protocol_app.command("write")
def write(
    task: str = typer.Argument(..., metavar="TASK", help="A task that follows a published protocol (coco-fid)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default: $CM3EVAL_DATA_ROOT)."),
    out: Path = typer.Option(..., "--out", help="The manifest file to write (JSON)."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec field: key.path=value (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts beyond the published n."),
    json_: bool = typer.Option(False, "--json", help="Print the manifest's summary as JSON."),
) -> None:
    """Build TASK's manifest from the annotations (the task's own selection) and write it."""
    from evals.plan import PlanError, collect_overrides, resolve_specs, task_manifest
    from tasks.loaders import check_data_root, resolve_data_root
    from tasks.manifest import write_manifest
    from tasks.protocols import summary

    (spec,) = resolve_specs([task], collect_overrides(set_, {"limit": limit}))
    if spec.protocol is None:
        raise PlanError(f"{task} follows no published protocol (its spec has no protocol.name)")
    root = check_data_root(spec, resolve_data_root(spec, data_root, build=False))
    _, manifest = task_manifest(spec, root)
    path = write_manifest(manifest, out)
    info = {**summary(manifest, len(manifest.prompts)), "file": str(path)}
    if json_:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{path}: {manifest.name} manifest of {task}, {len(manifest.prompts)} prompts, "
               f"hash {manifest.hash}")
    for line in info["deviations"]:
        typer.echo(f"note: differs from the published protocol: {line}")
