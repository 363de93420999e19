"""One sample line -> the view of its report card: texts, image grid, scores, badge.

Per kind: text-to-image shows the prompt, the reference image, then every candidate with its
rerank score, the chosen one marked: a candidate is drawn from its PNG (--save-candidates), its
thumbnail (the first samples of a run whose reranker decoded every candidate), or, for the
chosen one, the output image; any other candidate was kept only as VQ codes and is shown as
"not saved", never as another image. Editing shows input → output | target on one row;
captioning and VQA show the image beside the prediction and the references (VQA: the bare
question, not the prompt template). Retrieved documents are listed with their text, score and
thumbnail (saved for the report's first samples).
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
    retrieved: list[dict[str, Any]] = field(default_factory=list)  # {"text", "score", "figure"}


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
    for j, f in enumerate(figs):  # input → output | target: the arrow leads to what was generated
        f.reference = roles[j] in ("target", "reference")
        f.arrow_before = arrows and j > 0 and roles[j] in _GENERATED
        f.bar_before = arrows and j > 0 and f.reference
    return figs


NOT_SAVED = "not saved (run with --save-candidates)"


def _candidate(c: Any) -> tuple[str | None, float | None]:
    """(PNG path, score) of one candidate: a path, or {"image"/"path": ..., "score": ...}
    (a candidate kept only as VQ codes has no path)."""
    if isinstance(c, str):
        return c, None
    if isinstance(c, dict):
        path = next((c[k] for k in ("image", "path", "png") if isinstance(c.get(k), str)), None)
        return path, finite(c.get("score"))
    return None, None


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _t2i(s: dict[str, Any], v: SampleView, emb: ImageEmbedder, base: Path) -> None:
    v.fields.append(("prompt", cut(s.get("prompt"))))
    imgs = _images(s)
    for role, rel in imgs.items():
        if role not in _GENERATED:
            f = emb.figure(rel, base, caption=role if role == "reference" else f"{role} (reference)")
            f.reference = True
            v.figures.append(f)
    cands, scores = _list(s.get("candidates")), _list(s.get("scores"))
    thumbs, codes = _list(s.get("candidate_thumbnails")), _list((s.get("extra") or {}).get("codes"))
    n = max(len(cands), len(scores), len(thumbs), len(codes))
    chosen = next((imgs[r] for r in _EDIT_ORDER if r in _GENERATED and r in imgs), None)
    if n <= 1:  # one candidate: the output is it
        path = (_candidate(cands[0])[0] if cands else None) or chosen
        if path is not None:
            v.figures.append(emb.figure(path, base, caption="generated"))
        return
    best = s.get("best")
    for j in range(n):
        path, score = _candidate(cands[j]) if j < len(cands) else (None, None)
        if score is None and j < len(scores):
            score = finite(scores[j])
        path = path or (thumbs[j] if j < len(thumbs) and isinstance(thumbs[j], str) else None)
        winner = best == j
        path = path or (chosen if winner else None)
        cap = f"#{j} · score {fmt(score) if score is not None else '?'}" + (" ★ chosen" if winner else "")
        if path is None:
            f = Figure(cap, "", problem=NOT_SAVED)
        else:
            f = emb.figure(path, base, caption=cap, winner=winner)
        f.winner = winner
        v.figures.append(f)
    saved = sum(f.uri is not None for f in v.figures if not f.reference)
    if saved < n:
        v.grid_note = (f"{n} candidates generated, {saved} shown as images; the others were kept only as VQ "
                       "codes in the sample line (run with --save-candidates to save every candidate)")


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
        question = (s.get("input") or {}).get("text") if isinstance(s.get("input"), dict) else None
        v.fields += [("question", cut(question or s.get("prompt"))), ("answer", cut(pred))]
        meta = s.get("meta") if isinstance(s.get("meta"), dict) else {}
        kinds = [f"{k.replace('_', ' ')} {meta[k]}" for k in ("question_type", "answer_type") if meta.get(k)]
        if kinds:
            v.fields.append(("type", " · ".join(kinds)))
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
    v.retrieved = [_document(d, emb, base) for d in _list(s.get("retrieved"))]
    return v


def _document(d: Any, emb: ImageEmbedder, base: Path) -> dict[str, Any]:
    """A retrieved document: its text, retrieval score and thumbnail (or why there is none)."""
    if not isinstance(d, dict):
        return {"text": cut(_ref_text(d), 300), "score": "", "figure": None, "note": ""}
    thumb = d.get("thumbnail")
    fig = emb.figure(thumb, base, caption=str(d.get("id") or "")) if isinstance(thumb, str) else None
    note = "" if fig is not None or not d.get("image") else f"image {d['image']} (thumbnail not saved)"
    score = finite(d.get("score"))
    return {"text": cut(_ref_text(d), 300), "score": fmt(score) if score is not None else "", "figure": fig,
            "note": note}
