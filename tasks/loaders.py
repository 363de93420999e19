"""Dataset loaders for the official file layouts: COCO captions, Karpathy splits, VQAv2 / OK-VQA,
VizWiz, TextVQA and MagicBrush (VisDial, Stanford paragraphs and MARIO-Eval: tasks/more_loaders.py,
which adds its rows to LOADERS when the package is imported).

A loader turns annotation files into `Sample`s in a canonical order, plus a fingerprint of the
bytes it read. It never opens images: the engine opens them per sample (with `open_image`, the
one image opener of the harness, tasks/images.py), so a corrupt image is a recorded per-sample
failure rather than a crash at load time.

Paths come from two places and both are confined to the data root: the spec's `dataset.files` /
`dataset.images` (checked when the spec is validated) and the file names inside annotation files
(checked here; an absolute path or a `..` component is an error naming the file and the entry).
Confinement is decided on resolved paths (symlinks followed), so a link inside the root that
points outside it is refused like a `..`. Two images under one id with different file names are
refused naming both (the last one used to win silently).

Data roots: `resolve_data_root` (--data-root, the built-in demo world, $CM3EVAL_DATA_ROOT) and
`check_data_root` (the root and the annotation files exist, inside the root) are what the plan
phase runs before any model loads; `load_dataset` runs the same check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .cache import cache_dir
from .errors import DataError
from .images import ImageError, confined, open_image
from .spec import TaskSpec

DATA_ROOT_ENV = "CM3EVAL_DATA_ROOT"
__all__ = ["DataError", "ImageError", "open_image", "confined", "load_dataset", "resolve_data_root",
           "check_data_root", "check_spec", "Sample", "Dataset", "LOADERS"]


@dataclass
class Sample:
    id: str
    kind: str
    text: str = ""  # t2i caption, VQA question, edit instruction; empty for captioning
    image: str | None = None  # path under the data root: the input image (t2i: the reference image)
    target: str | None = None  # edit: the ground-truth output image
    references: list[str] = field(default_factory=list)  # captions / answers / edit output captions
    meta: dict[str, Any] = field(default_factory=dict)
    # set by the engine
    index: int = -1
    seed: int = 0
    shots: list["Sample"] = field(default_factory=list)  # k-shot in-context examples

    def record(self) -> dict[str, Any]:
        """The JSON-able description written into a sample line."""
        return {"id": self.id, "text": self.text, "image": self.image, "target": self.target,
                "references": self.references, "meta": self.meta}


@dataclass
class Dataset:
    samples: list[Sample]
    fingerprint: str
    files: list[str]  # annotation files read, relative to the root


@dataclass
class _Ctx:
    """What a loader needs: the task (for messages), resolved files, the image folder, a hasher."""

    task: str
    kind: str
    root: Path
    split: str
    files: dict[str, str]
    images: str
    one_per_image: bool
    seed: int
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg"
    hasher: Any = field(default_factory=hashlib.sha256)
    read: list[str] = field(default_factory=list)

    def path(self, role: str) -> Path:
        return self.root / self.files[role]

    def json(self, role: str) -> Any:
        rel = self.files[role]
        path = self.root / rel
        try:
            confined(self.root, rel)
            raw = path.read_bytes()
        except ImageError as e:
            raise DataError(f"{self.task}: {e}") from None
        except FileNotFoundError:
            raise DataError(f"{self.task}: {path}: missing") from None
        self.hasher.update(f"{role}={rel}:{len(raw)}:".encode())
        self.hasher.update(raw)
        self.read.append(rel)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.task}: {path}: not valid JSON ({e})") from None

    def image_path(self, *parts: str, src: str) -> str:
        """A path from an annotation file, joined under the image folder; escapes are errors."""
        for p in parts:
            if not isinstance(p, str) or not p:
                raise DataError(f"{self.task}: {src}: expected a file name, got {p!r}")
            pp = PurePosixPath(p.replace("\\", "/"))
            if pp.is_absolute() or ".." in pp.parts or re.match(r"^[A-Za-z]:", p):
                raise DataError(f"{self.task}: {src}: unsafe path {p!r} (absolute or '..' would leave the data root)")
        joined = PurePosixPath(self.images, *[p.replace("\\", "/") for p in parts])
        return str(joined)


def _fail(ctx: _Ctx, role: str, what: str) -> DataError:
    return DataError(f"{ctx.task}: {ctx.root / ctx.files[role]}: {what}")


def _need(obj: Any, key: str, types: type | tuple, ctx: _Ctx, role: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], types):
        tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise _fail(ctx, role, f"{where}: expected a field {key!r} of type {tn}")
    return obj[key]


def _one_file_per_id(ctx: _Ctx, names: dict[Any, str], image_id: Any, name: str, where: str,
                     role: str = "annotations") -> None:
    """Refuse one image id under two file names (which image a sample shows would depend on the
    order of the file); the same entry twice is harmless."""
    other = names.setdefault(image_id, name)
    if other != name:
        raise _fail(ctx, role, f"{where}: image id {image_id!r} is both {other!r} and {name!r}")


def _stable_choice(seed: int, key: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


# ----------------------------------------------------------------------------- COCO captions
def load_coco_captions(ctx: _Ctx) -> list[Sample]:
    """captions_<split>.json (official COCO layout) through pycocotools.

    t2i: one sample per caption (id = annotation id), or with one_per_image one seeded caption per
    image (id = image id); the image is the reference image. caption: one sample per image with
    all its captions as references.
    """
    from pycocotools.coco import COCO

    data = ctx.json("annotations")
    if not isinstance(data, dict):
        raise _fail(ctx, "annotations", "expected a COCO captions object with 'images' and 'annotations'")
    images = _need(data, "images", list, ctx, "annotations", "top level")
    anns = _need(data, "annotations", list, ctx, "annotations", "top level")
    names: dict[int, str] = {}
    for n, im in enumerate(images):
        image_id = _need(im, "id", int, ctx, "annotations", f"images[{n}]")
        name = _need(im, "file_name", str, ctx, "annotations", f"images[{n}]")
        _one_file_per_id(ctx, names, image_id, name, f"images[{n}]")
    for n, a in enumerate(anns):
        _need(a, "image_id", int, ctx, "annotations", f"annotations[{n}]")
        _need(a, "id", int, ctx, "annotations", f"annotations[{n}]")
        _need(a, "caption", str, ctx, "annotations", f"annotations[{n}]")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    missing = sorted({a["image_id"] for a in anns} - set(coco.imgs))
    if missing:
        raise _fail(ctx, "annotations", f"captions refer to image ids not in 'images', e.g. {missing[:3]}")
    samples: list[Sample] = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        caps = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])
        if not caps:
            continue  # an image without captions is not a sample of either kind
        path = ctx.image_path(info["file_name"], src=f"images[id={image_id}].file_name")
        refs = [a["caption"].strip() for a in caps]
        meta = {"image_id": image_id}
        if ctx.kind == "caption":
            samples.append(Sample(str(image_id), "caption", image=path, references=refs, meta=meta))
        elif ctx.one_per_image:
            a = caps[_stable_choice(ctx.seed, str(image_id), len(caps))]
            samples.append(Sample(str(image_id), ctx.kind, text=a["caption"].strip(), image=path, references=refs,
                                  meta={**meta, "annotation_id": a["id"]}))
        else:
            for a in caps:
                samples.append(Sample(str(a["id"]), ctx.kind, text=a["caption"].strip(), image=path, references=refs,
                                      meta={**meta, "annotation_id": a["id"]}))
    if ctx.kind != "caption" and not ctx.one_per_image:
        samples.sort(key=lambda s: int(s.id))
    return samples


# ----------------------------------------------------------------------------- Karpathy
def load_karpathy(ctx: _Ctx) -> list[Sample]:
    """dataset_coco.json (Karpathy & Fei-Fei): images with split, filepath, filename, sentences.

    `split: train` also takes "restval" (the usual Karpathy training set = train + restval).
    """
    data = ctx.json("annotations")
    images = _need(data, "images", list, ctx, "annotations", "top level")
    wanted = {ctx.split} | ({"restval"} if ctx.split == "train" else set())
    samples: list[Sample] = []
    names: dict[Any, str] = {}
    for n, im in enumerate(images):
        split = _need(im, "split", str, ctx, "annotations", f"images[{n}]")
        if split not in wanted:
            continue
        filename = _need(im, "filename", str, ctx, "annotations", f"images[{n}]")
        sentences = _need(im, "sentences", list, ctx, "annotations", f"images[{n}]")
        refs = []
        for m, s in enumerate(sentences):
            refs.append(_need(s, "raw", str, ctx, "annotations", f"images[{n}].sentences[{m}]").strip())
        if not refs:
            raise _fail(ctx, "annotations", f"images[{n}]: no sentences")
        parts = [im["filepath"], filename] if im.get("filepath") else [filename]
        path = ctx.image_path(*parts, src=f"images[{n}]")
        image_id = im.get("cocoid", im.get("imgid", n))
        _one_file_per_id(ctx, names, image_id, path, f"images[{n}]")
        if ctx.kind == "caption":
            samples.append(Sample(str(image_id), "caption", image=path, references=refs, meta={"image_id": image_id}))
        else:
            pick = _stable_choice(ctx.seed, str(image_id), len(refs)) if ctx.one_per_image else None
            for m, r in enumerate(refs):
                if pick is None or m == pick:
                    sid = str(image_id) if pick is not None else f"{image_id}-{m}"
                    samples.append(Sample(sid, "t2i", text=r, image=path, references=refs, meta={"image_id": image_id}))
    if not samples:
        raise _fail(ctx, "annotations", f"no images with split {ctx.split!r}")
    return samples


# ----------------------------------------------------------------------------- VQA family
def load_vqav2(ctx: _Ctx) -> list[Sample]:
    """VQAv2 / OK-VQA: OpenEnded questions JSON + annotations JSON (official VQA API layout).

    Image files are COCO_<data_subtype>_<image_id:012d>.jpg; data_subtype comes from the
    questions file (e.g. "val2014"), falling back to the spec's split.
    """
    qdata = ctx.json("questions")
    adata = ctx.json("annotations")
    questions = _need(qdata, "questions", list, ctx, "questions", "top level")
    annotations = _need(adata, "annotations", list, ctx, "annotations", "top level")
    subtype = qdata.get("data_subtype") or adata.get("data_subtype") or ctx.split
    by_qid: dict[int, dict] = {}
    for n, a in enumerate(annotations):
        qid = _need(a, "question_id", int, ctx, "annotations", f"annotations[{n}]")
        answers = _need(a, "answers", list, ctx, "annotations", f"annotations[{n}]")
        for m, ans in enumerate(answers):
            _need(ans, "answer", str, ctx, "annotations", f"annotations[{n}].answers[{m}]")
        by_qid[qid] = a
    samples = []
    for n, q in enumerate(questions):
        qid = _need(q, "question_id", int, ctx, "questions", f"questions[{n}]")
        image_id = _need(q, "image_id", int, ctx, "questions", f"questions[{n}]")
        text = _need(q, "question", str, ctx, "questions", f"questions[{n}]")
        a = by_qid.get(qid)
        if a is None:
            raise _fail(ctx, "annotations", f"no annotation for question_id {qid}")
        try:
            name = ctx.image_pattern.format(subtype=subtype, image_id=image_id)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{ctx.task}: dataset.image_pattern {ctx.image_pattern!r}: {e!r} "
                            "(placeholders: {subtype}, {image_id})") from None
        path = ctx.image_path(name, src=f"questions[{n}]")
        samples.append(Sample(str(qid), "vqa", text=text.strip(), image=path,
                              references=[x["answer"] for x in a["answers"]],
                              meta={"question_id": qid, "image_id": image_id,
                                    "question_type": a.get("question_type"), "answer_type": a.get("answer_type"),
                                    "multiple_choice_answer": a.get("multiple_choice_answer")}))
    samples.sort(key=lambda s: int(s.id))
    return samples


def load_vizwiz(ctx: _Ctx) -> list[Sample]:
    """VizWiz-VQA: Annotations/<split>.json is a list of {image, question, answers[{answer,
    answer_confidence}], answer_type, answerable}; images are named by file name."""
    data = ctx.json("annotations")
    if not isinstance(data, list):
        raise _fail(ctx, "annotations", "expected a JSON list of {image, question, answers} objects")
    samples = []
    names: dict[str, str] = {}
    for n, q in enumerate(data):
        name = _need(q, "image", str, ctx, "annotations", f"[{n}]")
        _one_file_per_id(ctx, names, PurePosixPath(name).stem, name, f"[{n}].image")
        text = _need(q, "question", str, ctx, "annotations", f"[{n}]")
        answers = _need(q, "answers", list, ctx, "annotations", f"[{n}]")
        refs = [_need(a, "answer", str, ctx, "annotations", f"[{n}].answers[{m}]") for m, a in enumerate(answers)]
        path = ctx.image_path(name, src=f"[{n}].image")
        samples.append(Sample(PurePosixPath(name).stem, "vqa", text=text.strip(), image=path, references=refs,
                              meta={"image": name, "answer_type": q.get("answer_type"),
                                    "answerable": q.get("answerable")}))
    return samples


def load_textvqa(ctx: _Ctx) -> list[Sample]:
    """TextVQA 0.5.1: {"data": [{question, image_id, answers: [10 strings], question_id}]};
    images are <image_id>.jpg (val images live in train_images/)."""
    data = ctx.json("annotations")
    items = _need(data, "data", list, ctx, "annotations", "top level")
    samples = []
    for n, q in enumerate(items):
        qid = _need(q, "question_id", int, ctx, "annotations", f"data[{n}]")
        image_id = _need(q, "image_id", str, ctx, "annotations", f"data[{n}]")
        text = _need(q, "question", str, ctx, "annotations", f"data[{n}]")
        answers = _need(q, "answers", list, ctx, "annotations", f"data[{n}]")
        if not all(isinstance(a, str) for a in answers):
            raise _fail(ctx, "annotations", f"data[{n}].answers: expected a list of strings")
        path = ctx.image_path(f"{image_id}.jpg", src=f"data[{n}].image_id")
        samples.append(Sample(str(qid), "vqa", text=text.strip(), image=path, references=list(answers),
                              meta={"question_id": qid, "image_id": image_id}))
    samples.sort(key=lambda s: int(s.id))
    return samples


# ----------------------------------------------------------------------------- MagicBrush
def load_magicbrush(ctx: _Ctx) -> list[Sample]:
    """MagicBrush test/dev: edit_sessions.json {session: [{input, mask, output, instruction}]} and
    images/<session>/<file>. One sample per turn (independent single-turn editing: each turn
    starts from its own ground-truth input). Optional `descriptions`: global_descriptions.json
    {session: {file: caption}}; the output's caption becomes the reference text (CLIP-T)."""
    sessions = ctx.json("sessions")
    if not isinstance(sessions, dict):
        raise _fail(ctx, "sessions", "expected a mapping of session id -> list of turns")
    descriptions = ctx.json("descriptions") if "descriptions" in ctx.files else {}

    def order(k: str):
        return (0, int(k), k) if k.isdigit() else (1, 0, k)

    samples = []
    for session in sorted(sessions, key=order):
        turns = sessions[session]
        if not isinstance(turns, list) or not turns:
            raise _fail(ctx, "sessions", f"{session}: expected a non-empty list of turns")
        for t, turn in enumerate(turns, start=1):
            where = f"{session}[{t - 1}]"
            src = _need(turn, "input", str, ctx, "sessions", where)
            out = _need(turn, "output", str, ctx, "sessions", where)
            instruction = _need(turn, "instruction", str, ctx, "sessions", where)
            refs, meta = [], {"session": session, "turn": t, "mask": turn.get("mask")}
            desc = descriptions.get(session) if isinstance(descriptions, dict) else None
            if isinstance(desc, dict) and isinstance(desc.get(out), str):
                refs = [desc[out]]
            if isinstance(desc, dict) and isinstance(desc.get(src), str):
                meta["input_caption"] = desc[src]
            samples.append(Sample(
                f"{session}-{t}", "edit", text=instruction.strip(),
                image=ctx.image_path(session, src, src=f"{where}.input"),
                target=ctx.image_path(session, out, src=f"{where}.output"),
                references=refs, meta=meta))
    return samples


