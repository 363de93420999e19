"""The shapes world: determinism, official file layouts, answer correctness, exact edits."""

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.shapes import (COLORS, EDIT_TYPES, KINDS, SPLITS, Shape, ShapeScene, WorldConfig, ensure_world,
                           generate_world, render, shape_mask, write_world)

SMALL = WorldConfig(seed=3, n_train=50, n_val=10, n_test=10)
# written independently of the module, so the oracles below do not reuse the code they check
CELLS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
         "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
NUMBERS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4"}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _vqa_normalise(answer: str) -> str:
    """The parts of the official VQA normaliser this world exercises: case, periods, number words, articles."""
    words = answer.lower().replace(".", " ").split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def root(world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(world, root)
    return root


def _load(path: Path):
    return json.loads(path.read_text())


def test_same_seed_gives_identical_bytes_and_other_seed_differs(root, tmp_path):
    again = tmp_path / "again"
    write_world(generate_world(SMALL), again)
    first = _hashes(root)
    assert len(first) > 100
    assert _hashes(again) == first
    other = tmp_path / "other"
    write_world(generate_world(WorldConfig(seed=4, n_train=50, n_val=10, n_test=10)), other)
    changed = {k for k, v in _hashes(other).items() if first.get(k) != v}
    assert "annotations/captions_train.json" in changed
    assert sum(k.startswith("images/train/") for k in changed) > 25  # most images differ, not just metadata


def test_split_contents_do_not_depend_on_other_split_sizes():
    bigger = generate_world(WorldConfig(seed=3, n_train=80, n_val=10, n_test=10))
    small = generate_world(SMALL)
    for split in ("val", "test"):
        assert [i.scene for i in bigger.splits[split].images] == [i.scene for i in small.splits[split].images]
    assert [i.scene for i in bigger.splits["train"].images[:50]] == [i.scene for i in small.splits["train"].images]


def test_eval_scenes_never_appear_in_train():
    w = generate_world(WorldConfig(seed=0, n_train=2000, n_val=200, n_test=200))
    train = {i.scene for i in w.splits["train"].images}
    for split in ("val", "test"):
        assert not train & {i.scene for i in w.splits[split].images}


@pytest.mark.parametrize("image_size", [48, 64])
def test_shapes_stay_in_their_cells_and_never_overlap(world, image_size):
    scenes = [i.scene for ws in world.splits.values() for i in ws.images]
    scenes += [t.target for ws in world.splits.values() for e in ws.edits for t in e.turns]
    ys, xs = np.mgrid[:image_size, :image_size]
    for scene in scenes:
        assert 1 <= len(scene.shapes) <= 3
        assert len({(s.color, s.kind) for s in scene.shapes}) == len(scene.shapes), "referents must be unique"
        assert len({(s.row, s.col) for s in scene.shapes}) == len(scene.shapes)
        total = np.zeros((image_size, image_size), int)
        for s in scene.shapes:
            m = shape_mask(s, image_size)
            assert m.sum() > 10
            cell = ((ys * 3) // image_size == s.row) & ((xs * 3) // image_size == s.col)
            assert not (m & ~cell).any(), f"{s} leaves its cell"
            total += m
        assert total.max() <= 1


def test_render_paints_exactly_the_masks():
    s = [Shape(0, 0, "circle", "red", "large"), Shape(2, 1, "cross", "blue", "small")]
    img = np.asarray(render(ShapeScene("gray", tuple(s))))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for shape in s:
        assert (img[shape_mask(shape)] == COLORS[shape.color]).all()
    background = ~(shape_mask(s[0]) | shape_mask(s[1]))
    assert (img[background] == (128, 128, 128)).all()
    large, small = shape_mask(s[0]).sum(), shape_mask(Shape(0, 0, "circle", "red", "small")).sum()
    assert large > 2 * small
    kinds = {k: shape_mask(Shape(1, 1, k, "red", "large")).tobytes() for k in KINDS}
    assert len(set(kinds.values())) == len(KINDS)


def test_coco_captions_load_with_pycocotools(root, world):
    from pycocotools.coco import COCO
    for split in SPLITS:
        coco = COCO(str(root / "annotations" / f"captions_{split}.json"))
        ids = coco.getImgIds()
        assert len(ids) == SMALL.split_size(split)
        for img_id in ids:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert len(anns) == 5 and len({a["caption"] for a in anns}) == 5
            info = coco.loadImgs(img_id)[0]
            with Image.open(root / "images" / split / info["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (info["width"], info["height"]) == (64, 64)
    # all ids are unique across splits, as in COCO
    all_ids = [i.image_id for ws in world.splits.values() for i in ws.images]
    assert len(set(all_ids)) == len(all_ids)


def test_captions_describe_the_scene(world):
    for ws in world.splits.values():
        for im in ws.images:
            first = im.captions[0]  # the fully specified caption used as the t2i prompt
            assert first.endswith(f"on a {im.scene.background} background")
            for s in im.scene.shapes:
                assert f"{s.size} {s.color} {s.kind}" in first
            for c in im.captions:
                for s in im.scene.shapes:
                    assert s.color in c or len(im.scene.shapes) == 1 and s.kind in c
                assert not {w for w in re.findall(r"[a-z]+", c) if w in COLORS} - {s.color for s in im.scene.shapes}


def test_karpathy_split_file(root):
    data = _load(root / "annotations" / "dataset_shapes.json")
    images = data["images"]
    assert Counter(i["split"] for i in images) == {"train": 50, "val": 10, "test": 10}
    assert [i["imgid"] for i in images] == list(range(len(images)))
    for i in images[::7]:
        assert (root / "images" / i["filepath"] / i["filename"]).is_file()
        coco = _load(root / "annotations" / f"captions_{i['split']}.json")
        raws = [a["caption"] for a in coco["annotations"] if a["image_id"] == i["cocoid"]]
        assert [s["raw"] for s in i["sentences"]] == raws
        for s in i["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"]) and s["imgid"] == i["imgid"]


def _oracle(question: str, shapes) -> str:
    """Answer a question from the scene alone, by parsing its text."""
    def at(pos):
        return [s for s in shapes if (s.row, s.col) == CELLS[pos]]
    if m := re.fullmatch(r"what color is the (\w+)(?: (?:on|at|in) the (.+))?\?", question):
        hits = [s for s in (at(m[2]) if m[2] else shapes) if s.kind == m[1]]
        assert len(hits) == 1, question
        return hits[0].color
    if m := re.fullmatch(r"what shape is (?:on|at|in) the (.+)\?", question):
        (hit,) = at(m[1])
        return hit.kind
    if question == "how many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(s.kind == PLURAL[m[1]] for s in shapes))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(s.color == m[1] for s in shapes))
    if m := re.fullmatch(r"where is the (?:(\w+) )?(\w+)\?", question):
        (hit,) = [s for s in shapes if s.kind == m[2] and m[1] in (None, s.color)]
        return {v: k for k, v in CELLS.items()}[(hit.row, hit.col)]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((s.color, s.kind) == (m[1], m[2]) for s in shapes) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_vqa_files_follow_vqav2_and_answers_are_true(root, world):
    types = {"what color is the": "other", "what shape is": "other", "how many": "number",
             "where is the": "other", "is there a": "yes/no"}
    n_disagree = n_variants = 0
    for split in SPLITS:
        qs = _load(root / "vqa" / f"{split}_questions.json")
        ann = _load(root / "vqa" / f"{split}_annotations.json")
        assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == ann["data_subtype"] == split
        assert {"info", "data_type", "license"} <= set(qs) & set(ann)
        assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in ann["annotations"]]
        assert len(qs["questions"]) == SMALL.split_size(split) * SMALL.questions_per_image
        scenes = {i.image_id: i.scene for i in world.splits[split].images}
        for q, a in zip(qs["questions"], ann["annotations"]):
            assert q["image_id"] == a["image_id"] and q["question_id"] // 1000 == q["image_id"]
            assert types[a["question_type"]] == a["answer_type"]
            assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
            truth = _oracle(q["question"], scenes[q["image_id"]].shapes)
            assert a["multiple_choice_answer"] == truth, q["question"]
            normalised = Counter(_vqa_normalise(x["answer"]) for x in a["answers"])
            assert normalised[truth] >= 7  # the truth keeps full VQA accuracy (needs >= 4 of 10)
            n_disagree += len(normalised) > 1
            n_variants += len({x["answer"] for x in a["answers"]}) > len(normalised)
    # the metric's normalisation and min(1, m/3) both matter on this data
    assert n_disagree > 50 and n_variants > 20


def test_vqa_families_are_balanced_and_yes_no_is_not_constant(world):
    qs = [q for ws in world.splits.values() for q in ws.questions]
    assert Counter(q.question_type for q in qs).keys() == {"what color is the", "what shape is", "how many",
                                                           "where is the", "is there a"}
    yes = sum(q.answer == "yes" for q in qs if q.answer_type == "yes/no")
    n = sum(q.answer_type == "yes/no" for q in qs)
    assert 0.3 < yes / n < 0.7
    counts = Counter(q.answer for q in qs if q.answer_type == "number")
    assert len(counts) >= 3  # not always the same number


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_edits_follow_magicbrush_layout_and_change_exactly_the_edited_shape(root, world):
    seen_types, two_turn = Counter(), 0
    for split in SPLITS:
        folder = root / "edit" / split
        sessions = _load(folder / "edit_sessions.json")
        captions = _load(folder / "global_descriptions.json")
        assert set(sessions) == {e.session_id for e in world.splits[split].edits}
        assert set(captions) == set(sessions)
        for es in world.splits[split].edits:
            turns = sessions[es.session_id]
            sid = es.session_id
            files = sorted(p.name for p in (folder / "images" / sid).iterdir())
            assert files == sorted([f"{sid}-input.png"] + [f"{sid}-output{k}.png" for k in range(1, len(turns) + 1)])
            two_turn += len(turns) > 1
            for k, (turn, t) in enumerate(zip(turns, es.turns), start=1):
                assert turn["input"] == (f"{sid}-input.png" if k == 1 else f"{sid}-output{k - 1}.png")
                assert turn["output"] == f"{sid}-output{k}.png" and turn["mask"] is None
                assert captions[sid][turn["input"]] == turn["input_caption"]
                assert captions[sid][turn["output"]] == turn["output_caption"]
                src = _pixels(folder / "images" / sid / turn["input"])
                dst = _pixels(folder / "images" / sid / turn["output"])
                assert (src == np.asarray(render(t.source))).all() and (dst == np.asarray(render(t.target))).all()
                if k > 1:
                    assert t.source == es.turns[k - 2].target
                removed = set(t.source.shapes) - set(t.target.shapes)
                added = set(t.target.shapes) - set(t.source.shapes)
                expected = np.zeros((64, 64), bool)
                for s in removed | added:
                    expected |= shape_mask(s)
                assert ((src != dst).any(-1) == expected).all(), f"{turn['instruction']}: pixels outside the edit"
                _check_edit_semantics(turn["edit_type"], turn["instruction"], removed, added)
                seen_types[turn["edit_type"]] += 1
    assert set(seen_types) == set(EDIT_TYPES) and two_turn > 0


def _check_edit_semantics(kind: str, instruction: str, removed: set, added: set) -> None:
    where = {v: k for k, v in CELLS.items()}
    if kind == "recolor":
        (old,), (new,) = removed, added
        assert (old.row, old.col, old.kind, old.size) == (new.row, new.col, new.kind, new.size)
        assert old.color != new.color and instruction.endswith(new.color) and old.kind in instruction
    elif kind == "move":
        (old,), (new,) = removed, added
        assert (old.kind, old.color, old.size) == (new.kind, new.color, new.size)
        assert (old.row, old.col) != (new.row, new.col) and instruction.endswith(where[(new.row, new.col)])
    elif kind == "add":
        (new,) = added
        assert not removed
        assert f"{new.size} {new.color} {new.kind}" in instruction
        assert instruction.endswith(where[(new.row, new.col)])
    elif kind == "remove":
        (old,) = removed
        assert not added and instruction.endswith(old.kind)
    else:
        raise AssertionError(kind)


def test_ensure_world_writes_once_and_rewrites_when_stale(tmp_path):
    cfg = WorldConfig(seed=1, n_train=8, n_val=2, n_test=2)
    root = tmp_path / "cache" / "shapes"
    paths = ensure_world(root, cfg)
    assert paths["captions/val"].is_file() and paths["vqa_annotations/test"].is_file()
    assert paths["edit_sessions/train"].is_file() and paths["karpathy"].is_file()
    meta = root / "world.json"
    stamp = meta.stat().st_mtime_ns
    ensure_world(root, cfg)
    assert meta.stat().st_mtime_ns == stamp  # current: nothing rewritten

    before = _hashes(root)
    image = next((root / "images" / "val").iterdir())
    image.unlink()
    ensure_world(root, cfg)
    assert _hashes(root) == before  # a missing file brings the same world back

    image.write_bytes(b"corrupt")
    ensure_world(root, cfg)
    assert image.read_bytes() == b"corrupt"  # presence check only by default ...
    ensure_world(root, cfg, verify=True)
    assert _hashes(root) == before  # ... verify re-hashes and repairs

    other = WorldConfig(seed=2, n_train=8, n_val=2, n_test=2)
    ensure_world(root, other)
    assert _load(meta)["config"]["seed"] == 2 and _hashes(root) != before
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]  # no temp folders left behind


def test_ensure_world_refuses_a_foreign_folder(tmp_path):
    from cm3leon.errors import Cm3evalError

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as err:
        ensure_world(tmp_path, WorldConfig(n_train=2, n_val=1, n_test=1))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    # a user-facing error: the CLI prints it as one line naming the folder, exit 2
    assert isinstance(err.value, Cm3evalError) and err.value.exit_code == 2
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_demo_world_root_builds_the_eval_world_once_in_the_cache(tmp_path, monkeypatch):
    """The built-in demo tasks' data root: EVAL_WORLD under CACHE/shapes, written on first use only."""
    from tasks.shapes import demo_world_root
    from tasks.shapes import world as world_module

    small = WorldConfig(n_train=4, n_val=2, n_test=2)
    monkeypatch.setattr(world_module, "EVAL_WORLD", small)  # the real one writes ~1,400 files
    root = demo_world_root(tmp_path / "cache")
    assert root == tmp_path / "cache" / "shapes"
    assert _load(root / "world.json")["config"]["n_train"] == 4
    assert (root / "annotations" / "captions_val.json").is_file()
    stamp = (root / "world.json").stat().st_mtime_ns
    assert demo_world_root(tmp_path / "cache") == root
    assert (root / "world.json").stat().st_mtime_ns == stamp  # checked, not rewritten


def test_eval_world_evaluates_the_training_worlds_val_and_test_splits():
    """EVAL_WORLD only shrinks the train split: its val/test scenes are the training world's."""
    from tasks.shapes import EVAL_WORLD

    assert EVAL_WORLD.n_train < WorldConfig().n_train
    assert dataclasses.replace(EVAL_WORLD, n_train=WorldConfig().n_train) == WorldConfig()
    ev = generate_world(dataclasses.replace(EVAL_WORLD, n_val=20, n_test=20))
    tr = generate_world(dataclasses.replace(EVAL_WORLD, n_train=0, n_val=20, n_test=20))
    for split in ("val", "test"):
        assert [im.captions for im in ev.splits[split].images] == [im.captions for im in tr.splits[split].images]


def test_the_world_imports_without_the_training_code():
    """tasks.shapes re-exports the training helpers lazily: the world alone never loads cm3leon.train."""
    import subprocess
    import sys

    code = ("import sys, tasks.shapes as s; assert 'cm3leon.train' not in sys.modules; "
            "import tasks.shapes.training as t; assert s.demo_data is t.demo_data; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("bad", [dict(n_train=-1), dict(image_size=16), dict(min_shapes=3, max_shapes=2),
                                 dict(edit_fraction=1.5)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)
