"""The metric table (directions, options, required files) and the adapters over sample records.

The edit adapters are the one edit pipeline: `cm3eval score edit` on folders must give the same
numbers as a run's edit metrics on the same images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

import tasks
from cm3leon.errors import Cm3evalError
from evals import scoring
from evals.edit_folders import score_edit_folders
from evals.encoders import EncoderCache, EncoderUnavailable
from evals.metrics import fid as fid_lib
from evals.metrics.fid_resize import square_resize
from fixtures import HistogramEncoder
from tasks.spec import SpecError


def _spec(name: str, overrides: dict | None = None):
    """A private copy: the registry caches its specs, and these tests edit metric blocks."""
    return copy.deepcopy(tasks.apply_overrides(tasks.get(name), overrides or {}))


def _img(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- directions
@pytest.mark.parametrize("name, key, expected", [
    ("FID", "fid", False), ("FD-demo", "fid", False), ("FD-native", "fid", False),
    ("t2i_R@1", "rank_accuracy", True), ("t2i_R@10", "rank_accuracy", True), ("t2i_rank", "rank_accuracy", False),
    ("CLIPScore", "clip_score", True), ("accuracy", "vqa_accuracy", True),
    ("L1", "pixel_distances", False), ("L2 (MSE)", "pixel_distances", False),
    ("CLIP-I", "clip_i", True), ("DEMO-I", "clip_i", True), ("DEMO-T", "clip_t", True),
    ("CLIP-dir", "clip_dir", True), ("CLIP-img", "clip_img", True), ("DINO", "dino", True),
    *[(n, "captioning", True) for n in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")],
])
def test_every_metric_name_has_a_declared_direction(name, key, expected):
    assert scoring.METRICS[key].higher_is_better(name) is expected
    assert scoring.higher_is_better(name, key) is expected


def test_an_undeclared_name_has_no_direction():
    assert scoring.higher_is_better("my-new-metric") is None
    with pytest.raises(KeyError, match="not a declared output"):
        scoring.METRICS["rank_accuracy"].higher_is_better("t2i_mystery")  # two directions: no fallback


def test_metric_unavailable_is_exit_3():
    assert issubclass(scoring.MetricUnavailable, Cm3evalError) and scoring.MetricUnavailable.exit_code == 3


def test_check_metrics_refuses_a_bad_closed_option():
    spec = _spec("vqav2", {"metrics.vqa_accuracy": "{evaluation: legacy-2017}"})
    scoring.check_metrics(spec, "x")
    bad = _spec("vqav2")
    bad.metrics["vqa_accuracy"] = {"evaluation": "2019"}
    with pytest.raises(SpecError, match="metrics.vqa_accuracy.evaluation: '2019' is not one of current, legacy-2017"):
        scoring.check_metrics(bad, "x")


# ----------------------------------------------------------------------------- adapters over records
@pytest.fixture()
def t2i_run(tmp_path):
    data, task = tmp_path / "data", tmp_path / "task"
    (data / "img").mkdir(parents=True)
    (task / "images").mkdir(parents=True)
    records = []
    for i in range(6):
        _img(i, (48, 36)).save(data / "img" / f"{i}.png")
        _img(100 + i).save(task / "images" / f"{i}.png")
        records.append({"id": str(i), "images": {"output": f"images/{i}.png"},
                        "input": {"text": f"a picture number {i}", "image": f"img/{i}.png"}, "references": [],
                        "meta": {}})
    return records, task, data


def _cache() -> EncoderCache:
    cache = EncoderCache()
    cache.put("model", HistogramEncoder())
    return cache


def test_t2i_results_carry_their_direction(t2i_run):
    records, task, data = t2i_run
    spec = _spec("shapes-fid", {"metrics.fid.feature_space": "model",
                                                          "metrics.rank_accuracy.encoder": "model"})
    spec.metrics["clip_score"] = {"encoder": "model"}
    scored = scoring.score_task(spec, records, task_dir=task, data_root=data, encoders=_cache())
    assert set(scored.metrics) == {"FD-hist", "t2i_R@1", "t2i_R@5", "t2i_rank", "CLIPScore"}
    for name, res in scored.metrics.items():
        assert res.higher_is_better is scoring.higher_is_better(name), name
        assert res.to_json()["higher_is_better"] is res.higher_is_better
    assert scored.metrics["FD-hist"].higher_is_better is False and scored.metrics["t2i_rank"].higher_is_better is False


def test_encoder_fd_uses_the_one_square_crop(t2i_run):
    records, task, data = t2i_run
    spec = _spec("shapes-fid", {"metrics.fid.feature_space": "model",
                                                          "metrics.fid.resolution": "24"})
    del spec.metrics["rank_accuracy"]
    res = scoring.score_task(spec, records, task_dir=task, data_root=data, encoders=_cache()).metrics["FD-hist"]
    enc = HistogramEncoder()
    gen = [square_resize(Image.open(task / r["images"]["output"]).convert("RGB"), 24) for r in records]
    ref = [square_resize(Image.open(data / r["input"]["image"]).convert("RGB"), 24) for r in records]
    expected = fid_lib.compute_fid(enc.encode_image(gen).double().numpy(), enc.encode_image(ref).double().numpy(),
                                   extractor_name="hist")
    assert res.value == pytest.approx(expected.value, rel=1e-12) and res.extra["resolution"] == 24
    assert not hasattr(scoring, "_square")  # the copy in scoring is gone


def test_missing_weights_is_a_note_and_an_unavailable_key(t2i_run, tmp_path):
    records, task, data = t2i_run
    spec = _spec("coco-fid", {"metrics.fid.weights": str(tmp_path / "nowhere.pth")})
    scored = scoring.score_task(spec, records, task_dir=task, data_root=data)
    assert scored.metrics == {} and "nowhere.pth" in scored.unavailable["fid"]
    assert scored.notes[0].startswith("fid: not computed: FID needs the Inception weights")


def test_model_encoder_without_a_bundle_encoder_names_the_option(t2i_run):
    records, task, data = t2i_run
    spec = _spec("shapes-fid", {"metrics.rank_accuracy.encoder": "model"})
    del spec.metrics["fid"]
    scored = scoring.score_task(spec, records, task_dir=task, data_root=data, model_bundle=None)
    assert "metrics.rank_accuracy.encoder" in scored.unavailable["rank_accuracy"]


def test_vqa_adapter_records_the_evaluation():
    recs = [{"id": "1", "prediction": "Yes", "references": ["yes"] * 10, "meta": {}}]
    spec = _spec("vqav2")
    cur = scoring.score_task(spec, recs, task_dir=".", data_root=".").metrics["accuracy"]
    spec = tasks.apply_overrides(spec, {"metrics.vqa_accuracy": "{evaluation: legacy-2017}"})
    old = scoring.score_task(spec, recs, task_dir=".", data_root=".").metrics["accuracy"]
    assert (cur.value, cur.extra["evaluation"]) == (0.0, "current")
    assert (old.value, old.extra["evaluation"]) == (100.0, "legacy-2017")
    assert cur.higher_is_better is True


# ----------------------------------------------------------------------------- one edit pipeline
@pytest.fixture()
def edit_case(tmp_path):
    """The same edits twice: as a run's records (data root + task folder) and as score-edit folders."""
    data, task = tmp_path / "data", tmp_path / "task"
    for d in (data / "s", task / "images", tmp_path / "gen", tmp_path / "tgt", tmp_path / "src"):
        d.mkdir(parents=True)
    records, captions = [], {}
    for i in range(5):
        src, tgt, out = _img(i), _img(50 + i).resize((40, 30)), _img(90 + i, (20, 15))
        src.save(data / "s" / f"in{i}.png")
        tgt.save(data / "s" / f"out{i}.png")
        out.save(task / "images" / f"{i}.png")
        src.save(tmp_path / "src" / f"k{i}.png")
        tgt.save(tmp_path / "tgt" / f"k{i}.png")
        out.save(tmp_path / "gen" / f"k{i}.png")
        captions[f"k{i}"] = {"source": f"a red thing {i}", "target": f"a blue thing {i}"}
        records.append({"id": f"k{i}", "images": {"output": f"images/{i}.png"},
                        "input": {"text": "make it blue", "image": f"s/in{i}.png", "target": f"s/out{i}.png"},
                        "references": [f"a blue thing {i}"], "meta": {"input_caption": f"a red thing {i}"}})
    return records, task, data, tmp_path, captions