def load_mjhq(ctx: _Ctx) -> list[Sample]:
    """MJHQ-30K (playgroundai/MJHQ-30K): `meta_data.json` maps each image id to {"category", "prompt"};
    the images are <images>/<category>/<id>.jpg. One t2i sample per image (id = the image id, sorted),
    its category in meta (per-category FID groups by it)."""
    data = ctx.json("meta")
    if not isinstance(data, dict) or not data:
        raise _fail(ctx, "meta", "expected a non-empty object {image_id: {category, prompt}}")
    samples = []
    for image_id in sorted(data):
        entry = data[image_id]
        category = _need(entry, "category", str, ctx, "meta", image_id)
        prompt = _need(entry, "prompt", str, ctx, "meta", image_id)
        samples.append(Sample(image_id, "t2i", text=prompt.strip(),
                              image=ctx.image_path(category, f"{image_id}.jpg", src=f"{image_id}.category"),
                              meta={"category": category}))
    return samples


@dataclass(frozen=True)
class Loader:
    fn: Callable[[_Ctx], list[Sample]]
    kinds: tuple[str, ...]
    required: tuple[str, ...]  # file roles the spec must give
    optional: tuple[str, ...]
    layout: str  # shown when the data root does not match


LOADERS: dict[str, Loader] = {
    # control: the caption is the prompt, the image's edge map the condition (coco-canny2image)
    "coco_captions": Loader(load_coco_captions, ("t2i", "caption", "control"), ("annotations",), (),
                            "COCO captions JSON ({images, annotations}) and the image folder"),
    "karpathy": Loader(load_karpathy, ("t2i", "caption"), ("annotations",), (),
                       "Karpathy split JSON (dataset_coco.json: images with split/filepath/filename/sentences); "
                       "image paths are <images>/<filepath>/<filename>"),
    "vqav2": Loader(load_vqav2, ("vqa",), ("questions", "annotations"), (),
                    "VQA questions JSON ({questions}) + annotations JSON ({annotations}) and "
                    "<images>/COCO_<subtype>_<image_id:012d>.jpg"),
    "okvqa": Loader(load_vqav2, ("vqa",), ("questions", "annotations"), (),
                    "OK-VQA questions JSON + annotations JSON (VQA layout) and "
                    "<images>/COCO_<subtype>_<image_id:012d>.jpg"),
    "vizwiz": Loader(load_vizwiz, ("vqa",), ("annotations",), (),
                     "VizWiz Annotations/<split>.json (list of {image, question, answers}) and <images>/<image>"),
    "textvqa": Loader(load_textvqa, ("vqa",), ("annotations",), (),
                      "TextVQA_0.5.1_<split>.json ({data: [...]}) and <images>/<image_id>.jpg"),
    "magicbrush": Loader(load_magicbrush, ("edit",), ("sessions",), ("descriptions",),
                         "MagicBrush edit_sessions.json and <images>/<session>/<file>.png"),
    "mjhq": Loader(load_mjhq, ("t2i",), ("meta",), (),
                   "MJHQ-30K meta_data.json ({image_id: {category, prompt}}) and <images>/<category>/<image_id>.jpg"),
}


