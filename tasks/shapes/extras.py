"""The demo world's files for the dialog, paragraph and text-rendering tasks, in the official
layouts of VisDial v1.0, the Stanford paragraphs and MARIO-Eval (structure-guided generation reads
the world's COCO captions and images as they are).

All of it is built from the test split alone (the demo model never trained on these layouts):

  dialog/visdial_1.0_test.json              VisDial layout: one dialog per image over its VQA
  dialog/visdial_1.0_test_dense_annotations.json   questions; 100 answer options per round
  paragraphs/paragraphs_v1.json, paragraphs/{train,val,test}_split.json
  MARIOEval/ShapesText/ShapesText.txt       prompts asking for quoted words in the image
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Iterable

from .world import (COLORS, EXTENSIONS, KINDS, NUMBER_WORDS, PLURALS, SIZES, ShapeScene, World, position_name,
                    position_phrase)

EXTRAS_VERSION = 1  # world.json records it (world.EXTENSIONS): a cached world without these files is rebuilt
N_DIALOGS = 8  # test images with a dialog (their 5 questions are the rounds)
N_OPTIONS = 100


def _norm(answer: str) -> str:
    return answer.strip().lower().rstrip(".").removeprefix("the ")


def _answer_pool() -> list[str]:
    """Every canonical answer of the world's question families, then distractor phrases."""
    pool = ["yes", "no", *COLORS, *KINDS, *NUMBER_WORDS[:5], *[str(i) for i in range(5)],
            *sorted({position_name(r, c) for r in range(3) for c in range(3)})]
    pool += [f"{c} {k}" for c in COLORS for k in KINDS]
    pool += [f"{s} {k}" for s in SIZES for k in KINDS]
    pool += [f"{n} {PLURALS[k]}" for n in NUMBER_WORDS[2:5] for k in KINDS]
    pool += [f"a {k} {position_phrase(r, c)}" for k in KINDS for r in range(3) for c in range(3)]
    return list(dict.fromkeys(pool))


def _dialogs(world: World) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ws = world.splits["test"]
    by_image: dict[int, list] = {}
    for q in ws.questions:
        by_image.setdefault(q.image_id, []).append(q)
    pool = _answer_pool()
    questions: list[str] = []
    answers: list[str] = list(pool)
    dialogs, dense = [], []

    def index(table: list[str], text: str) -> int:
        if text not in table:
            table.append(text)
        return table.index(text)

    for im in ws.images[:N_DIALOGS]:
        rng = random.Random(f"dialog/{world.config.seed}/{im.image_id}")
        rounds = []
        for r, q in enumerate(by_image.get(im.image_id, []), start=1):
            gt = _norm(q.answer)
            index(answers, gt)
            options = [gt] + rng.sample([a for a in pool if a != gt], N_OPTIONS - 1)
            rng.shuffle(options)
            rounds.append({"question": index(questions, q.question.rstrip("?")), "answer": index(answers, gt),
                           "answer_options": [index(answers, o) for o in options], "gt_index": options.index(gt)})
            if r == 1 + im.image_id % max(1, len(by_image[im.image_id])):  # the densely annotated round
                votes = Counter(_norm(a) for a in q.answers)
                dense.append({"image_id": im.image_id, "round_id": r,
                              "gt_relevance": [votes.get(o, 0) / len(q.answers) for o in options]})
        dialogs.append({"image_id": im.image_id, "caption": im.captions[0], "dialog": rounds})
    data = {"version": "1.0", "split": "test", "data": {"dialogs": dialogs, "questions": questions, "answers": answers}}
    return data, dense


def scene_paragraph(scene: ShapeScene) -> str:
    """A paragraph about a scene: one sentence per shape, then the background."""
    sentences = [f"There is a {s.size} {s.color} {s.kind} {position_phrase(s.row, s.col)}." for s in scene.shapes]
    sentences.append(f"The background is {scene.background}.")
    return " ".join(sentences)


def _paragraphs(world: World) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    items, splits = [], {}
    for split, ws in world.splits.items():
        splits[split] = [im.image_id for im in ws.images]
        items += [{"url": f"https://shapes.invalid/{split}/{im.file_name}", "image_id": im.image_id,
                   "paragraph": scene_paragraph(im.scene)} for im in ws.images]
    return items, splits


WORDS = ("red", "blue", "circle", "square", "stop", "open", "shapes", "hello")


def _text_prompts() -> str:
    """MARIO-Eval style prompts: the words to draw in single quotes."""
    lines = [f"a sign that says '{w}'" for w in WORDS]
    return "\n".join(lines) + "\n"


def extra_documents(world: World, as_json: Callable[[Any], bytes]) -> Iterable[tuple[str, Callable[[], bytes]]]:
    """(relative path, bytes producer) for the files above."""
    if "test" not in world.splits:
        return
    dialogs, dense = _dialogs(world)
    yield "dialog/visdial_1.0_test.json", lambda: as_json(dialogs)
    yield "dialog/visdial_1.0_test_dense_annotations.json", lambda: as_json(dense)
    items, splits = _paragraphs(world)
    yield "paragraphs/paragraphs_v1.json", lambda: as_json(items)
    for split, ids in splits.items():
        yield f"paragraphs/{split}_split.json", lambda ids=ids: as_json(ids)
    yield "MARIOEval/ShapesText/ShapesText.txt", lambda: _text_prompts().encode()


EXTENSIONS["dialog-paragraph-text"] = (EXTRAS_VERSION, extra_documents)