def test_score_edit_and_the_run_share_one_pipeline(edit_case):
    records, task, data, root, captions = edit_case
    spec = _spec("shapes-edit")
    spec.metrics = {"pixel_distances": {}, "clip_i": {"encoder": "model"}, "clip_img": {"encoder": "model"},
                    "clip_t": {"encoder": "model"}, "clip_dir": {"encoder": "model"}}
    run = scoring.score_task(spec, records, task_dir=task, data_root=data, encoders=_cache()).metrics
    folders, skipped, n = score_edit_folders(root / "tgt", root / "gen", root / "src", captions=captions,
                                             encoder=HistogramEncoder())
    assert n == 5 and skipped == {}
    assert set(run) == set(folders) == {"L1", "L2 (MSE)", "CLIP-I", "CLIP-img", "CLIP-T", "CLIP-dir"}
    for name in run:
        assert folders[name].value == run[name].value, name
        assert folders[name].higher_is_better is run[name].higher_is_better is scoring.higher_is_better(name)
    assert set(scoring.EDIT_METRICS) == {k for k, d in scoring.METRICS.items() if d.kinds == ("edit",)}


def test_clip_dir_without_input_captions_is_unavailable(edit_case):
    records, task, data, _, _ = edit_case
    for r in records[:2]:
        r["meta"] = {}
    spec = _spec("shapes-edit")
    spec.metrics = {"clip_dir": {"encoder": "model"}}
    scored = scoring.score_task(spec, records, task_dir=task, data_root=data, encoders=_cache())
    assert "2 samples have no input caption" in scored.unavailable["clip_dir"]


