"""Text-rendering OCR metrics and Canny edge F1 against the reference code itself:
TextDiffuser's ocr_eval.py (MIT) and ControlNet++'s eval_edge.py (Apache-2.0), vendored under
tests/data/reference/. The OCR engine is the real Tesseract reading text drawn with a real font."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from evals.metrics import ocr
from evals.metrics.edges import canny_edges, edge_f1, square
from tasks.more_loaders import quoted_words

REFERENCE = Path(__file__).parent / "data" / "reference"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")  # Debian fonts-dejavu-core
METHODS = ("stablediffusion", "textdiffuser", "controlnet", "deepfloyd")  # the reference's result table

needs_tesseract = pytest.mark.skipif(ocr.engine_problem() is not None,
                                     reason=f"Tesseract: {ocr.engine_problem()} (scripts/install-system-deps.sh)")


def drawn(lines: list[str], size: tuple[int, int] = (640, 320)) -> Image.Image:
    if not FONT.is_file():
        pytest.skip(f"{FONT} missing: apt-get install fonts-dejavu-core (scripts/install-system-deps.sh)")
    im = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(im), ImageFont.truetype(str(FONT), 60)
    for i, text in enumerate(lines):
        draw.text((30, 30 + 110 * i), text, fill="black", font=font)
    return im


def run_ocr_eval(tmp: Path, prompts: list[str], ocr_words: list[list[str]]) -> dict:
    """TextDiffuser's ocr_eval.py as released, its two hard-coded folders pointed at files written
    in its layout (MARIOEval/<subset>/<subset>.txt; ocr_result/<method>_<subset>_<prompt>_<image>)."""
    subset = tmp / "MARIOEval" / "LAIONEval4000"
    subset.mkdir(parents=True)
    (subset / "LAIONEval4000.txt").write_text("\n".join(prompts) + "\n")
    results = tmp / "ocr_result"
    results.mkdir()
    for method in METHODS:
        for i, words in enumerate(ocr_words):
            (results / f"{method}_LAIONEval4000_{i}_0").write_text("".join(w + "\n" for w in words))
    source = (REFERENCE / "textdiffuser" / "ocr_eval.py").read_text()
    source = source.replace("/path/to/MARIOEval", str(tmp / "MARIOEval"))
    source = source.replace("/path/to/MaskTextSpotterV3/tools/ocr_result", str(results))
    namespace: dict = {"__name__": "ocr_eval"}
    exec(compile(source, "ocr_eval.py", "exec"), namespace)
    return namespace["results"]["textdiffuser"]


@needs_tesseract
def test_tesseract_reads_rendered_words_and_the_metrics_equal_textdiffusers(tmp_path):
    prompts = ["a sign that says 'Hello World'", "a poster with the words 'open late'",
               "a shop front with 'Coffee'", "a blank wall that says 'nothing here'"]
    images = [drawn(["HELLO", "WORLD"]), drawn(["OPEN"]), drawn(["COFFEE", "SHOP"]), Image.new("RGB", (640, 320),
                                                                                                "white")]
    words = [ocr.read_words(im) for im in images]
    assert [w.lower() for w in words[0]] == ["hello", "world"] and [w.lower() for w in words[1]] == ["open"]
    assert words[3] == []  # a blank image reads as nothing
    targets = [quoted_words(p) for p in prompts]
    assert targets[0] == ["hello", "world"]
    # what the engine read gives the expected per-image precision / recall / accuracy
    assert ocr.word_scores(words[0], targets[0]) == pytest.approx((1, 1, 1))
    assert ocr.word_scores(words[1], targets[1]) == pytest.approx((1, 0.5, 0))
    assert ocr.word_scores(words[2], targets[2]) == pytest.approx((0.5, 1, 0))
    assert ocr.word_scores(words[3], targets[3]) == pytest.approx((0, 0, 0))
    got = ocr.ocr_metrics(words, targets, engine=ocr.engine_version())
    want = run_ocr_eval(tmp_path, prompts, words)
    for ours, theirs in (("OCR_precision", "p"), ("OCR_recall", "r"), ("OCR_F1", "f"), ("OCR_accuracy", "acc")):
        assert got[ours].value == pytest.approx(100 * want[theirs], abs=1e-6), ours
    assert got["OCR_precision"].extra["engine"].startswith("tesseract 5") or "tesseract" in got["OCR_F1"].extra["engine"]


@needs_tesseract
def test_a_blank_image_scores_zero():
    words = [ocr.read_words(Image.new("RGB", (256, 256), "white"))]
    got = ocr.ocr_metrics(words, [["stop"]])
    assert all(r.value == 0 for r in got.values())


def load_eval_edge():
    spec = importlib.util.spec_from_file_location("eval_edge", REFERENCE / "controlnet-plus-plus" / "eval_edge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def photo(seed: int, size: int) -> Image.Image:
    """Blocks and a disc: edges in known places."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.integers(0, size - 60, 2)
        d.rectangle([int(x), int(y), int(x) + 50, int(y) + 40], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    d.ellipse([40, 40, 130, 130], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def test_edge_f1_equals_controlnet_plus_plus(tmp_path):
    pytest.importorskip("einops")
    from kornia.filters import canny
    import torchvision.transforms.functional as F

    side = 176  # the smallest size ControlNet++'s MS-SSIM (5 scales, 11 px window) accepts, for speed
    sources = [photo(s, 240) for s in range(3)]
    generated = [square(sources[0], side), photo(7, side), Image.new("RGB", (side, side), "gray")]
    # the condition exactly as ControlNet++'s eval.py makes it from the (square) source
    cond = [F.to_pil_image(canny(F.pil_to_tensor(square(s, side)).unsqueeze(0) / 255.0, 0.1, 0.2)[1].squeeze(0), "L")
            for s in sources]
    assert [np.asarray(c).tolist() for c in cond] == [np.asarray(canny_edges(square(s, side))).tolist()
                                                       for s in sources]
    anno, imgs = tmp_path / "annotations", tmp_path / "images"
    anno.mkdir()
    for i, (c, g) in enumerate(zip(cond, generated)):
        c.save(anno / f"{i}.png")
        for group in range(4):  # ControlNet++ scores 4 generations per condition; one here, 4 copies
            (imgs / f"group_{group}").mkdir(parents=True, exist_ok=True)
            canny_edges(g).convert("RGB").save(imgs / f"group_{group}" / f"{i}_edge.png")
    ref = load_eval_edge()
    from torchmetrics.classification import BinaryF1Score
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio

    want = []
    for i in range(3):
        args = (f"{i}.png", str(anno), str(imgs), "cpu", MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0),
                PeakSignalNoiseRatio(data_range=1.0), None, BinaryF1Score(), "canny")
        want.append(ref.eval_canny(args)["f1"])
    got = edge_f1(generated, sources)
    assert got.per_sample / 100 == pytest.approx(want, abs=1e-6)
    assert got.value == pytest.approx(100 * np.mean(want), abs=1e-4)
    assert want[0] == 1 and 0 < want[1] < 1 and want[2] == 0  # the source itself; another; no edges at all
