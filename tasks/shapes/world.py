"""The "shapes" world: a deterministic synthetic dataset for the embedded demo.

A tiny CM3leon model is trained on this world on a laptop CPU and then evaluated
with the *real* COCO / VQAv2 / MagicBrush loaders and metrics, so the world is
written in the official file layouts and is small enough to learn in minutes,
yet not trivial (composition of colour x kind x size x position, paraphrased
captions, annotator noise in VQA answers, exact edit targets).

Scenes
    64x64 RGB (``WorldConfig.image_size``), plain background (white, gray,
    black), 1-3 shapes. Kinds: circle, square, triangle, cross (a star is an
    unreadable blob at 11 px, a cross is not). Colours: red, green, blue,
    yellow, purple, orange. Sizes: small, large. Each shape sits in its own
    cell of a 3x3 grid (rows top/middle/bottom x columns left/center/right)
    and is drawn inside that cell, so shapes never overlap and "position" has
    one clean meaning. Within a scene each (colour, kind) pair is unique, so
    "the red circle" always names exactly one shape.
    Val/test scenes are disjoint from train scenes: a scene's hash bucket
    decides which side of the split it may be drawn for (independent of the
    split sizes, so changing ``n_train`` does not change val/test).

Layout written by ``write_world(world, ROOT)``::

    ROOT/world.json                                   config, generator version, file manifest, content hash
    ROOT/images/{split}/shapes_{split}_{id:012d}.png  the split's images (PNG, RGB)
    ROOT/annotations/captions_{split}.json            COCO captions: {"info","licenses","images":[{"id",
                                                      "file_name","width","height","license"}],"annotations":
                                                      [{"id","image_id","caption"}]}; 5 captions per image
    ROOT/annotations/dataset_shapes.json              Karpathy split file, like dataset_coco.json:
                                                      {"dataset","images":[{"filepath","filename","imgid",
                                                      "split","cocoid","sentids","sentences":[{"raw","tokens",
                                                      "imgid","sentid"}]}]}; "filepath" is the folder under
                                                      ROOT/images (COCO's "val2014" analogue), split in
                                                      train/val/test
    ROOT/vqa/{split}_questions.json                   VQAv2 questions: {"info","task_type":"Open-Ended",
                                                      "data_type":"shapes","data_subtype":split,"license",
                                                      "questions":[{"image_id","question","question_id"}]}
    ROOT/vqa/{split}_annotations.json                 VQAv2 annotations: {"info","data_type","data_subtype",
                                                      "license","annotations":[{"question_id","image_id",
                                                      "question_type","answer_type","multiple_choice_answer",
                                                      "answers":[{"answer","answer_confidence","answer_id"}]}]}
                                                      with exactly 10 answers; question_id = image_id*1000+k
    ROOT/edit/{split}/edit_sessions.json              MagicBrush: {session_id: [turn, ...]}, a turn is
                                                      {"input":"<sid>-input.png","mask":null,"instruction",
                                                      "output":"<sid>-output1.png","input_caption",
                                                      "output_caption","edit_type"}; turn k>1 reads
                                                      "<sid>-output{k-1}.png". "edit_type" (recolor/move/add/
                                                      remove) is our addition; MagicBrush readers ignore it.
    ROOT/edit/{split}/global_descriptions.json        MagicBrush caption file for CLIP-T / directional
                                                      similarity: {sid: {"<sid>-input.png": caption,
                                                      "<sid>-output1.png": caption, ...}}
    ROOT/edit/{split}/images/{sid}/{sid}-input.png, {sid}-output1.png, ...

This mirrors the MagicBrush test set (``test/edit_sessions.json``,
``test/global_descriptions.json``, ``test/images/<img_id>/<img_id>-input.png``
with ``-output{k}.png`` and ``-mask{k}.png``) as far as it is known here; edits
are mask-free, so no mask files are written and "mask" is null. The session id
is the source image's id, as in MagicBrush (COCO ids).

Everything is a pure function of ``WorldConfig``: same config -> byte-identical
files (sorted JSON keys, fixed separators, PNGs saved with a fixed
compress_level and no metadata chunks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from cm3leon.errors import Cm3evalError

class WorldFolderError(Cm3evalError, FileExistsError):
    """The world's folder holds something that is not a world (refused rather than deleted)."""


