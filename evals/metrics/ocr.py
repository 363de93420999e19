"""Text rendered in images: OCR word precision, recall, F1 and sequence accuracy, as TextDiffuser's
MARIO-Eval defines them (textdiffuser/eval/ocr_eval.py), read by Tesseract.

The OCR engine reads the words of each generated image (Tesseract through pytesseract, sparse-text
page segmentation, every word it returns). Against the prompt's quoted words, per image, after
strip + lower-case: precision = matched OCR words / OCR words, recall = matched target words /
target words (a multiset match), accuracy = 1 when the sorted OCR words joined equal the sorted
target words joined. Precision, recall and accuracy are means over images; F1 is the harmonic
mean of the mean precision and mean recall (TextDiffuser's aggregate, not a mean of per-image F1).
All four are reported in percent.
"""

from __future__ import annotations

import shutil
from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import MetricUnavailable
from .result import MetricResult, bootstrap_ci

TESSERACT_CONFIG = "--psm 11"  # sparse text: words anywhere in the image, in no particular order
INSTALL_HINT = ("install Tesseract with English data (Debian/Ubuntu: apt-get install tesseract-ocr "
                "tesseract-ocr-eng) and pytesseract (pip install pytesseract)")


def engine_problem() -> str | None:
    """Why the OCR engine cannot run here (None when it can)."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return "pytesseract is not installed"
    if shutil.which("tesseract") is None:
        return "no `tesseract` is on PATH"
    return None


def engine_version() -> str:
    import pytesseract

    return f"tesseract {pytesseract.get_tesseract_version()} (pytesseract, lang eng, {TESSERACT_CONFIG})"


def read_words(image: Image.Image) -> list[str]:
    """The words Tesseract reads in an image, in its order."""
    problem = engine_problem()
    if problem is not None:
        raise MetricUnavailable(f"OCR needs Tesseract: {problem}; {INSTALL_HINT}")
    import pytesseract

    data = pytesseract.image_to_data(image.convert("RGB"), lang="eng", config=TESSERACT_CONFIG,
                                     output_type=pytesseract.Output.DICT)
    return [w.strip() for w in data["text"] if w.strip()]


def word_scores(pred: Sequence[str], target: Sequence[str]) -> tuple[float, float, float]:
    """(precision, recall, accuracy) of one image's OCR words against its target words."""
    pred = [p.strip().lower() for p in pred]
    target = [t.strip().lower() for t in target]
    matched = sum((Counter(pred) & Counter(target)).values())
    p = matched / (len(pred) + 1e-8)
    r = matched / (len(target) + 1e-8)
    acc = float("".join(sorted(pred)) == "".join(sorted(target)))
    return p, r, acc


def ocr_metrics(ocr_words: Sequence[Sequence[str]], targets: Sequence[Sequence[str]], *,
                seed: int = 0, engine: str = "") -> dict[str, MetricResult]:
    if not ocr_words:
        raise MetricUnavailable("OCR metrics need at least one generated image")
    per = np.asarray([word_scores(p, t) for p, t in zip(ocr_words, targets)], dtype=np.float64) * 100
    extra = {"engine": engine, "definition": "TextDiffuser MARIO-Eval ocr_eval.py"}
    out = {}
    for col, name in enumerate(("OCR_precision", "OCR_recall", "OCR_accuracy")):
        v = per[:, col]
        out[name] = MetricResult(name, float(v.mean()), bootstrap_ci(v, seed=seed) if len(v) > 1 else None,
                                 len(v), v, extra=dict(extra))
    p, r = per[:, 0].mean() / 100, per[:, 1].mean() / 100
    out["OCR_F1"] = MetricResult("OCR_F1", float(2 * p * r / (p + r + 1e-8) * 100), None, len(per), None,
                                 extra=dict(extra))
    return out
