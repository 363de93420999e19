"""Formatting shared by every report view: numbers, metric names, directions, scales, escaping.

Nothing here reads files or renders a page; leaderboard.py, html.py, compare.py and
publish.py all format through these functions so a value looks the same everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# Spellings the metric modules might use -> the name baselines.csv uses.
_METRIC_ALIASES = {
    "fid": "FID", "fid-30k": "FID", "fid30k": "FID",
    "cider": "CIDEr", "cider-d": "CIDEr", "cider_d": "CIDEr",
    "accuracy": "accuracy", "acc": "accuracy", "vqa_accuracy": "accuracy",
    "vqa-accuracy": "accuracy", "vqa accuracy": "accuracy", "vqa_acc": "accuracy",
    "ndcg": "NDCG",
}


def canonical_metric(name: str) -> str:
    return _METRIC_ALIASES.get(str(name).strip().lower(), str(name))


def is_missing(v: Any) -> bool:
    """None, NaN and pandas' NA (without importing pandas)."""
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return type(v).__name__ in ("NAType", "NaTType")


def fmt(v: Any) -> str:
    """A number for a table cell: 4 significant digits, no scientific notation below 1e6."""
    if is_missing(v):
        return ""
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()  # numpy scalar
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def fmt_ci(lo: Any, hi: Any) -> str:
    if fmt(lo) == "" or fmt(hi) == "":
        return ""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def finite(x: Any) -> float | None:
    """x as a finite float, else None (null, NaN, inf, a string, a bool)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------- direction (recorded, never guessed)

def recorded_direction(entry: Any) -> bool | None:
    """A metrics.json metric entry's "higher_is_better"; None when the run did not record it."""
    if isinstance(entry, dict) and isinstance(entry.get("higher_is_better"), bool):
        return entry["higher_is_better"]
    return None


def direction_word(hib: bool | None) -> str:
    return {True: "higher", False: "lower", None: "unknown"}[hib]


def direction_arrow(hib: bool | None) -> str:
    return {True: "↑", False: "↓", None: "?"}[hib]


# ---------------------------------------------------------------- one scale per metric family
# The one place that decides how a metric is shown. metrics.json keeps what the metric code
# returned (pycocoevalcap's 0-1 captioning scores, VQA accuracy already in %); every view (the
# CLI table, the report, the leaderboard, compare) multiplies by `factor` and labels it with
# `unit`, so one number reads the same everywhere and beside the papers (baselines.csv).

@dataclass(frozen=True)
class Family:
    """Metrics shown together on one scale; `factor` turns the stored value into the shown one."""
    name: str
    factor: float
    scale: str
    unit: str = ""  # short label for a table column ("x100", "%"); "" when shown as stored


CAPTIONING = Family("captioning", 100.0, "pycocoevalcap scores x100 (the papers' scale)", "x100")
_FAMILIES: list[tuple[re.Pattern[str], Family]] = [
    (re.compile(r"^(BLEU-[1-4]|METEOR|ROUGE-L|CIDEr|SPICE)$"), CAPTIONING),
    (re.compile(r"^(accuracy|vqa_accuracy)$"), Family("vqa", 1.0, "VQA accuracy in % (0-100)", "%")),
    (re.compile(r"^t2i_R@\d+$"), Family("retrieval", 1.0, "recall at k in % (0-100)", "%")),
    (re.compile(r"^t2i_rank$"), Family("rank", 1.0, "mean rank of the true image (1 is best)")),
    (re.compile(r"^(FID|FD-.+|FD_.+)$"), Family("frechet", 1.0, "Frechet distance in feature space")),
    (re.compile(r"^KID$"), Family("kid", 1.0, "kernel inception distance")),
    (re.compile(r"^CLIPScore$"), Family("clipscore", 1.0, "CLIPScore = w * max(cos, 0), w as recorded")),
    (re.compile(r"^(CLIP-I|CLIP-T|CLIP-img|CLIP-dir|DINO|DEMO-I|DEMO-T)$"), Family("similarity", 1.0, "cosine similarity (-1..1)")),
    (re.compile(r"^(L1|L2 \(MSE\)|L2|MSE)$"), Family("pixel", 1.0, "pixel error on [0,1] RGB")),
]


def family(metric: str) -> Family:
    for pattern, fam in _FAMILIES:
        if pattern.match(str(metric)):
            return fam
    return Family(f"other:{metric}", 1.0, "as recorded")


def shown(metric: str, value: Any) -> float | None:
    """A stored value of `metric` on its display scale; None when it is not a finite number."""
    v = finite(value)
    return None if v is None else v * family(canonical_metric(metric)).factor


def metric_label(metric: str) -> str:
    """A column header: the metric and its scale when it is not shown as stored ("CIDEr (x100)")."""
    unit = family(canonical_metric(metric)).unit
    return f"{metric} ({unit})" if unit else str(metric)


# ---------------------------------------------------------------- escaping per output format

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_cell(x: Any) -> str:
    """Text for a Markdown table cell: HTML entities for < > &, Markdown specials backslashed,
    one line; so a run named `<img onerror=…>` or `[x](javascript:…)` stays text."""
    s = fmt(x) if not isinstance(x, str) else x
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return " ".join(s.splitlines())


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX))


def latex_cell(x: Any) -> str:
    s = fmt(x) if not isinstance(x, str) else x
    return _LATEX_RE.sub(lambda m: _LATEX[m.group(0)], " ".join(s.splitlines()))


def csv_cell(x: Any) -> Any:
    """A string that a spreadsheet would run as a formula (=, +, -, @) gets a leading quote;
    numbers and numeric strings pass unchanged."""
    if not isinstance(x, str) or not x or x[0] not in "=+-@\t\r":
        return x
    if finite(x) is not None:
        return x
    return "'" + x