# Bump when anything that changes the written bytes changes; ensure_world then regenerates.
GENERATOR_VERSION = 1

SPLITS = ("train", "val", "test")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 200, 30), "purple": (150, 60, 190), "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
KINDS = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A dissenting VQA annotator picks a confusable colour, not a random one.
SIMILAR_COLORS = {"red": "orange", "orange": "red", "yellow": "orange", "blue": "purple", "purple": "blue",
                  "green": "yellow"}
EDIT_TYPES = ("recolor", "move", "add", "remove")
QUESTION_FAMILIES = ("color", "shape", "count", "where", "yesno")
_SPLIT_ID_BASE = {"train": 100_000, "val": 200_000, "test": 300_000}
_MAX_PER_SPLIT = 99_999
_EVAL_BUCKETS = 10  # 1 of 10 scene-hash buckets is reserved for val/test


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 200
    image_size: int = 64
    min_shapes: int = 1
    max_shapes: int = 3
    questions_per_image: int = 5      # one per family (color, shape, count, where, yes/no) at 5
    edit_fraction: float = 1.0        # share of each split's images that start an edit session
    two_turn_fraction: float = 0.2    # share of edit sessions with a second turn
    dissent_rate: float = 0.5         # share of VQA questions where 1-3 of the 10 annotators disagree
    variant_rate: float = 0.15        # share of agreeing answers written as a surface variant ("two", "Red")

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            n = getattr(self, name)
            if not 0 <= n <= _MAX_PER_SPLIT:
                raise ValueError(f"WorldConfig.{name}={n}: must be in [0, {_MAX_PER_SPLIT}]")
        if self.image_size < 24:
            raise ValueError(f"WorldConfig.image_size={self.image_size}: shapes need at least 24 px")
        if not 1 <= self.min_shapes <= self.max_shapes <= 9:
            raise ValueError(f"WorldConfig shapes: need 1 <= min_shapes ({self.min_shapes}) <= "
                             f"max_shapes ({self.max_shapes}) <= 9")
        if self.questions_per_image < 0:
            raise ValueError("WorldConfig.questions_per_image must be >= 0")
        for name in ("edit_fraction", "two_turn_fraction", "dissent_rate", "variant_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)}: must be in [0, 1]")

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


# The demo's evaluation copy: the same val/test splits as the training world (a split's scenes do
# not depend on the other splits' sizes) and a small train split for in-context examples only, so
# `cm3eval run demo` writes about 1,400 files on first use instead of 14,000.
EVAL_WORLD = WorldConfig(n_train=200)


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True, order=True)
class Shape:
    row: int    # 0 top .. 2 bottom
    col: int    # 0 left .. 2 right
    kind: str
    color: str
    size: str


@dataclass(frozen=True)
class ShapeScene:
    background: str
    shapes: tuple[Shape, ...]   # kept in reading order (row, col)

    def key(self) -> str:
        return self.background + "|" + ";".join(f"{s.row}{s.col}:{s.size}-{s.color}-{s.kind}" for s in self.shapes)

    def with_shapes(self, shapes: Iterable[Shape]) -> "ShapeScene":
        return ShapeScene(self.background, tuple(sorted(shapes)))

    def free_cells(self) -> list[tuple[int, int]]:
        used = {(s.row, s.col) for s in self.shapes}
        return [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]


