"""One sample line -> the view of its report card: texts, image grid, scores, badge.

Per kind: text-to-image shows the prompt, then the reference image(s) and every candidate
whose PNG exists, the reranker's winner marked (candidates kept only as VQ codes are
counted, not drawn: decoding them needs the model); editing shows source -> edit -> target;
captioning and VQA show the image beside the prediction and the references.
Per-sample scores are shown on their metric family's scale, the one the metrics table uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports.format import family, finite, fmt
from reports.images import Figure, ImageEmbedder
from reports.persample import mean_scale, per_sample

MAX_TEXT = 2000  # characters of a prompt / prediction shown; the rest is cut
_EDIT_ORDER = ["source", "input", "generated", "output", "prediction", "edited", "target"]
_GENERATED = {"generated", "output", "prediction", "edited"}


@dataclass
class SampleView:
    index: Any
    id: str
    kind: str
    seed: Any
    failure: str
    scores_json: str
    scores_text: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    grid_note: str = ""
    refs_label: str = "references"
    refs: list[dict[str, Any]] = field(default_factory=list)
    badge: dict[str, str] | None = None
    retrieved: list[str] = field(default_factory=list)


def cut(text: Any, limit: int = MAX_TEXT) -> str:
    s = "" if text is None else (text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, default=str))
    return s if len(s) <= limit else s[:limit] + f" … [{len(s) - limit} more characters]"


def card_factors(entry: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per-sample metric -> the factor that puts its scores on the family scale of the table
    (VQA's per-sample 0..1 accuracy -> %, captioning scores x100)."""
    names: list[str] = []
    for s in samples:
        per = s.get("per_sample")
        if isinstance(per, dict):
            names += [k for k, v in per.items() if k not in names and finite(v) is not None]
    metrics = entry.get("metrics") or {}
    return {m: family(m).factor * (mean_scale(metrics.get(m) or {}, per_sample(samples, m)) or 1.0) for m in names}


def _ref_text(r: Any) -> str:
    if isinstance(r, dict):
        for k in ("answer", "caption", "text"):
            if k in r:
                return str(r[k])
    return r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, default=str)


def _refs(s: dict[str, Any]) -> list[str]:
    refs = s.get("references")
    if refs is None:
        return []
    return [_ref_text(r) for r in (refs if isinstance(refs, list) else [refs])]


def _norm(a: str) -> str:
    return " ".join(a.lower().strip().rstrip(".").split())


def _images(s: dict[str, Any]) -> dict[str, Any]:
    imgs = s.get("images")
    return imgs if isinstance(imgs, dict) else {}


def _image_row(s: dict[str, Any], emb: ImageEmbedder, base: Path, order: list[str] = (), arrows: bool = False
               ) -> list[Figure]:
    imgs = _images(s)
    roles = [r for r in order if r in imgs] + [r for r in imgs if r not in order]
    figs = [emb.figure(imgs[r], base, caption=str(r)) for r in roles]
    for j, f in enumerate(figs):
        f.arrow_before = arrows and j > 0
        f.reference = roles[j] in ("target", "reference")
    return figs


def _candidate(c: Any) -> tuple[str | None, float | None]:
    """(PNG path, score) of one candidate: a path, or {"image"/"path": ..., "score": ...}
    (a candidate kept only as VQ codes has no path)."""
    if isinstance(c, str):
        return c, None
    if isinstance(c, dict):
        path = next((c[k] for k in ("image", "path", "png") if isinstance(c.get(k), str)), None)
        return path, finite(c.get("score"))
    return None, None


