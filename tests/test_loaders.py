"""Dataset loaders on fixtures in the official layouts (real COCO images and captions where the
shared data is present): sample counts, references, image paths inside the root, clear errors for
a missing root / bad JSON / missing fields / escaping paths, the shapes world, selection and shots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fixtures
import tasks
from evals.engine import attach_shots, select
from tasks.shapes import world as shapes_world
from tasks.loaders import DataError, load_dataset
from tasks.spec import apply_overrides


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_all(tmp_path_factory.mktemp("data"))


def load(name: str, root: Path, **over):
    spec = apply_overrides(tasks.get(name), over) if over else tasks.get(name)
    return spec, load_dataset(spec, root)


def test_coco_captions_t2i_and_caption(root):
    _, ds = load("coco-fid", root)  # one caption per image, 6 images
    assert len(ds.samples) == 6 and len({s.id for s in ds.samples}) == 6
    real = json.loads((fixtures.COCO_MINI / "annotations" / "captions_val2017.json").read_text()) \
        if fixtures.COCO_MINI.is_dir() else None
    for s in ds.samples:
        assert s.kind == "t2i" and s.text in s.references and (root / s.image).is_file()
        assert s.image.startswith("val2014/COCO_val2014_")
    if real:  # the captions are the real COCO ones
        caps = {a["caption"].strip() for a in real["annotations"]}
        assert all(s.text in caps for s in ds.samples)
    _, every = load("coco-fid", root, **{"dataset.one_per_image": "false"})
    assert len(every.samples) == sum(len(s.references) for s in ds.samples)
    spec = apply_overrides(tasks.get("coco-fid"), {"dataset.files.annotations": "annotations/captions_val2014.json"})
    cap = load_dataset(apply_overrides(spec, {}), root)
    assert cap.fingerprint == ds.fingerprint  # same bytes, same settings
    _, again = load("coco-fid", root, **{"seed": "1"})
    assert again.fingerprint == ds.fingerprint and [s.id for s in again.samples] == [s.id for s in ds.samples]


def test_karpathy_splits(root):
    _, test = load("coco-caption", root)
    assert len(test.samples) == 6 and all(len(s.references) >= 5 or s.references for s in test.samples)
    assert all(s.image.startswith("val2014/") and (root / s.image).is_file() for s in test.samples)
    spec = tasks.get("coco-caption")
    train = load_dataset(spec, root, support=True)
    assert len(train.samples) == 3 and all(s.image.startswith("train2014/") for s in train.samples)


def test_vqa_family(root):
    _, v = load("vqav2", root)
    assert len(v.samples) == 8 and all(len(s.references) == 10 for s in v.samples)
    s = v.samples[0]
    assert s.meta["question_type"] and s.meta["answer_type"] and (root / s.image).is_file()
    assert Path(s.image).name == f"COCO_val2014_{s.meta['image_id']:012d}.jpg"
    _, ok = load("okvqa", root)
    assert len(ok.samples) == 3
    _, vw = load("vizwiz", root)
    assert [s.id for s in vw.samples][:2] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert all((root / s.image).is_file() and len(s.references) == 10 for s in vw.samples)
    _, tv = load("textvqa", root)
    assert len(tv.samples) == 3 and all((root / s.image).is_file() for s in tv.samples)
    assert all(s.image.startswith("textvqa/train_images/") for s in tv.samples)


def test_magicbrush_turns(root):
    _, mb = load("magicbrush-edit", root, **{"dataset.files.descriptions": "magicbrush/test/global_descriptions.json"})
    ids = [s.id for s in mb.samples]
    assert len(ids) == 4 and sum(i.endswith("-2") for i in ids) == 1
    two = next(s for s in mb.samples if s.id.endswith("-2"))
    assert two.image.endswith("-output1.png") and two.target.endswith("-output2.png")  # turn 2 starts from output 1
    for s in mb.samples:
        assert (root / s.image).is_file() and (root / s.target).is_file()
        assert s.references and s.references[0].endswith(f"(edited {s.meta['turn']})")
    _, plain = load("magicbrush-edit", root)
    assert all(s.references == [] for s in plain.samples)


def test_missing_root_and_files_are_one_clear_error(tmp_path, root):
    with pytest.raises(DataError) as e:
        load("coco-caption", tmp_path / "nowhere")
    msg = str(e.value)
    assert msg.startswith(f"coco-caption: data root {tmp_path / 'nowhere'} does not exist; expected layout:")
    assert "annotations/dataset_coco.json" in msg and "\n" not in msg
    with pytest.raises(DataError, match=rf"coco-caption: data root {tmp_path} has no annotations/dataset_coco.json; "
                                        "expected layout: .*Karpathy"):
        load("coco-caption", tmp_path)


def _vqa_root(tmp_path, root, mutate) -> Path:
    dst = fixtures.copy_tree(root / "annotations", tmp_path / "annotations")
    q = dst / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(q.read_text())
    mutate(data)
    q.write_text(json.dumps(data))
    return tmp_path


def test_annotation_errors_name_file_and_entry(tmp_path, root):
    bad = tmp_path / "bad"
    fixtures.copy_tree(root / "annotations", bad / "annotations")
    (bad / "annotations" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    with pytest.raises(DataError, match=r"vqav2: .*v2_mscoco_val2014_annotations.json: not valid JSON"):
        load("vqav2", bad)

    def drop_question(d):
        del d["questions"][1]["question"]
    r = _vqa_root(tmp_path / "a", root, drop_question)
    with pytest.raises(DataError, match=r"questions\[1\]: expected a field 'question' of type str"):
        load("vqav2", r)


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "..\\..\\x.png", "C:/x.png"])
def test_paths_in_annotations_cannot_escape_the_root(tmp_path, evil):
    fixtures.write_mini_vizwiz(tmp_path)
    f = tmp_path / "vizwiz" / "Annotations" / "val.json"
    data = json.loads(f.read_text())
    data[2]["image"] = evil
    f.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"vizwiz: \[2\]\.image: unsafe path"):
        load("vizwiz", tmp_path)


def test_shapes_world_layouts(tmp_path):
    world = shapes_world.generate_world(shapes_world.WorldConfig(n_train=12, n_val=4, n_test=6))
    shapes_world.write_world(world, tmp_path)
    counts = {}
    for name in ("shapes-fid", "shapes-caption", "shapes-vqa", "shapes-edit"):
        spec, ds = load(name, tmp_path)
        counts[name] = len(ds.samples)
        for s in ds.samples:
            assert (tmp_path / s.image).is_file()
            if s.target:
                assert (tmp_path / s.target).is_file() and s.references  # descriptions give CLIP-T text
    assert counts["shapes-fid"] == counts["shapes-caption"] == 6
    assert counts["shapes-vqa"] == 6 * world.config.questions_per_image
    support = load_dataset(tasks.get("shapes-vqa"), tmp_path, support=True)
    assert len(support.samples) == 12 * world.config.questions_per_image


def test_selection_prefix_and_shots_are_deterministic(root):
    spec = apply_overrides(tasks.get("vqav2"), {"dataset.shuffle": "true", "prompt.k_shot": "2"})
    ds = load_dataset(spec, root)
    five = select(ds, apply_overrides(spec, {"limit": "5"}))
    three = select(ds, apply_overrides(spec, {"limit": "3"}))
    assert [s.id for s in three] == [s.id for s in five[:3]]  # --limit takes a prefix: resumable
    assert [s.seed for s in three] == [s.seed for s in five[:3]]
    assert [s.id for s in five] != sorted(s.id for s in five) or len(five) < 3  # shuffled
    support = load_dataset(spec, root, support=True).samples
    attach_shots(five, support, spec)
    again = select(ds, apply_overrides(spec, {"limit": "5"}))
    attach_shots(again, support, spec)
    assert [[x.id for x in s.shots] for s in five] == [[x.id for x in s.shots] for s in again]
    assert all(len(s.shots) == 2 and s.id not in [x.id for x in s.shots] for s in five)


# ----------------------------------------------------------------------------- data roots, symlinks, duplicates
def _coco_copy(root: Path, dst: Path) -> Path:
    """A copy of the COCO fixture's val2014 captions and images (files, not links)."""
    fixtures.copy_tree(root / "val2014", dst / "val2014")
    (dst / "annotations").mkdir(parents=True)
    src = root / "annotations" / "captions_val2014.json"
    (dst / "annotations" / "captions_val2014.json").write_bytes(src.read_bytes())
    return dst


