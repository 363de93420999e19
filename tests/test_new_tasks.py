"""visdial, image-paragraph, text-render and coco-canny2image end to end through the command line, on
fixtures in their official layouts over the vendored real COCO images (tests/task_fixtures.py):
with the demo model and with the tiny real-layout Chameleon (tests/chameleon_fixture.py). Plus the
loaders on those files and the one-line refusal when the OCR engine is missing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from evals.cli import main
from chameleon_fixture import build_chameleon
from task_fixtures import MARIO_PROMPTS, write_all_new
from tasks import registry
from tasks.loaders import DataError, load_dataset
from tasks.spec import apply_overrides

TASKS = ("visdial", "image-paragraph", "text-render", "coco-canny2image")
EXPECTED = {"visdial": ("R@1", "R@5", "R@10", "mean_rank", "MRR", "NDCG"),
            "image-paragraph": ("BLEU-4", "ROUGE-L", "CIDEr"),
            "text-render": ("OCR_precision", "OCR_recall", "OCR_F1", "OCR_accuracy", "CLIPScore"),
            "coco-canny2image": ("edge_F1",)}
FAST = ["--set", "generation.max_new_tokens=12"]  # paragraphs: a short budget keeps the test quick


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_all_new(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    for var in ("CM3EVAL_INCEPTION_WEIGHTS", "CM3EVAL_DINO_WEIGHTS", "CM3EVAL_CLIP_WEIGHTS", "CM3EVAL_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)


def metrics_of(run: Path, task: str) -> dict:
    return json.loads((run / "metrics.json").read_text())["tasks"][task]["metrics"]


def assert_all_finite(run: Path) -> None:
    for task, names in EXPECTED.items():
        got = metrics_of(run, task)
        for name in names:
            assert name in got, (task, name, sorted(got))
            assert isinstance(got[name]["value"], (int, float)) and math.isfinite(got[name]["value"]), (task, name)


# ----------------------------------------------------------------------------- loaders
def test_loaders_read_the_official_layouts(data):
    dialog = load_dataset(registry.get("visdial"), data).samples
    assert len(dialog) == 20 and dialog[0].id.endswith("-1") and dialog[0].meta["history"] == []
    assert dialog[1].meta["history"] == [[dialog[0].text, dialog[0].references[0]]]
    assert all(len(s.meta["options"]) == 100 and s.meta["options"][s.meta["gt_index"]] == s.references[0]
               for s in dialog)
    assert dialog[0].text.endswith("?") and dialog[0].image.startswith("visdial/VisualDialog_val2018/VisualDialog_val2018_")
    assert sum("gt_relevance" in s.meta for s in dialog) == 2
    paras = load_dataset(registry.get("image-paragraph"), data).samples
    assert len(paras) == 3 and paras[0].image.startswith("visual-genome/VG_100K_2/") and \
        paras[0].references[0].count(".") >= 2
    mario = load_dataset(registry.get("text-render"), data).samples
    assert [s.references for s in mario[:2]] == [["stop"], ["hello", "world"]] and mario[0].text == MARIO_PROMPTS[0]
    canny = load_dataset(registry.get("coco-canny2image"), data).samples
    assert len(canny) == 3 and all(s.kind == "control" and s.image.startswith("val2017/") for s in canny)


def test_a_malformed_dialog_is_one_error_naming_the_file(data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(data / "visdial", root / "visdial")
    path = root / "visdial" / "visdial_1.0_val.json"
    top = json.loads(path.read_text())
    del top["data"]["dialogs"][0]["dialog"][3]["gt_index"]
    path.write_text(json.dumps(top))
    with pytest.raises(DataError, match=r"visdial_1.0_val.json: data.dialogs\[0\].dialog\[3\]: expected a field 'gt_index'"):
        load_dataset(registry.get("visdial"), root)
    spec = apply_overrides(registry.get("visdial"), {"dataset.files.dense": "visdial/nothing.json"})
    with pytest.raises(DataError, match="has no visdial/nothing.json"):
        load_dataset(spec, root)


# ----------------------------------------------------------------------------- the command line
def test_every_new_task_runs_with_the_demo_model(data, tmp_path, capfd):
    run = tmp_path / "demo-run"
    rc = main(["run", *TASKS, "--model", "demo", "--data-root", str(data), "--limit", "2", "--out", str(run),
               "--set", "metrics.clip_score.encoder=demo", "--set", "metrics.fid.feature_space=demo", *FAST])
    assert rc == 0, capfd.readouterr().err[-3000:]
    assert_all_finite(run)
    assert metrics_of(run, "coco-canny2image")["FD-demo"]["value"] >= 0
    assert math.isfinite(metrics_of(run, "image-paragraph")["METEOR"]["value"])
    assert metrics_of(run, "visdial")["NDCG"]["n"] == 1  # the dense round of dialog 1 is among the first 2
    ocr = metrics_of(run, "text-render")["OCR_F1"]["extra"]["engine"]
    assert ocr.startswith("tesseract ")


def test_every_new_task_runs_with_a_real_layout_chameleon(data, tmp_path_factory, capfd):
    root = tmp_path_factory.mktemp("real")
    cham = build_chameleon(root / "chameleon")
    run = root / "run"
    # the image metrics in the demo encoder's space and no Java: CLIP, Inception FID, the PTB
    # tokenizer and METEOR run in the demo test above; this one is about the Chameleon layout
    rc = main(["run", *TASKS, "--model", str(cham.hf), "--vq", str(cham.vq_dir / "vqgan.ckpt"), "--data-root", str(data),
               "--limit", "2", "--out", str(run), "--set", "metrics.clip_score.encoder=demo",
               "--set", "metrics.fid.feature_space=demo", *FAST,
               "--set", "metrics.captioning={tokenize: none, spice: false, report: [BLEU-4, CIDEr, ROUGE-L]}"])
    assert rc == 0, capfd.readouterr().err[-3000:]
    assert_all_finite(run)
    assert math.isfinite(metrics_of(run, "coco-canny2image")["FD-demo"]["value"])


def test_a_missing_ocr_engine_is_one_line_before_the_model_loads(data, tmp_path, capfd, monkeypatch):
    from cm3leon import checkpoint
    from evals.metrics import ocr

    which = shutil.which
    monkeypatch.setattr(ocr.shutil, "which", lambda name, *a, **k: None if name == "tesseract" else which(name))

    def sentinel(*args, **kwargs):
        raise AssertionError("the model was loaded before the plan refused the run")

    monkeypatch.setattr(checkpoint, "load", sentinel)
    capfd.readouterr()
    rc = main(["run", "text-render", "--model", "demo", "--data-root", str(data), "--out", str(tmp_path / "r"),
               "--set", "metrics.clip_score.encoder=demo"])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert any("metrics.ocr" in ln and "apt-get install tesseract-ocr tesseract-ocr-eng" in ln for ln in lines), err


# ----------------------------------------------------------------------------- stream layouts
def test_dialog_and_control_streams_in_the_chameleon_layout(tmp_path):
    """Chameleon: the dialog prompt is the VQA turn (image, text, <reserved08706>); control writes the
    condition image, the caption, the end of turn, then <racm3:break> for the output, and its
    unconditional stream keeps only the condition image (the prompt filtered to image tokens)."""
    import torch

    from chameleon_vocab import BOI, BOS, EOI, EOT, text_tokenizer
    from cm3leon.config import ModelConfig
    from cm3leon.document import DocumentCodec
    from cm3leon.sampling import SamplingConfig
    from tasks import prompts

    tok = text_tokenizer(tmp_path)
    codec = DocumentCodec(tok, None, ModelConfig(**tok.model_config_fields(), image_seq_len=16, max_seq_len=512,
                                                 d_model=32, n_layers=1, n_heads=2))
    codes = torch.arange(16)
    image = [BOI] + codec.codes_to_tokens(codes) + [EOI]
    meta = {"caption": "a man", "history": [["is it red?", "yes"]]}
    dialog = prompts.build(codec, "dialog", "{caption}.{history} Q: {question} A:", "what color?", seed=0,
                           sampling=SamplingConfig(greedy=True), max_new_tokens=8, image=codes,
                           fields=prompts.sample_fields("dialog", meta))
    assert dialog.text == "a man. Q: is it red? A: yes Q: what color? A:"
    assert dialog.request.prompt == [BOS] + image + tok.encode(dialog.text) + [EOT]
    control = prompts.build(codec, "control", "{caption}", "a red dog", seed=0,
                            sampling=SamplingConfig(cfg_scale=3.0), max_new_tokens=8, image=codes)
    assert control.request.prompt == [BOS] + image + tok.encode("a red dog") + [EOT, BOI]
    assert control.request.uncond_prompt == [BOS] + image + [BOI]
    assert prompts.stream_count("control", SamplingConfig(cfg_scale=3.0)) == 2


def test_the_demo_skips_ocr_with_a_plan_line_where_tesseract_is_missing(tmp_path, capfd, monkeypatch):
    """`cm3eval run demo` must run on a fresh machine: its text-render task lists OCR as
    `when_available`, so a missing engine is a plan line and the run goes on (exit 0)."""
    from evals.metrics import ocr

    which = shutil.which
    monkeypatch.setattr(ocr.shutil, "which", lambda name, *a, **k: None if name == "tesseract" else which(name))
    capfd.readouterr()
    rc = main(["run", "shapes-text-render", "--model", "demo", "--limit", "2", "--out", str(tmp_path / "r")])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "plan: shapes-text-render: metric ocr skipped: Tesseract no `tesseract` is on PATH" in err