# ----------------------------------------------------------------------------- required files
def test_required_files_name_weights_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("CM3EVAL_INCEPTION_WEIGHTS", raising=False)
    (fid_req,) = scoring.required_files(_spec("coco-fid"))
    assert not fid_req.exists and fid_req.metric == "fid" and "Inception" in fid_req.what
    assert "--set metrics.fid.weights=PATH" in fid_req.how_to_get and "pt_inception" in fid_req.how_to_get
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    (req,) = scoring.required_files(_spec("coco-fid", {"metrics.fid.weights": str(w)}))
    assert req.path == w and req.exists
    # CLIP-I / CLIP-T naming no encoder is no file to check on disk, and no longer a silent pass
    # (issue 13: the run exited 3 after generating everything): the plan refuses it, naming the option
    unset = {"metrics.clip_i.encoder": None, "metrics.clip_t.encoder": None}
    with pytest.raises(scoring.MetricInputMissing, match=r"metrics\.clip_i\.encoder is not set.*clip-vit-b-32"):
        scoring.required_files(_spec("magicbrush-edit", unset))
    named = _spec("magicbrush-edit", {"metrics.clip_i.encoder": f"open_clip:ViT-B-32:{w}",
                                      "metrics.clip_t.encoder": f"open_clip:ViT-B-32:{w}",
                                      "dataset.files.descriptions": "magicbrush/test/global_descriptions.json"})
    assert [r.metric for r in scoring.required_files(named)] == ["clip_i", "clip_t", "dino"]
    demo = scoring.required_files(_spec("shapes-fid"))
    assert [r.metric for r in demo] == ["fid", "rank_accuracy"] and all(r.exists for r in demo)
    spec = _spec("shapes-edit", {"metrics.clip_i.encoder": f"open_clip:ViT-B-32:{w}x"})
    clip = [r for r in scoring.required_files(spec) if r.metric == "clip_i"]
    assert clip[0].path == tmp_path / "w.pthx" and not clip[0].exists
    stats = _spec("coco-fid", {"metrics.fid.reference_stats": "stats/ref.npz"})
    assert any(r.under_data_root and r.path.as_posix() == "stats/ref.npz" for r in scoring.required_files(stats))
    bad = _spec("shapes-edit", {"metrics.clip_i.encoder": "clip-vit"})
    with pytest.raises(EncoderUnavailable, match="not a known kind"):
        scoring.required_files(bad)