def _t2i(s: dict[str, Any], v: SampleView, emb: ImageEmbedder, base: Path) -> None:
    v.fields.append(("prompt", cut(s.get("prompt"))))
    imgs = _images(s)
    refs = {r: p for r, p in imgs.items() if r not in _GENERATED}
    for role, rel in refs.items():
        f = emb.figure(rel, base, caption=f"{role} (reference)")
        f.reference = True
        v.figures.append(f)
    cands = s.get("candidates") if isinstance(s.get("candidates"), list) else []
    scores = s.get("scores") if isinstance(s.get("scores"), list) else []
    best = s.get("best")
    drawn = 0
    for i, c in enumerate(cands):
        path, score = _candidate(c)
        if score is None and i < len(scores):
            score = finite(scores[i])
        if path is None:
            continue
        winner = len(cands) > 1 and best == i
        cap = f"#{i}" + (f" · {fmt(score)}" if score is not None else "") + (" ★ reranked best" if winner else "")
        v.figures.append(emb.figure(path, base, caption=cap, winner=winner))
        drawn += 1
    if drawn == 0:  # the chosen image only (or no candidates list at all)
        for role in (r for r in imgs if r in _GENERATED):
            v.figures.append(emb.figure(imgs[role], base, caption=role + (" ★ chosen" if len(cands) > 1 else ""),
                                        winner=len(cands) > 1))
    if len(cands) > 1 and drawn < len(cands):
        v.grid_note = (f"{len(cands)} candidates generated, {drawn} saved as PNG; the others are kept as VQ codes "
                       "in the sample line (drawing them needs the model's decoder)")


def _vqa_badge(s: dict[str, Any]) -> dict[str, str] | None:
    """correct / partly / incorrect from the per-sample accuracy the metric wrote, else a rough
    stand-in: min(1, exact matches / 3) over the references (marked as estimated)."""
    per = s.get("per_sample") if isinstance(s.get("per_sample"), dict) else {}
    acc, estimated = None, True
    for k, x in per.items():
        if "acc" in str(k).lower() and finite(x) is not None:
            acc, estimated = (float(x) / 100.0 if float(x) > 1 else float(x)), False
            break
    refs = _refs(s)
    if acc is None and refs and s.get("prediction") is not None:
        pred = _norm(str(s.get("prediction")))
        acc = min(1.0, sum(_norm(r) == pred for r in refs) / 3.0)
    if acc is None:
        return None
    if acc >= 0.999:
        cls, word = "ok", "correct"
    else:
        cls, word = ("bad", "incorrect") if acc <= 0 else ("partial", "partly correct")
    return {"cls": cls, "word": f"{word} ({acc * 100:.0f}%{', estimated' if estimated else ''})"}


def build_card(s: dict[str, Any], emb: ImageEmbedder, base: Path, factors: dict[str, float]) -> SampleView:
    kind = str(s.get("kind") or "")
    per = s.get("per_sample") if isinstance(s.get("per_sample"), dict) else {}
    shown = {k: finite(x) * factors.get(k, 1.0) for k, x in per.items() if finite(x) is not None}
    v = SampleView(s.get("index"), str(s.get("id")), kind, s.get("seed"), cut(s.get("failure"), 1000),
                   json.dumps(shown, sort_keys=True), " · ".join(f"{k} {fmt(x)}" for k, x in shown.items()))
    pred = s.get("prediction")
    if kind == "t2i":
        _t2i(s, v, emb, base)
    elif kind == "vqa":
        v.figures = _image_row(s, emb, base, ["image"])
        v.fields += [("question", cut(s.get("prompt"))), ("answer", cut(pred))]
        v.badge = _vqa_badge(s)
        p = _norm(str(pred or ""))
        v.refs_label = "ground-truth answers"
        v.refs = [{"text": r, "match": bool(p) and _norm(r) == p} for r in _refs(s)]
    elif kind == "caption":
        v.figures = _image_row(s, emb, base, ["image", "source"])
        v.fields.append(("prediction", cut(pred)))
        v.refs = [{"text": cut(r, 500), "match": False} for r in _refs(s)]
    elif kind == "edit":
        v.fields.append(("instruction", cut(s.get("prompt"))))
        if pred:
            v.fields.append(("prediction", cut(pred)))
        v.figures = _image_row(s, emb, base, _EDIT_ORDER, arrows=True)
    else:
        v.fields += [("prompt", cut(s.get("prompt"))), ("prediction", cut(pred))]
        v.refs = [{"text": cut(r, 500), "match": False} for r in _refs(s)]
        v.figures = _image_row(s, emb, base)
    docs = s.get("retrieved")
    v.retrieved = [cut(_ref_text(d), 300) for d in docs] if isinstance(docs, list) else []
    return v
