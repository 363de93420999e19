"""Fixtures in the official layouts of VisDial v1.0, the Stanford image paragraphs, MARIO-Eval and
COCO val2017 captions, field for field, over the vendored real COCO images and captions
(tests/data/coco-mini). The dialogs, paragraphs and prompts are written from those real captions.

  write_mini_visdial(root)     visdial/visdial_1.0_val.json (+ _dense_annotations.json),
                               visdial/VisualDialog_val2018/VisualDialog_val2018_<id:012d>.jpg
  write_mini_paragraphs(root)  paragraphs/paragraphs_v1.json, paragraphs/{train,val,test}_split.json,
                               visual-genome/VG_100K_2/<id>.jpg
  write_mini_mario(root)       MARIOEval/LAIONEval4000/LAIONEval4000.txt
  write_mini_coco_val2017(root) annotations/captions_val2017.json, val2017/<file>.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures import _put_image, coco_mini_items

QUESTIONS = ["what is in the picture", "is it daytime", "how many people are there", "what color is it",
             "is there a dog", "where is this", "is it sunny", "what is the man doing", "are there trees",
             "is this indoors"]
ANSWER_POOL = ["yes", "no", "1", "2", "3", "4", "none", "i can't tell", "white", "black", "red", "blue", "green",
               "outside", "inside", "a kitchen", "a street", "a field", "eating", "standing", "playing", "walking"]


def _answers(n: int) -> list[str]:
    """A pool of n distinct answer strings (VisDial's answers are free-form phrases)."""
    out = list(ANSWER_POOL)
    k = 0
    while len(out) < n:
        out.append(f"{ANSWER_POOL[k % len(ANSWER_POOL)]} i think {k // len(ANSWER_POOL)}")
        k += 1
    return out[:n]


def write_mini_visdial(root: Path, n_dialogs: int = 2, rounds: int = 10) -> Path:
    """visdial_1.0_val.json as released ({version, split, data: {dialogs, questions, answers}}, each
    round: question/answer indices, 100 answer_options, gt_index) and the dense annotations
    ([{image_id, round_id, gt_relevance}] for one round per image)."""
    root = Path(root)
    answers = _answers(150)
    dialogs, dense = [], []
    for d, (image_id, src, caps) in enumerate(coco_mini_items(n_dialogs)):
        _put_image(src, root / "visdial" / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg",
                   image_id)
        turns = []
        for r in range(rounds):
            gt_answer = (d * 7 + r * 3) % len(ANSWER_POOL)
            others = [a for a in range(len(answers)) if a != gt_answer][(d + r) % 40:][:99]
            options = sorted(others + [gt_answer], key=lambda a: (a * 37 + r) % 101)
            turns.append({"question": (d + r) % len(QUESTIONS), "answer": gt_answer, "answer_options": options,
                          "gt_index": options.index(gt_answer)})
        dialogs.append({"image_id": image_id, "caption": caps[0].rstrip(".").lower(), "dialog": turns})
        dense_round = 2 - d % 2  # round_id is 1-based
        rel = [0.0] * 100
        opts = turns[dense_round - 1]["answer_options"]
        rel[turns[dense_round - 1]["gt_index"]] = 1.0
        rel[(turns[dense_round - 1]["gt_index"] + 1) % 100] = 0.5
        dense.append({"image_id": image_id, "round_id": dense_round, "gt_relevance": rel})
        assert len(opts) == 100
    (root / "visdial").mkdir(parents=True, exist_ok=True)
    (root / "visdial" / "visdial_1.0_val.json").write_text(json.dumps({
        "version": "1.0", "split": "val2018",
        "data": {"dialogs": dialogs, "questions": QUESTIONS, "answers": answers}}))
    (root / "visdial" / "visdial_1.0_val_dense_annotations.json").write_text(json.dumps(dense))
    return root


def write_mini_paragraphs(root: Path, n_test: int = 3, n_train: int = 1) -> Path:
    """paragraphs_v1.json ([{url, image_id, paragraph}]) and the three split id lists; each paragraph
    is the image's real COCO captions written one after another."""
    root = Path(root)
    items, splits = [], {"train": [], "val": [], "test": []}
    for k, (image_id, src, caps) in enumerate(coco_mini_items(n_test + n_train)):
        _put_image(src, root / "visual-genome" / "VG_100K_2" / f"{image_id}.jpg", image_id)
        paragraph = " ".join(c.rstrip(".").strip().capitalize() + "." for c in caps[:4])
        items.append({"url": f"https://cs.stanford.edu/people/rak248/VG_100K_2/{image_id}.jpg",
                      "image_id": image_id, "paragraph": paragraph})
        splits["test" if k < n_test else "train"].append(image_id)
    folder = root / "paragraphs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "paragraphs_v1.json").write_text(json.dumps(items))
    for split, ids in splits.items():
        (folder / f"{split}_split.json").write_text(json.dumps(ids))
    return root


MARIO_PROMPTS = ["a sign that says 'Stop'", "'Hello World' written on a blackboard",
                 "a book cover with the title 'Deep Learning'", "a cake with 'Happy Birthday' in icing"]


def write_mini_mario(root: Path) -> Path:
    """MARIOEval/LAIONEval4000/LAIONEval4000.txt: one prompt per line, the words to render quoted."""
    folder = Path(root) / "MARIOEval" / "LAIONEval4000"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "LAIONEval4000.txt").write_text("\n".join(MARIO_PROMPTS) + "\n")
    return Path(root)


def write_mini_coco_val2017(root: Path, n: int = 3) -> Path:
    """annotations/captions_val2017.json (official layout) and val2017/<file_name>.jpg."""
    root = Path(root)
    images, anns = [], []
    for image_id, src, caps in coco_mini_items(n):
        name = f"{image_id:012d}.jpg"
        _put_image(src, root / "val2017" / name, image_id)
        images.append({"id": image_id, "file_name": name, "height": 96, "width": 96, "license": 1})
        anns += [{"id": image_id * 10 + j, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return root


def write_all_new(root: Path) -> Path:
    for write in (write_mini_visdial, write_mini_paragraphs, write_mini_mario, write_mini_coco_val2017):
        write(root)
    return Path(root)
