"""Per-kind prompt building: sample + in-context examples + retrieved documents -> token streams.

What a task shows the model, in the layout of the checkpoint's family (cm3leon/families.py):

  t2i      [context…] caption                       -> image codes (cond; uncond for CFG / CD-K)
  caption  [context…] image [prefix]                -> text
  vqa      [context…] image "Question: … Answer:"   -> text
  edit     [context…] instruction image             -> image codes (+ uncond, + image-only stream)
  dialog   [context…] image caption+history+question -> each candidate answer scored (not generated)
  control  [context…] condition image, caption      -> image codes (uncond keeps the condition)

The context is the retrieved documents (caption first for t2i/edit, image first for caption/vqa,
as in CM3leon's documents), then the k-shot examples. Templates are `str.format` templates over
the kind's fields ({caption}, {question}, {instruction}, {answer} in shots) and may name special
tokens by role ({eot}, {boi}, {break} ...): those encode to the family's ids, while the sample's
own text never becomes a special token. Everything here is pure: no model, only a DocumentCodec
(a tokenizer + config; images may be given as VQ codes), so layouts are testable on their own.
"""

from __future__ import annotations

from collections import Counter

import string
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from cm3leon.document import Document, DocumentCodec, Special, Text
from cm3leon.families import ROLE_PLACEHOLDERS, Family
from cm3leon.sampling import GenerationRequest, SamplingConfig

ImageLike = Image.Image | torch.Tensor
TEMPLATE_FIELD = {"t2i": "caption", "vqa": "question", "edit": "instruction", "caption": None,
                  "dialog": "question", "control": "caption"}


@dataclass
class Prompt:
    """One sample's generation request and the query text recorded in its sample line."""

    request: GenerationRequest
    text: str

    @property
    def streams(self) -> list[list[int]]:
        r = self.request
        return [s for s in (r.prompt, r.uncond_prompt, r.image_cond_prompt) if s is not None]


# ----------------------------------------------------------------------------- templates
def render(template: str, values: Mapping[str, Any]) -> str | Text:
    """`template.format(**values)`, with role placeholders ({eot} ...) kept as special tokens.

    Without a role placeholder the result is the plain formatted string, so BPE sees exactly
    what it saw before roles existed; with one, a `Text` whose string pieces are split only at
    the specials."""
    fmt = string.Formatter()
    pieces: list[str | Special] = []
    buf: list[str] = []
    for literal, name, spec, conversion in fmt.parse(template):
        buf.append(literal)
        if name is None:
            continue
        if name in ROLE_PLACEHOLDERS and name not in values:
            if spec or conversion:
                raise ValueError(f"template {template!r}: {{{name}}} names a special token and takes no format")
            pieces += ["".join(buf), Special(name)]
            buf = []
            continue
        if name not in values:
            raise ValueError(f"template {template!r}: no value for {{{name}}} (have {sorted(values)})")
        buf.append(fmt.format_field(fmt.convert_field(values[name], conversion), spec or ""))
    pieces.append("".join(buf))
    if not any(isinstance(p, Special) for p in pieces):
        return "".join(p for p in pieces if isinstance(p, str))
    return Text(tuple(p for p in pieces if not (isinstance(p, str) and p == "")))


def query_text(kind: str, template: str, sample_text: str, fields: Mapping[str, str] | None = None) -> str | Text:
    """The query's text part: the template over the sample's caption / question / instruction
    (and a dialog's `fields`: its caption and history)."""
    key = TEMPLATE_FIELD[kind]
    return render(template, {**(fields or {}), **({key: sample_text} if key else {})})


def sample_fields(kind: str, meta: Mapping[str, Any] | None) -> dict[str, str]:
    """Template fields a sample carries besides its text: a dialog round's caption and history."""
    if kind != "dialog":
        return {}
    meta = meta or {}
    return {"caption": str(meta.get("caption", "")), "history": dialog_history(meta.get("history") or [])}


def dialog_history(rounds: Sequence[tuple[str, str]], template: str = " Q: {question} A: {answer}") -> str:
    """A dialog's earlier rounds as one text: each (question, answer) through `template`, joined
    ("" before the first round, so "{caption}.{history} Q: {question} A:" reads without gaps)."""
    return "".join(template.format(question=q, answer=a) for q, a in rounds)