def test_symlinks_are_resolved_before_the_root_check(tmp_path, root):
    from tasks.images import ImageError, open_image

    data = _coco_copy(root, tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    first = sorted((data / "val2014").iterdir())[0]
    secret.write_bytes(first.read_bytes())
    first.unlink()
    first.symlink_to(secret)  # an image inside the root that points outside it
    rel = f"val2014/{first.name}"
    with pytest.raises(ImageError, match=r"outside the data root"):
        open_image(rel, root=data)
    assert open_image(str(secret)).size  # the same file opened as what it is: fine
    # an annotation file linked from outside is refused too, naming the role
    ann = data / "annotations" / "captions_val2014.json"
    moved = outside / "captions.json"
    moved.write_bytes(ann.read_bytes())
    ann.unlink()
    ann.symlink_to(moved)
    with pytest.raises(DataError, match=r"dataset.files.annotations: .*outside the data root"):
        load("coco-fid", data)
    # a data root that is itself a link (~/data -> /mnt/data) is fine: the root is resolved too
    ann.unlink()
    ann.write_bytes(moved.read_bytes())
    (tmp_path / "link").symlink_to(data)
    _, ds = load("coco-fid", tmp_path / "link")
    assert open_image(ds.samples[1].image, root=tmp_path / "link").mode == "RGB"


def test_one_image_id_with_two_file_names_is_refused_naming_both(tmp_path, root):
    data = _coco_copy(root, tmp_path / "coco")
    ann = data / "annotations" / "captions_val2014.json"
    d = json.loads(ann.read_text())
    twin = dict(d["images"][0], file_name="other.jpg")
    d["images"].append(twin)
    d["images"].append(dict(d["images"][1]))  # the same entry twice is harmless
    ann.write_text(json.dumps(d))
    with pytest.raises(DataError) as e:
        load("coco-fid", data)
    first = d["images"][0]
    assert f"image id {first['id']} is both {first['file_name']!r} and 'other.jpg'" in str(e.value)
    fixtures.write_mini_vizwiz(tmp_path / "vw")
    f = tmp_path / "vw" / "vizwiz" / "Annotations" / "val.json"
    items = json.loads(f.read_text())
    stem = Path(items[0]["image"]).stem
    items[1]["image"] = f"{stem}.png"  # same id (file stem), another file
    f.write_text(json.dumps(items))
    with pytest.raises(DataError, match=rf"image id '{stem}' is both '{stem}.jpg' and '{stem}.png'"):
        load("vizwiz", tmp_path / "vw")


def test_resolve_data_root(tmp_path, monkeypatch):
    from tasks.cache import cache_dir
    from tasks.loaders import resolve_data_root

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CM3EVAL_DATA_ROOT", raising=False)
    vqa, shapes = tasks.get("vqav2"), tasks.get("shapes-vqa")
    assert resolve_data_root(vqa, tmp_path / "d") == tmp_path / "d"
    assert resolve_data_root(shapes, None, build=False) == tmp_path / "cache" / "shapes" == cache_dir("shapes")
    with pytest.raises(DataError, match="no data root; pass --data-root DIR"):
        resolve_data_root(vqa, None)
    monkeypatch.setenv("CM3EVAL_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(vqa, None) == tmp_path / "env"
    assert resolve_data_root(shapes, None, build=False) == tmp_path / "cache" / "shapes"  # built-in wins


def test_cache_dir_is_one_variable(monkeypatch, tmp_path):
    from tasks.cache import cache_dir

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c" and cache_dir("fid-stats") == tmp_path / "c" / "fid-stats"
    monkeypatch.delenv("CM3EVAL_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "cm3eval"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cm3eval"


def test_the_one_image_opener(tmp_path):
    from PIL import Image

    from tasks.images import ImageError, open_image

    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(tmp_path / "a.png")
    im = open_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (40, 20)
    assert open_image(tmp_path / "a.png", mode=None).mode == "RGBA"
    assert open_image("a.png", root=tmp_path, max_side=10).size == (10, 5)
    with pytest.raises(ImageError, match=r"^missing image b.png$"):
        open_image("b.png", root=tmp_path)
    fixtures.corrupt(tmp_path / "a.png") if hasattr(fixtures, "corrupt") else (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ImageError, match=r"^corrupt or unreadable image .*a.png: "):
        open_image(tmp_path / "a.png")
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the 10,000-pixel limit"):
        open_image(tmp_path / "big.png", max_pixels=10_000)
    with pytest.raises(ValueError):  # engine and scoring treat it as a per-sample data failure
        open_image("../x.png", root=tmp_path)
    from cm3leon.errors import Cm3evalError

    assert issubclass(ImageError, DataError) and issubclass(DataError, Cm3evalError)