# ----------------------------------------------------------------------------- inputs known missing before the model loads
def _edit_named(**extra):
    return _spec("magicbrush-edit", {"metrics.clip_i.encoder": "demo", "metrics.clip_t.encoder": "demo", **extra})


def test_a_clip_metric_without_its_captions_file_is_refused(tmp_path):
    with pytest.raises(scoring.MetricInputMissing) as e:
        scoring.check_inputs(_edit_named())
    msg = str(e.value)
    assert "metrics.clip_t" in msg and "dataset.files.descriptions" in msg and "\n" not in msg
    assert e.value.exit_code == 2 and isinstance(e.value, Cm3evalError)
    scoring.check_inputs(_edit_named(**{"dataset.files.descriptions": "magicbrush/test/global_descriptions.json"}))
    # clip_dir reads the input captions from the same file
    spec = _edit_named(**{"dataset.files.descriptions": "d.json"})
    spec.metrics["clip_dir"] = {"encoder": "demo"}
    scoring.check_inputs(spec)
    del spec.dataset.files["descriptions"]
    spec.metrics = {"clip_dir": {"encoder": "demo"}}
    with pytest.raises(scoring.MetricInputMissing, match="metrics.clip_dir needs the input and output"):
        scoring.check_inputs(spec)


@pytest.mark.parametrize("key", ["clip_i", "clip_t", "clip_img", "clip_dir", "clip_score"])
def test_every_encoder_metric_refuses_an_unset_encoder(key):
    spec = _spec("shapes-fid" if key == "clip_score" else "shapes-edit")
    spec.metrics = {key: {"encoder": None}}
    with pytest.raises(scoring.MetricInputMissing, match=rf"metrics\.{key}\.encoder is not set.*clip-vit-b-32"):
        scoring.required_files(spec)


def test_fd_without_a_feature_space_is_refused():
    spec = _spec("shapes-fid")
    spec.metrics = {"fid": {"feature_space": None}}
    with pytest.raises(scoring.MetricInputMissing, match="metrics.fid.feature_space is not set"):
        scoring.required_files(spec)


def test_captioning_without_java_is_refused_unless_nothing_needs_it(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(scoring.MetricInputMissing, match="PTB tokenizer.*and METEOR need Java"):
        scoring.check_inputs(_spec("coco-caption"))
    python_only = _spec("coco-caption")
    python_only.metrics["captioning"] = {"tokenize": "none", "report": ["BLEU-4", "CIDEr", "ROUGE-L"]}
    scoring.check_inputs(python_only)


def test_spice_requested_without_its_jars_is_refused(monkeypatch):
    from evals.metrics import captioning

    monkeypatch.setattr(captioning, "spice_status", lambda: (False, "not installed: spice-1.0.jar missing in /x"))
    spec = _spec("coco-caption")
    spec.metrics["captioning"] = {**spec.metrics["captioning"], "spice": True}
    with pytest.raises(scoring.MetricInputMissing, match="metrics.captioning.spice is on but SPICE is not installed"):
        scoring.check_inputs(spec)


def test_the_named_clip_default_is_a_required_file_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("CM3EVAL_CLIP_WEIGHTS", raising=False)
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    spec = _spec("shapes-edit", {"metrics.clip_i.encoder": "clip-vit-b-32"})
    (req,) = [r for r in scoring.required_files(spec) if r.metric == "clip_i"]
    assert not req.exists and req.path == tmp_path / "cache" / "weights" / "open_clip_vit_b32.safetensors"
    assert "$CM3EVAL_CLIP_WEIGHTS" in req.what and "metrics.clip_i.encoder" in req.what
    assert "--set metrics.clip_i.encoder=open_clip:ViT-B-32:PATH" in req.what