def check_spec(spec: TaskSpec, src: str) -> None:
    """Loader-level checks of a spec (called by the registry tests and the engine)."""
    from .spec import SpecError

    ds = spec.dataset
    if ds.loader not in LOADERS:
        raise SpecError(f"{src}: dataset.loader: unknown loader {ds.loader!r} (known: {', '.join(LOADERS)})")
    loader = LOADERS[ds.loader]
    if spec.kind not in loader.kinds:
        raise SpecError(f"{src}: kind: loader {ds.loader} gives {'/'.join(loader.kinds)} samples, not {spec.kind}")
    for role in loader.required:
        if role not in ds.files:
            raise SpecError(f"{src}: dataset.files.{role}: required by loader {ds.loader}")
    for role in ds.files:
        if role not in loader.required + loader.optional:
            raise SpecError(f"{src}: dataset.files.{role}: not a file of loader {ds.loader} "
                            f"(expects {', '.join(loader.required + loader.optional)})")


def expected_layout(spec: TaskSpec, root: Path, files: dict[str, str] | None = None, images: str | None = None) -> str:
    files = spec.dataset.files if files is None else files
    images = spec.dataset.images if images is None else images
    entries = [f"{root / rel} ({role})" for role, rel in files.items()]
    entries.append(f"{root / images if images else root}/… (images)")
    return f"expected layout: {'; '.join(entries)} — {LOADERS[spec.dataset.loader].layout}"