def _cell_center(row: int, col: int, image_size: int) -> tuple[int, int]:
    return round((col + 0.5) * image_size / 3), round((row + 0.5) * image_size / 3)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: Any, image_size: int) -> None:
    """One geometry for both the image and the mask, so masks are exact."""
    cx, cy = _cell_center(shape.row, shape.col, image_size)
    cell = image_size / 3
    # large fits inside its cell with a margin (9 px half-extent in a 21.3 px cell at 64 px)
    r = round((0.43 if shape.size == "large" else 0.24) * cell)
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        h = round(r * 0.85)  # similar area to the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape.kind == "cross":
        t = max(1, round(r / 3))
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene: ShapeScene, image_size: int = 64) -> Image.Image:
    """The scene as an RGB image, pixel-exact (no antialiasing)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw_shape(draw, s, COLORS[s.color], image_size)
    return img


def shape_mask(shape: Shape, image_size: int = 64) -> np.ndarray:
    """Bool [H, W] of the pixels that ``render`` paints for ``shape``."""
    img = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(img), shape, 255, image_size)
    return np.asarray(img) > 0


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)  # no text/time chunks: deterministic
    return buf.getvalue()


# ----------------------------------------------------------------------------- language


def position_name(row: int, col: int) -> str:
    """'top left', 'top', 'left', 'center', ... (the VQA answer for 'where is ...')."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def position_phrase(row: int, col: int) -> str:
    name = position_name(row, col)
    if name == "center":
        return "in the center"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun_phrase(s: Shape, *, size: bool, color: bool, pos: bool, rng: random.Random | None = None,
                 article: bool = True) -> str:
    words = []
    if size:
        words.append(rng.choice(SIZE_WORDS[s.size]) if rng else s.size)
    if color:
        words.append(s.color)
    words.append(s.kind)
    text = " ".join(words)
    text = _article(text) if article else text
    return f"{text} {position_phrase(s.row, s.col)}" if pos else text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_caption(scene: ShapeScene) -> str:
    """The canonical, fully specified caption (every attribute and the background)."""
    nps = [_noun_phrase(s, size=True, color=True, pos=True) for s in scene.shapes]
    return f"{_join(nps)} on a {scene.background} background"


def _captions(scene: ShapeScene, rng: random.Random) -> list[str]:
    """Five distinct captions; the first is the canonical one so a t2i prompt fully specifies the image."""
    shapes, bg, n = list(scene.shapes), scene.background, len(scene.shapes)

    def nps(size: bool, color: bool, pos: bool, shuffle: bool = False) -> str:
        order = rng.sample(shapes, n) if shuffle else shapes
        return _join([_noun_phrase(s, size=size, color=color, pos=pos, rng=rng) for s in order])

    pool: list[Callable[[], str]] = [
        lambda: nps(False, True, False, shuffle=True),
        lambda: (f"one {_noun_phrase(shapes[0], size=True, color=True, pos=False, rng=rng, article=False)}"
                 if n == 1 else f"{NUMBER_WORDS[n]} shapes: {nps(False, True, False)}"),
        lambda: f"there {'is' if n == 1 else 'are'} {nps(True, True, False)} on a {bg} background",
        lambda: f"a {bg} image with {nps(False, True, True, shuffle=True)}",
        lambda: f"a picture of {nps(True, True, True)}",
        lambda: nps(False, True, True),
        lambda: nps(True, True, False, shuffle=True),
    ]
    captions = [scene_caption(scene)]
    for make in rng.sample(pool, len(pool)):
        text = make()
        if text not in captions:
            captions.append(text)
        if len(captions) == 5:
            return captions
    raise AssertionError(f"could not make 5 distinct captions for {scene.key()}")  # pool is built to prevent this


