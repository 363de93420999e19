"""A protocol manifest as data: which prompts a published metric is measured on, and how.

The FID-30K protocol of CM3leon (and of the text-to-image papers it is compared with) is "30,000
val2014 captions, one per image, FID against those images at 256 px". Two runs only measure the
same thing when they use the same prompts, the same reference images, the same resize protocol
and the same Inception weights, so a manifest records exactly that and hashes it:

- `prompts`: one row per prompt in evaluation order: the sample id, the COCO image id, the
  annotation id of the chosen caption, the caption and the image (the reference set is the
  images of these rows);
- `settings`: split, resolution, resize protocol, the Inception weights' sha256, candidates per
  prompt and retrieved documents;
- `selection`: how the prompts were chosen (seed, shuffle, one caption per image): informative,
  the prompts themselves are what is hashed.

`Manifest.hash` is the sha256 of the canonical JSON of name + settings + prompts. A saved manifest
(`cm3eval protocol write`) is read back with its hash recomputed, so an edited file is refused
rather than trusted. `apply_manifest` makes a loader's samples the manifest's prompts, in its
order, after checking each one against the annotations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

FORMAT = "cm3eval-manifest/1"
SETTINGS = ("split", "resolution", "resize", "inception_sha256", "candidates", "k")


@dataclass(frozen=True)
class Prompt:
    id: str  # the loader's sample id (the image id with one caption per image)
    image_id: int | str | None
    annotation_id: int | None  # the chosen caption's annotation id (COCO captions)
    caption: str
    image: str | None  # path under the data root: the reference image


@dataclass(frozen=True)
class Manifest:
    name: str  # the protocol, e.g. "coco-fid-30k"
    task: str
    split: str
    resolution: int | None
    resize: str | None  # the FID resize protocol (pytorch-fid, torch-fidelity, clean)
    inception_sha256: str | None  # None: FID not measured in Inception space
    candidates: int
    k: int
    prompts: tuple[Prompt, ...]
    selection: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    @property
    def hash(self) -> str:
        """sha256 of what makes two measurements comparable (selection notes excluded)."""
        body = {"name": self.name, **self.settings(), "prompts": [asdict(p) for p in self.prompts]}
        return hashlib.sha256(_canonical(body)).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "hash": self.hash, "name": self.name, "task": self.task, **self.settings(),
                "n": len(self.prompts), "selection": self.selection,
                "prompts": [asdict(p) for p in self.prompts]}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """The manifest as JSON (written whole, then renamed, so a reader never sees half a file)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = manifest.to_json()
    rows = data.pop("prompts")
    # the header indented, one prompt per line: readable, diffable, ~150 bytes a prompt
    head = json.dumps(data, indent=1, ensure_ascii=False)[:-2]
    body = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows)
    tmp.write_text(f"{head},\n \"prompts\": [\n{body}\n ]\n}}\n")
    tmp.replace(path)
    return path


def _prompt(row: Any, n: int, src: str) -> Prompt:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("caption"), str):
        raise DataError(f"{src}: prompts[{n}]: expected an object with a string id and caption")
    return Prompt(row["id"], row.get("image_id"), row.get("annotation_id"), row["caption"], row.get("image"))


def read_manifest(path: str | Path) -> Manifest:
    """A saved manifest; its hash is recomputed and must equal the stored one."""
    path = Path(path).expanduser()
    src = f"dataset.manifest {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{src}: no such file; write one with `cm3eval protocol write coco-fid --data-root DIR "
                        "--out FILE`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{src}: not a readable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{src}: not a cm3eval manifest (expected \"format\": \"{FORMAT}\")")
    rows = data.get("prompts")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{src}: prompts: expected a non-empty list")
    try:
        manifest = Manifest(str(data["name"]), str(data.get("task", "")), str(data["split"]), data.get("resolution"),
                            data.get("resize"), data.get("inception_sha256"), int(data["candidates"]),
                            int(data["k"]), tuple(_prompt(r, n, src) for n, r in enumerate(rows)),
                            dict(data.get("selection") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{src}: missing or malformed field {e}") from None
    if data.get("hash") != manifest.hash:
        raise DataError(f"{src}: its content hashes to {manifest.hash[:16]}…, not the recorded "
                        f"{str(data.get('hash'))[:16]}… (edited by hand?); write it again with `cm3eval protocol write`")
    return manifest


def apply_manifest(samples: list[Any], manifest: Manifest, task: str, path: str | Path) -> list[Any]:
    """The loader's samples restricted to the manifest's prompts, in the manifest's order, each
    checked against the annotations (same image, a caption the image really has)."""
    from dataclasses import replace

    by_id = {s.id: s for s in samples}
    out = []
    for p in manifest.prompts:
        s = by_id.get(p.id)
        where = f"{task}: dataset.manifest {path}: prompt {p.id}"
        if s is None:
            raise DataError(f"{where} (image {p.image_id}) is not in the data; the manifest was written for "
                            "other annotations (or another dataset.one_per_image)")
        if p.image is not None and s.image != p.image:
            raise DataError(f"{where}: image {p.image} in the manifest, {s.image} in the annotations")
        if p.caption.strip() not in {r.strip() for r in s.references}:
            raise DataError(f"{where}: caption {p.caption[:40]!r} is not one of image {p.image_id}'s captions")
        meta = {**s.meta, **({"annotation_id": p.annotation_id} if p.annotation_id is not None else {})}
        out.append(replace(s, text=p.caption.strip(), meta=meta))
    return out