def _split_files(spec: TaskSpec, support: bool) -> tuple[str, dict[str, str], str]:
    """(split, file roles, image folder) of the task's split or of its k-shot support split."""
    ds = spec.dataset
    split, files, images = ds.split, dict(ds.files), ds.images
    if not support:
        return split, files, images
    sup = ds.support
    if sup is None:
        raise DataError(f"{spec.name}: prompt.k_shot={spec.prompt.k_shot} needs dataset.support (the split the "
                        "in-context examples come from)")
    split = sup.split or split
    files = {**files, **(sup.files or {})}
    images = sup.images if sup.images is not None else images
    for role, rel in {**files, "images": images}.items():
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{spec.name}: dataset.support: {role} must be inside the data root, got {rel!r}")
    return split, files, images


def resolve_data_root(spec: TaskSpec, data_root: str | os.PathLike | None, *, build: bool = True) -> Path:
    """Where a task's data lives: --data-root, else the built-in demo world (rendered under the
    cache on first use; with build=False only its path), else $CM3EVAL_DATA_ROOT."""
    if data_root is not None:
        return Path(data_root).expanduser()
    if spec.dataset.builtin == "shapes":
        if not build:
            return cache_dir("shapes")
        from .shapes import demo_world_root

        return demo_world_root(cache_dir())
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    raise DataError(f"{spec.name}: no data root; pass --data-root DIR (or set {DATA_ROOT_ENV}); "
                    f"{expected_layout(spec, Path('DIR'))}")