def caption_tokens(text: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


# ----------------------------------------------------------------------------- VQA

_POSITION_NAMES = frozenset(position_name(r, c) for r in range(3) for c in range(3))


@dataclass
class VQAItem:
    question_id: int
    image_id: int
    question: str
    question_type: str      # VQAv2 style: "what color is the", "how many", ...
    answer_type: str        # "other" | "number" | "yes/no"
    answer: str             # canonical answer == multiple_choice_answer
    answers: list[str]      # the 10 annotator answers (surface variants and dissent included)
    confidences: list[str]  # "yes" | "maybe" per answer


def _ref(s: Shape, scene: ShapeScene, rng: random.Random) -> str:
    """A referring expression naming ``s`` uniquely: 'circle' when its kind is unique, else 'red circle'."""
    unique_kind = sum(t.kind == s.kind for t in scene.shapes) == 1
    return s.kind if unique_kind and rng.random() < 0.5 else f"{s.color} {s.kind}"


def _neighbour_position(s: Shape, rng: random.Random) -> str:
    cells = [(r, c) for r in range(3) for c in range(3)
             if max(abs(r - s.row), abs(c - s.col)) == 1]
    return position_name(*rng.choice(cells))


def _question(family: str, scene: ShapeScene, rng: random.Random) -> tuple[str, str, str, str, str]:
    """(question, question_type, answer_type, answer, plausible wrong answer) for one family."""
    shapes = scene.shapes
    if family == "color":
        s = rng.choice(shapes)
        if sum(t.kind == s.kind for t in shapes) == 1:
            q = f"what color is the {s.kind}?"
        else:
            q = f"what color is the {s.kind} {position_phrase(s.row, s.col)}?"
        wrong = SIMILAR_COLORS.get(s.color) or rng.choice([c for c in COLORS if c != s.color])
        return q, "what color is the", "other", s.color, wrong
    if family == "shape":
        s = rng.choice(shapes)
        wrong = rng.choice([k for k in KINDS if k != s.kind])
        return f"what shape is {position_phrase(s.row, s.col)}?", "what shape is", "other", s.kind, wrong
    if family == "count":
        mode = rng.choice(("all", "kind", "color"))
        if mode == "all":
            q, n = "how many shapes are there?", len(shapes)
        elif mode == "kind":
            kind = rng.choice(KINDS)
            q, n = f"how many {PLURALS[kind]} are there?", sum(s.kind == kind for s in shapes)
        else:
            color = rng.choice([s.color for s in shapes])
            q, n = f"how many {color} shapes are there?", sum(s.color == color for s in shapes)
        wrong = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
        return q, "how many", "number", str(n), wrong
    if family == "where":
        s = rng.choice(shapes)
        return (f"where is the {_ref(s, scene, rng)}?", "where is the", "other",
                position_name(s.row, s.col), _neighbour_position(s, rng))
    if family == "yesno":
        present = {(s.color, s.kind) for s in shapes}
        if rng.random() < 0.5:
            s = rng.choice(shapes)
            target = (s.color, s.kind)
        else:  # an absent pair sharing a colour or kind with the scene, so colour or kind alone cannot answer
            s = rng.choice(shapes)
            options = sorted({(c, s.kind) for c in COLORS} | {(s.color, k) for k in KINDS})
            target = rng.choice([p for p in options if p not in present])
        answer = "yes" if target in present else "no"
        q = f"is there {_article(f'{target[0]} {target[1]}')}?"
        return q, "is there a", "yes/no", answer, "no" if answer == "yes" else "yes"
    raise ValueError(f"unknown question family {family!r}")


def _surface_variant(answer: str, answer_type: str, rng: random.Random) -> str:
    """A spelling the official VQA normaliser maps back to ``answer`` (number words, case, articles, periods)."""
    if answer_type == "number":
        return NUMBER_WORDS[int(answer)]
    options = [answer.capitalize(), answer + "."]
    if answer in _POSITION_NAMES:
        options.append(f"the {answer}")  # "the left" is natural; "the red" would not be
    return rng.choice(options)


def _annotate(answer: str, answer_type: str, wrong: str, cfg: WorldConfig,
              rng: random.Random) -> tuple[list[str], list[str]]:
    """Ten annotator answers: mostly ``answer`` (some surface variants), sometimes 1-3 dissenters."""
    n_dissent = rng.choice((1, 1, 2, 3)) if rng.random() < cfg.dissent_rate else 0
    dissenters = set(rng.sample(range(10), n_dissent))
    answers, confidences = [], []
    for i in range(10):
        if i in dissenters:
            answers.append(wrong)
            confidences.append(rng.choice(("maybe", "yes")))
        else:
            answers.append(_surface_variant(answer, answer_type, rng) if rng.random() < cfg.variant_rate else answer)
            confidences.append("yes")
    return answers, confidences


def _questions(image_id: int, scene: ShapeScene, cfg: WorldConfig, rng: random.Random) -> list[VQAItem]:
    families = rng.sample(QUESTION_FAMILIES, len(QUESTION_FAMILIES))
    items: list[VQAItem] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < cfg.questions_per_image and attempts < 20 * max(1, cfg.questions_per_image):
        family = families[attempts % len(families)]
        attempts += 1
        q, qtype, atype, answer, wrong = _question(family, scene, rng)
        if q in seen:
            continue  # small scenes have few distinct questions per family; try another family
        seen.add(q)
        answers, confidences = _annotate(answer, atype, wrong, cfg, rng)
        items.append(VQAItem(image_id * 1000 + len(items), image_id, q, qtype, atype, answer, answers, confidences))
    return items


# ----------------------------------------------------------------------------- edits


@dataclass
class EditTurn:
    edit_type: str          # recolor | move | add | remove
    instruction: str
    source: ShapeScene
    target: ShapeScene
    input_file: str         # MagicBrush names: "<sid>-input.png" / "<sid>-output{k}.png"
    output_file: str

    @property
    def input_caption(self) -> str:
        return scene_caption(self.source)

    @property
    def output_caption(self) -> str:
        return scene_caption(self.target)


@dataclass
class EditSession:
    session_id: str
    image_id: int
    turns: list[EditTurn]


def _edit(scene: ShapeScene, cfg: WorldConfig, rng: random.Random) -> tuple[str, str, ShapeScene]:
    """One exactly specified edit: (edit_type, instruction, target scene)."""
    n = len(scene.shapes)
    free = bool(scene.free_cells())
    feasible = (["recolor"] + (["move"] if free else []) + (["add"] if free and n < cfg.max_shapes else [])
                + (["remove"] if n > cfg.min_shapes else []))
    edit_type = rng.choice(feasible)
    present = {(s.color, s.kind) for s in scene.shapes}
    if edit_type == "add":
        row, col = rng.choice(scene.free_cells())
        color, kind = rng.choice([(c, k) for c in COLORS for k in KINDS if (c, k) not in present])
        new = Shape(row, col, kind, color, rng.choice(SIZES))
        what = _noun_phrase(new, size=True, color=True, pos=False)
        where = position_phrase(row, col)
        instruction = rng.choice((f"add {what} {where}", f"put {what} {where}", f"draw {what} {where}"))
        return edit_type, instruction, scene.with_shapes(scene.shapes + (new,))
    s = rng.choice(scene.shapes)
    ref = f"the {_ref(s, scene, rng)}"
    rest = [t for t in scene.shapes if t != s]
    if edit_type == "remove":
        instruction = rng.choice((f"remove {ref}", f"delete {ref}", f"take away {ref}"))
        return edit_type, instruction, scene.with_shapes(rest)
    if edit_type == "recolor":
        # the new colour must keep (colour, kind) pairs unique so "the <colour> <kind>" stays unambiguous
        color = rng.choice([c for c in COLORS if c != s.color and (c, s.kind) not in present])
        instruction = rng.choice((f"make {ref} {color}", f"change the color of {ref} to {color}",
                                  f"turn {ref} {color}"))
        return edit_type, instruction, scene.with_shapes(rest + [dataclasses.replace(s, color=color)])
    if edit_type == "move":
        row, col = rng.choice(scene.free_cells())
        where = position_name(row, col)
        instruction = rng.choice((f"move {ref} to the {where}", f"put {ref} {position_phrase(row, col)}"))
        return edit_type, instruction, scene.with_shapes(rest + [dataclasses.replace(s, row=row, col=col)])
    raise AssertionError(edit_type)


def _edit_session(image_id: int, scene: ShapeScene, cfg: WorldConfig, rng: random.Random) -> EditSession:
    sid = str(image_id)
    n_turns = 2 if rng.random() < cfg.two_turn_fraction else 1
    turns, current = [], scene
    for k in range(1, n_turns + 1):
        edit_type, instruction, target = _edit(current, cfg, rng)
        input_file = f"{sid}-input.png" if k == 1 else f"{sid}-output{k - 1}.png"
        turns.append(EditTurn(edit_type, instruction, current, target, input_file, f"{sid}-output{k}.png"))
        current = target
    return EditSession(sid, image_id, turns)


# ----------------------------------------------------------------------------- world


@dataclass
class WorldImage:
    image_id: int
    file_name: str
    scene: ShapeScene
    captions: list[str]


@dataclass
class WorldSplit:
    name: str
    images: list[WorldImage] = field(default_factory=list)
    questions: list[VQAItem] = field(default_factory=list)
    edits: list[EditSession] = field(default_factory=list)


@dataclass
class World:
    config: WorldConfig
    splits: dict[str, WorldSplit]


def _rng(cfg: WorldConfig, split: str, index: int, purpose: str) -> random.Random:
    """An independent stream per (image, purpose): changing one knob (say questions_per_image) leaves the rest."""
    digest = hashlib.sha256(f"shapes/{cfg.seed}/{split}/{index}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _is_eval_scene(scene: ShapeScene, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}/{scene.key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _EVAL_BUCKETS == 0


def _sample_scene(cfg: WorldConfig, rng: random.Random) -> ShapeScene:
    n = rng.randint(cfg.min_shapes, cfg.max_shapes)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    pairs = rng.sample([(c, k) for c in COLORS for k in KINDS], n)   # unique (colour, kind) per scene
    shapes = [Shape(r, c, kind, color, rng.choice(SIZES)) for (r, c), (color, kind) in zip(cells, pairs)]
    return ShapeScene(rng.choice(list(BACKGROUNDS)), tuple(sorted(shapes)))


def generate_world(cfg: WorldConfig = WorldConfig()) -> World:
    splits: dict[str, WorldSplit] = {}
    for split in SPLITS:
        ws = WorldSplit(split)
        want_eval = split != "train"
        for i in range(cfg.split_size(split)):
            rng = _rng(cfg, split, i, "scene")
            scene = _sample_scene(cfg, rng)
            while _is_eval_scene(scene, cfg.seed) != want_eval:   # keeps val/test scenes out of train
                scene = _sample_scene(cfg, rng)
            image_id = _SPLIT_ID_BASE[split] + i + 1
            file_name = f"shapes_{split}_{image_id:012d}.png"
            ws.images.append(WorldImage(image_id, file_name, scene, _captions(scene, _rng(cfg, split, i, "caption"))))
            ws.questions.extend(_questions(image_id, scene, cfg, _rng(cfg, split, i, "vqa")))
            edit_rng = _rng(cfg, split, i, "edit")
            if edit_rng.random() < cfg.edit_fraction:
                ws.edits.append(_edit_session(image_id, scene, cfg, edit_rng))
        splits[split] = ws
    return World(cfg, splits)


# ----------------------------------------------------------------------------- writers


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def world_paths(root: str | os.PathLike, splits: Iterable[str] = SPLITS) -> dict[str, Path]:
    """Where ``write_world`` puts each artefact; keys like 'captions/val', 'vqa_questions/test', 'karpathy'."""
    root = Path(root)
    paths = {"world": root / "world.json", "karpathy": root / "annotations" / "dataset_shapes.json"}
    for s in splits:
        paths[f"images/{s}"] = root / "images" / s
        paths[f"captions/{s}"] = root / "annotations" / f"captions_{s}.json"
        paths[f"vqa_questions/{s}"] = root / "vqa" / f"{s}_questions.json"
        paths[f"vqa_annotations/{s}"] = root / "vqa" / f"{s}_annotations.json"
        paths[f"edit/{s}"] = root / "edit" / s
        paths[f"edit_sessions/{s}"] = root / "edit" / s / "edit_sessions.json"
        paths[f"edit_captions/{s}"] = root / "edit" / s / "global_descriptions.json"
        paths[f"edit_images/{s}"] = root / "edit" / s / "images"
    return paths


def _documents(world: World) -> Iterable[tuple[str, Callable[[], bytes]]]:
    """(relative path, bytes producer) for every file of the world except world.json."""
    cfg, size = world.config, world.config.image_size
    info = {"description": "cm3eval shapes world (synthetic, procedurally rendered)",
            "version": str(GENERATOR_VERSION), "seed": cfg.seed}
    license_ = {"id": 0, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
    karpathy: list[dict[str, Any]] = []
    pngs: dict[ShapeScene, bytes] = {}  # an edit session's input is its split image: encode it once

    def png(scene: ShapeScene) -> bytes:
        if scene not in pngs:
            pngs[scene] = _png_bytes(render(scene, size))
        return pngs[scene]

    for split, ws in world.splits.items():
        pngs.clear()
        for im in ws.images:
            yield f"images/{split}/{im.file_name}", (lambda sc=im.scene: png(sc))
        yield f"annotations/captions_{split}.json", lambda ws=ws: _json_bytes({
            "info": info, "licenses": [license_],
            "images": [{"id": im.image_id, "file_name": im.file_name, "width": size, "height": size, "license": 0}
                       for im in ws.images],
            "annotations": [{"id": im.image_id * 10 + k, "image_id": im.image_id, "caption": c}
                            for im in ws.images for k, c in enumerate(im.captions)]})
        for im in ws.images:
            imgid = len(karpathy)
            karpathy.append({
                "filepath": split, "filename": im.file_name, "imgid": imgid, "split": split, "cocoid": im.image_id,
                "sentids": [im.image_id * 10 + k for k in range(len(im.captions))],
                "sentences": [{"raw": c, "tokens": caption_tokens(c), "imgid": imgid, "sentid": im.image_id * 10 + k}
                              for k, c in enumerate(im.captions)]})
        vqa_head = {"info": info, "data_type": "shapes", "data_subtype": split, "license": license_}
        yield f"vqa/{split}_questions.json", lambda ws=ws, h=vqa_head: _json_bytes({
            **h, "task_type": "Open-Ended",
            "questions": [{"image_id": q.image_id, "question": q.question, "question_id": q.question_id}
                          for q in ws.questions]})
        yield f"vqa/{split}_annotations.json", lambda ws=ws, h=vqa_head: _json_bytes({
            **h, "annotations": [{
                "question_id": q.question_id, "image_id": q.image_id, "question_type": q.question_type,
                "answer_type": q.answer_type, "multiple_choice_answer": q.answer,
                "answers": [{"answer": a, "answer_confidence": c, "answer_id": j + 1}
                            for j, (a, c) in enumerate(zip(q.answers, q.confidences))]} for q in ws.questions]})
        sessions, descriptions = {}, {}
        for es in ws.edits:
            sessions[es.session_id] = [{
                "input": t.input_file, "mask": None, "instruction": t.instruction, "output": t.output_file,
                "input_caption": t.input_caption, "output_caption": t.output_caption, "edit_type": t.edit_type}
                for t in es.turns]
            descriptions[es.session_id] = {t.input_file: t.input_caption for t in es.turns} | {
                t.output_file: t.output_caption for t in es.turns}
            base = f"edit/{split}/images/{es.session_id}"
            yield f"{base}/{es.turns[0].input_file}", (lambda sc=es.turns[0].source: png(sc))
            for t in es.turns:
                yield f"{base}/{t.output_file}", (lambda sc=t.target: _png_bytes(render(sc, size)))
        yield f"edit/{split}/edit_sessions.json", lambda d=sessions: _json_bytes(d)
        yield f"edit/{split}/global_descriptions.json", lambda d=descriptions: _json_bytes(d)
    yield "annotations/dataset_shapes.json", lambda: _json_bytes({"dataset": "shapes", "images": karpathy})
    for _, documents in EXTENSIONS.values():
        yield from documents(world, _json_bytes)


# Files of further tasks written from a world's scenes: name -> (version, documents(world, as_json)
# -> (relative path, bytes producer)...). tasks/shapes/extras.py adds its entry when the package is
# imported; world.json records the versions, so a cached world without a newer entry's files is rebuilt.
EXTENSIONS: dict[str, tuple[int, Callable[[World, Callable[[Any], bytes]], Iterable[tuple[str, Callable[[], bytes]]]]]] = {}


def _extras_version() -> dict[str, int]:
    return {name: version for name, (version, _) in sorted(EXTENSIONS.items())}


def write_world(world: World, root: str | os.PathLike) -> dict[str, Path]:
    """Write every file of ``world`` under ``root`` (world.json last) and return ``world_paths(root)``."""
    root = Path(root)
    manifest: dict[str, str] = {}
    made_dirs: set[Path] = set()
    for rel, produce in _documents(world):
        data = produce()
        path = root / rel
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        path.write_bytes(data)
        manifest[rel] = hashlib.sha256(data).hexdigest()
    content_hash = hashlib.sha256(_json_bytes(manifest)).hexdigest()
    (root / "world.json").write_bytes(_json_bytes({
        "generator_version": GENERATOR_VERSION, "extras_version": _extras_version(),
        "config": dataclasses.asdict(world.config),
        "content_hash": content_hash, "files": manifest}))
    return world_paths(root)


def _is_current(root: Path, cfg: WorldConfig, verify: bool) -> bool:
    try:
        meta = json.loads((root / "world.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator_version") != GENERATOR_VERSION or meta.get("config") != dataclasses.asdict(cfg):
        return False
    if meta.get("extras_version") != _extras_version():
        return False
    files: dict[str, str] = meta.get("files", {})
    if meta.get("content_hash") != hashlib.sha256(_json_bytes(files)).hexdigest():
        return False
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            return False
        if verify and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return True


def ensure_world(root: str | os.PathLike, cfg: WorldConfig = WorldConfig(), *, verify: bool = False
                 ) -> dict[str, Path]:
    """Materialise the world for ``cfg`` under ``root`` unless ``root/world.json`` already describes it.

    ``root`` is owned by this function: an outdated world there is replaced as a whole. A non-empty folder
    without world.json is refused rather than deleted. The new world is written beside ``root`` and renamed
    into place, so a crash or a concurrent caller never leaves a half-written world behind.
    ``verify`` re-hashes every file (otherwise presence is checked).
    """
    root = Path(root)
    if _is_current(root, cfg, verify):
        return world_paths(root)
    if root.exists() and any(root.iterdir()) and not (root / "world.json").exists():
        raise WorldFolderError(f"{root} is not empty and holds no world.json; refusing to overwrite it "
                               "(empty it, or point the cache elsewhere)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    try:
        write_world(generate_world(cfg), tmp)
        if root.exists():
            old = root.parent / f".{root.name}.old-{tag}"
            os.rename(root, old)
            shutil.rmtree(old)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root, cfg, verify=False):  # someone else won the race with a different world
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return world_paths(root)


def demo_world_root(cache_dir: str | os.PathLike) -> Path:
    """The data root of the built-in demo tasks: EVAL_WORLD in ``cache_dir/shapes``, written there on
    first use (about 1,400 files, a few seconds) and only checked afterwards (see ensure_world)."""
    root = Path(cache_dir) / "shapes"
    ensure_world(root, EVAL_WORLD)
    return root


def world_stats(world: World) -> dict[str, dict[str, int]]:
    """Counts per split (images, captions, questions, edit sessions, edit turns) for logs and docs."""
    return {s: {"images": len(ws.images), "captions": sum(len(i.captions) for i in ws.images),
                "questions": len(ws.questions), "edit_sessions": len(ws.edits),
                "edit_turns": sum(len(e.turns) for e in ws.edits)} for s, ws in world.splits.items()}


def vocabulary(world: World) -> Counter[str]:
    """Word counts over captions, questions, answers and instructions (the demo tokenizer's whole corpus)."""
    words: Counter[str] = Counter()
    for ws in world.splits.values():
        for im in ws.images:
            for c in im.captions:
                words.update(caption_tokens(c))
        for q in ws.questions:
            words.update(caption_tokens(q.question))
            for a in q.answers:
                words.update(caption_tokens(a))
        for es in ws.edits:
            for t in es.turns:
                words.update(caption_tokens(t.instruction))
    return words