def shot_template(kind: str, template: str, shot_template_: str | None, family: Family) -> str:
    """An in-context example's template: the spec's, or the family's default from the query's.

    cm3leon (shot_answer_join None) keeps the harness's historic wording: "… Answer: {answer}"
    for VQA, "{prefix} {answer}" for captions; chameleon ends the user turn before the answer
    ("…{eot}{answer}"), as the query does."""
    if shot_template_ is not None:
        return shot_template_
    join = family.shot_answer_join
    if kind == "t2i":  # the answer is the image, a part of its own
        return template + (join or "")
    if kind == "caption":
        return template + (join if join is not None else (" " if template else "")) + "{answer}"
    if kind == "vqa":
        return template + (join if join is not None else " ") + "{answer}"
    raise ValueError(f"in-context examples are not supported for {kind} tasks")


def majority_answer(answers: Sequence[str], canonical: str | None = None) -> str:
    """THE majority-answer rule (training data, in-context examples): the most frequent of the
    annotators' answers; a tie goes to `canonical` (VQAv2's multiple_choice_answer) when it is among
    the tied, else to the answer given first."""
    answers = list(answers)
    if not answers:
        return canonical or ""
    counts = Counter(answers)
    best = max(counts.values())
    if canonical is not None and counts.get(canonical) == best:
        return canonical
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


# ----------------------------------------------------------------------------- context documents
def shot_documents(kind: str, template: str, shot_template_: str | None, shots: Sequence[Any],
                   images: Mapping[str, ImageLike], family: Family) -> list[Document]:
    """The k-shot examples as documents; shot J's image is images["shot:J"]."""
    if not shots:
        return []
    tmpl = shot_template(kind, template, shot_template_, family)
    out = []
    for j, shot in enumerate(shots):
        img = images.get(f"shot:{j}")
        if kind == "t2i":
            out.append(Document([render(tmpl, {"caption": shot.text, "answer": ""}), img]))
        elif kind == "caption":
            out.append(Document([img, render(tmpl, {"answer": shot.references[0]})]))
        elif kind == "vqa":
            answer = majority_answer(shot.references, (shot.meta or {}).get("multiple_choice_answer"))
            out.append(Document([img, render(tmpl, {"question": shot.text, "answer": answer})]))
    return out


def retrieved_document(kind: str, text: str | None, image: ImageLike | None) -> Document:
    """A retrieved (text, image) pair in the task's direction: caption first for t2i / edit,
    image first for caption / VQA (CM3leon's text->image and image->text documents)."""
    parts = (text, image) if kind in ("t2i", "edit") else (image, text)
    return Document([p for p in parts if p is not None])


# ----------------------------------------------------------------------------- requests
def needs_uncond(sampling: SamplingConfig) -> bool:
    """Whether the sampler will read an unconditional stream (SamplingConfig owns the rule)."""
    return sampling.needs_uncond


def build(codec: DocumentCodec, kind: str, template: str, sample_text: str, *, seed: int,
          sampling: SamplingConfig, max_new_tokens: int, image: ImageLike | None = None,
          context: Sequence[Document] = (), fields: Mapping[str, str] | None = None) -> Prompt:
    """One sample's streams in the codec's family layout, checked against the model's length."""
    text = query_text(kind, template, sample_text, fields)
    modality = "image" if kind in ("t2i", "edit", "control") else "text"
    if kind != "t2i" and image is None:
        raise ValueError(f"a {kind} prompt needs the sample's input image")
    prompt = codec.stream(kind, "cond", text=text, image=image, context=context)
    uncond = image_cond = None
    if modality == "image" and needs_uncond(sampling):
        uncond = codec.stream(kind, "uncond", text=text, image=image, context=context)
    if kind == "edit" and sampling.image_cfg_scale is not None:
        image_cond = codec.stream(kind, "image_cond", text=text, image=image, context=context)
        if image_cond is None:
            raise ValueError(f"the {codec.family.name} family has no image-conditioned editing stream")
    cfg = codec.cfg
    # the image's template: structural tokens (size, end of line / frame / image) forced at their
    # steps, -1 where a code is sampled; None = image_seq_len free codes
    structure = codec.image_structure() if modality == "image" else None
    budget = (len(structure) if structure else cfg.image_seq_len) if modality == "image" else max_new_tokens
    longest = max(len(x) for x in (prompt, uncond or [], image_cond or []))
    if longest + budget > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {budget} to generate exceeds the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    req = GenerationRequest(prompt=prompt, modality=modality, seed=seed, max_new_tokens=max_new_tokens,
                            uncond_prompt=uncond, image_cond_prompt=image_cond, structure=structure)
    return Prompt(req, str(text))


def stream_count(kind: str, sampling: SamplingConfig) -> int:
    """Rows per sample in the sampler's batch: cond, + uncond, + image-only (editing)."""
    if kind not in ("t2i", "edit", "control"):
        return 1
    return 1 + needs_uncond(sampling) + (kind == "edit" and sampling.image_cfg_scale is not None)