def check_data_root(spec: TaskSpec, root: str | os.PathLike, *, support: bool = False) -> Path:
    """The root is a folder and holds the task's annotation files, inside it once symlinks are
    resolved; one line naming what is missing and the layout expected. Returns the root."""
    root = Path(root).expanduser()
    _, files, images = _split_files(spec, support)
    if not root.is_dir():
        raise DataError(f"{spec.name}: data root {root} does not exist; {expected_layout(spec, root, files, images)}")
    for role, rel in files.items():
        if not (root / rel).is_file():
            raise DataError(f"{spec.name}: data root {root} has no {rel}; {expected_layout(spec, root, files, images)}")
        try:
            confined(root, rel)
        except ImageError as e:
            raise DataError(f"{spec.name}: dataset.files.{role}: {e}") from None
    return root


def _apply_manifest(spec: TaskSpec, samples: list[Sample], ctx: _Ctx) -> list[Sample]:
    """The samples a saved manifest lists, in its order; its hash joins the data fingerprint, so a
    resume with another manifest is refused. Its order is final: a shuffle on top would evaluate
    other prompts than the manifest's first N (the plan turns dataset.shuffle off)."""
    from .manifest import apply_manifest, read_manifest

    if spec.dataset.shuffle:
        raise DataError(f"{spec.name}: dataset.manifest: the manifest fixes the order; set dataset.shuffle=false")
    manifest = read_manifest(spec.dataset.manifest)
    ctx.hasher.update(f"manifest={manifest.hash}|".encode())
    return apply_manifest(samples, manifest, spec.name, spec.dataset.manifest)


