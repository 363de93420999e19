"""Loaders for the official layouts of VisDial v1.0, the Stanford image paragraphs and MARIO-Eval;
COCO captions for structure-guided generation reuse `load_coco_captions` (tasks/loaders.py).

Same contract as tasks/loaders.py: annotation files -> `Sample`s in a canonical order, every path
confined to the data root, one error naming the file and the entry for a malformed one. The rows
below join tasks.loaders.LOADERS when this module is imported (tasks/__init__.py imports it).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from .errors import DataError
from .loaders import LOADERS, Loader, Sample, _Ctx, _fail, _need

VISDIAL_OPTIONS = 100  # candidate answers per round in VisDial v1.0


# ----------------------------------------------------------------------------- VisDial v1.0
def _dense_rounds(ctx: _Ctx) -> dict[tuple[int, int], list[float]]:
    """visdial_1.0_val_dense_annotations.json: [{image_id, round_id (1-based), gt_relevance[100]}]."""
    if "dense" not in ctx.files:
        return {}
    data = ctx.json("dense")
    if not isinstance(data, list):
        raise _fail(ctx, "dense", "expected a JSON list of {image_id, round_id, gt_relevance}")
    out: dict[tuple[int, int], list[float]] = {}
    for n, d in enumerate(data):
        image_id = _need(d, "image_id", int, ctx, "dense", f"[{n}]")
        round_id = _need(d, "round_id", int, ctx, "dense", f"[{n}]")
        rel = d.get("gt_relevance", d.get("relevance"))  # val: gt_relevance; train's file: relevance
        if not isinstance(rel, list) or len(rel) != VISDIAL_OPTIONS or \
                not all(isinstance(x, (int, float)) for x in rel):
            raise _fail(ctx, "dense", f"[{n}]: expected gt_relevance, a list of {VISDIAL_OPTIONS} numbers")
        out[(image_id, round_id)] = [float(x) for x in rel]
    return out


def _question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"  # VisDial stores questions without their "?"


def load_visdial(ctx: _Ctx) -> list[Sample]:
    """visdial_1.0_<split>.json {split, data: {dialogs, questions, answers}}: one sample per round
    (id <image_id>-<round>, rounds 1-based), its 100 answer options, the ground-truth index, the
    caption and the ground-truth history before it; the dense relevance of the annotated round.
    Images are `dataset.image_pattern` over {subtype} (the file's split, e.g. val2018) and {image_id}."""
    top = ctx.json("dialogs")
    data = _need(top, "data", dict, ctx, "dialogs", "top level")
    questions = _need(data, "questions", list, ctx, "dialogs", "data")
    answers = _need(data, "answers", list, ctx, "dialogs", "data")
    dialogs = _need(data, "dialogs", list, ctx, "dialogs", "data")
    subtype = top.get("split") or ctx.split
    dense = _dense_rounds(ctx)

    def text(table: list, i: Any, where: str) -> str:
        if not isinstance(i, int) or not 0 <= i < len(table) or not isinstance(table[i], str):
            raise _fail(ctx, "dialogs", f"{where}: index {i!r} is not in the {len(table)} strings it refers to")
        return table[i]

    samples = []
    for n, d in enumerate(dialogs):
        image_id = _need(d, "image_id", int, ctx, "dialogs", f"data.dialogs[{n}]")
        caption = _need(d, "caption", str, ctx, "dialogs", f"data.dialogs[{n}]")
        rounds = _need(d, "dialog", list, ctx, "dialogs", f"data.dialogs[{n}]")
        path = ctx.image_path(ctx.image_pattern.format(subtype=subtype, image_id=image_id),
                              src=f"data.dialogs[{n}].image_id")
        history: list[list[str]] = []
        for r, rd in enumerate(rounds, start=1):
            where = f"data.dialogs[{n}].dialog[{r - 1}]"
            q = _question(text(questions, _need(rd, "question", int, ctx, "dialogs", where), where + ".question"))
            a = text(answers, _need(rd, "answer", int, ctx, "dialogs", where), where + ".answer").strip()
            opts = _need(rd, "answer_options", list, ctx, "dialogs", where)
            gt = _need(rd, "gt_index", int, ctx, "dialogs", where)
            if len(opts) != VISDIAL_OPTIONS or not 0 <= gt < len(opts):
                raise _fail(ctx, "dialogs", f"{where}: expected {VISDIAL_OPTIONS} answer_options and a gt_index "
                                            f"among them, got {len(opts)} and {gt}")
            options = [text(answers, o, f"{where}.answer_options").strip() for o in opts]
            meta = {"image_id": image_id, "round": r, "caption": caption.strip(), "history": list(history),
                    "options": options, "gt_index": gt}
            if (image_id, r) in dense:
                meta["gt_relevance"] = dense[(image_id, r)]
            samples.append(Sample(f"{image_id}-{r}", "dialog", text=q, image=path, references=[a], meta=meta))
            history.append([q, a])
    return samples


# ----------------------------------------------------------------------------- Stanford paragraphs
def load_paragraphs(ctx: _Ctx) -> list[Sample]:
    """paragraphs_v1.json [{image_id, paragraph, url, ...}] and <split>_split.json (a list of image
    ids): one sample per image of the split, its paragraph the one reference. Images are Visual
    Genome's, the url's last folder and file under the image folder: <images>/VG_100K[_2]/<id>.jpg."""
    items = ctx.json("paragraphs")
    if not isinstance(items, list):
        raise _fail(ctx, "paragraphs", "expected a JSON list of {image_id, paragraph, url}")
    ids = ctx.json("split")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise _fail(ctx, "split", "expected a JSON list of image ids")
    wanted = set(ids)
    samples = []
    for n, it in enumerate(items):
        image_id = _need(it, "image_id", int, ctx, "paragraphs", f"[{n}]")
        if image_id not in wanted:
            continue
        paragraph = _need(it, "paragraph", str, ctx, "paragraphs", f"[{n}]")
        url = _need(it, "url", str, ctx, "paragraphs", f"[{n}]")
        url_path = PurePosixPath(url)  # .../VG_100K_2/2356347.jpg
        path = ctx.image_path(url_path.parent.name, url_path.name, src=f"[{n}].url")
        samples.append(Sample(str(image_id), "caption", image=path, references=[paragraph.strip()],
                              meta={"image_id": image_id}))
    missing = wanted - {int(s.id) for s in samples}
    if missing:
        raise _fail(ctx, "split", f"image ids with no paragraph in {ctx.files['paragraphs']}, e.g. {sorted(missing)[:3]}")
    samples.sort(key=lambda s: int(s.id))
    return samples


# ----------------------------------------------------------------------------- MARIO-Eval
def quoted_words(prompt: str) -> list[str]:
    """The words a MARIO-Eval prompt asks to render: every '...' span, split on whitespace,
    lower-cased (TextDiffuser's get_key_words over the lower-cased line)."""
    return [w for span in re.findall(r"'(.*?)'", prompt.strip().lower()) for w in span.split()]


def load_mario_eval(ctx: _Ctx) -> list[Sample]:
    """MARIOEval/<subset>/<subset>.txt: one prompt per line, the words to render in single quotes;
    sample id <subset>-<line index> (0-based, as TextDiffuser names its images <index>_<seed>).
    Subsets with images (LAIONEval4000, TMDBEval500, OpenLibraryEval500) keep the ground truth
    image <images>/<index>.jpg as the sample's reference image."""
    path = ctx.path("prompts")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{ctx.task}: {path}: missing") from None
    ctx.hasher.update(f"prompts={ctx.files['prompts']}:{len(raw)}:".encode())
    ctx.hasher.update(raw)
    ctx.read.append(ctx.files["prompts"])
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise _fail(ctx, "prompts", f"not UTF-8 text ({e})") from None
    subset = PurePosixPath(ctx.files["prompts"]).stem
    samples = []
    for i, line in enumerate(lines):
        prompt = line.strip()
        if not prompt:
            continue
        words = quoted_words(prompt)
        image = ctx.image_path(f"{i}.jpg", src=f"line {i + 1}") if ctx.images else None
        samples.append(Sample(f"{subset}-{i}", "t2i", text=prompt, image=image, references=words,
                              meta={"subset": subset, "index": i}))
    return samples


LOADERS.update({
    "visdial": Loader(load_visdial, ("dialog",), ("dialogs",), ("dense",),
                      "visdial_1.0_<split>.json ({split, data: {dialogs, questions, answers}}), optionally "
                      "visdial_1.0_<split>_dense_annotations.json, and <images>/VisualDialog_<split>_<id:012d>.jpg"),
    "stanford_paragraphs": Loader(load_paragraphs, ("caption",), ("paragraphs", "split"), (),
                                  "paragraphs_v1.json ([{image_id, paragraph, url}]), <split>_split.json (image ids) "
                                  "and Visual Genome images <images>/VG_100K[_2]/<image_id>.jpg"),
    "mario_eval": Loader(load_mario_eval, ("t2i",), ("prompts",), (),
                         "MARIOEval/<subset>/<subset>.txt (one prompt per line, words to render in single quotes); "
                         "images (optional): <images>/<index>.jpg"),
})