def load_dataset(spec: TaskSpec, root: str | Path, *, support: bool = False) -> Dataset:
    """Samples of the task's split (or of its k-shot support split) in canonical order."""
    check_spec(spec, f"task {spec.name}")
    root = check_data_root(spec, root, support=support)
    ds = spec.dataset
    split, files, images = _split_files(spec, support)
    ctx = _Ctx(spec.name, spec.kind, root, split, files, images, ds.one_per_image, spec.seed, ds.image_pattern)
    ctx.hasher.update(f"{ds.loader}|{split}|{images}|{spec.kind}|{ds.one_per_image}|{ds.image_pattern}|".encode())
    samples = LOADERS[ds.loader].fn(ctx)
    if ds.manifest is not None and not support:
        samples = _apply_manifest(spec, samples, ctx)
    if not samples:
        raise DataError(f"{spec.name}: {root}: the annotation files hold no samples for split {split!r}")
    seen: dict[str, int] = defaultdict(int)
    for s in samples:
        seen[s.id] += 1
    dup = [k for k, v in seen.items() if v > 1]
    if dup:
        raise DataError(f"{spec.name}: duplicate sample ids in {', '.join(ctx.read)}, e.g. {dup[:3]}")
    return Dataset(samples, ctx.hasher.hexdigest()[:16], ctx.read)
