"""Multimodal documents <-> token sequences, and the CM3 infilling transform.

A Document is an ordered list of parts, each a str, a `Text` (text with special tokens named by
role inside it, e.g. a template's `{eot}`), or an image (a PIL image, or a 1-D LongTensor of VQ
codes). The native layout (docs/INTERFACES.md; CM3leon puts <break> at every part boundary):

  [bos] [retrieved doc <break>]... part <break> part ... [eos]
  image part = <image> tok(c_1) ... tok(c_N) </image>

Prompt streams (conditional, unconditional, image-conditioned) for each task kind follow the
checkpoint's family (cm3leon/families.py): the codec reads the family's layout table, so the
native CM3leon layout and Chameleon/Anole's (no separator, `<reserved08706>` ends the user turn,
`<s> <racm3:break>` as the unconditional stream) come from the same code. Prompt builders return
the ids up to where generation starts.

Chameleon has no break token of its own (`<racm3:break>` begins an image), so a separator equal
to boi is never written: images are delimited by boi/eoi alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image

from . import families
from .config import ModelConfig
from .families import FILTER, Family
from .text import TextTokenizer
from .vq import VQModel, preprocess, to_pil


@dataclass(frozen=True)
class Special:
    """A special token named by its role ("eot", "boi", ...); the codec's family gives its id."""

    role: str

    def __post_init__(self) -> None:
        if self.role not in families.ROLES:
            raise ValueError(f"unknown special role {self.role!r} (known: {', '.join(families.ROLES)})")


@dataclass(frozen=True)
class Text:
    """A text part with special tokens inside (a rendered template such as "{question}{eot}").

    Plain strings are encoded as text only (never as control tokens, even if they spell one);
    only `Special` pieces become special ids, so user text cannot inject a special."""

    pieces: tuple[Union[str, Special], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", tuple(self.pieces))
        for p in self.pieces:
            if not isinstance(p, (str, Special)):
                raise TypeError(f"Text piece is a {type(p).__name__}; expected str or Special")

    def __str__(self) -> str:
        return "".join(p for p in self.pieces if isinstance(p, str))

    def __bool__(self) -> bool:
        return any(p for p in self.pieces if not isinstance(p, str) or p)


Part = Union[str, Text, Image.Image, torch.Tensor]
TextPart = Union[str, Text]


def _is_text(p: object) -> bool:
    return isinstance(p, (str, Text))


def _same_part(a: Part, b: Part) -> bool:
    if _is_text(a) or _is_text(b):
        return a == b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu().long(), b.cpu().long()))
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
    return False


@dataclass(eq=False)
class Document:
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = list(self.parts)
        for i, p in enumerate(self.parts):
            if not isinstance(p, (str, Text, Image.Image, torch.Tensor)):
                raise TypeError(f"Document part {i} is a {type(p).__name__}; expected str, Text, PIL image or "
                                "code tensor")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Document) or len(self.parts) != len(other.parts):
            return False
        return all(_same_part(a, b) for a, b in zip(self.parts, other.parts))

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def texts(self) -> list[str]:
        return [str(p) for p in self.parts if _is_text(p)]

    @property
    def images(self) -> list[Image.Image | torch.Tensor]:
        return [p for p in self.parts if not _is_text(p)]


Docs = Iterable[Document]


class DocumentCodec:
    def __init__(self, tokenizer: TextTokenizer, vq: VQModel | None, cfg: ModelConfig,
                 resolution: int | None = None, family: Family | str | None = None) -> None:
        """`family`: the checkpoint family whose layouts to write (default: detected from the
        tokenizer's vocabulary; IMGIMG image tokens mean chameleon)."""
        self.tok, self.vq, self.cfg = tokenizer, vq, cfg
        self.resolution = resolution if resolution is not None else (vq.config.resolution if vq is not None else None)
        self._check_agreement()
        self.family = families.get(family) if isinstance(family, str) else (family or families.detect(tokenizer))
        # roles come from the vocabulary's token names; the config's ids are checked against them
        self.roles = self.family.resolve_roles(tokenizer)
        self._code_to_token = cfg.image_token_id_tensor()
        self._token_to_code = cfg.token_to_code_tensor()
        boi = self.roles.get("boi", cfg.boi_id)
        self._sep = [self.role_id(r) for r in self.family.separator if self.roles.get(r, cfg.break_id) != boi]
        self._image_layout: list[list[int] | str] | None = None

    # --- the family's image layout (structural tokens around and inside the codes)
    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of codes in one image."""
        return families.grid_of(self.cfg.image_seq_len)

    def _token_id(self, name: str) -> int:
        """A role's id (boi / eoi fall back to the config's), or a token's id by its name."""
        if name in ("boi", "eoi") and name not in self.roles:
            return getattr(self.cfg, f"{name}_id")
        if name in families.ROLE_PLACEHOLDERS:
            return self.role_id(name)
        i = self.tok.token_to_id(name)
        if i is None:
            raise ValueError(f"the {self.family.name} image layout names {name!r}, which the vocabulary lacks")
        return i

    def image_layout(self) -> list[list[int] | str]:
        if self._image_layout is None:
            plain = all(el not in ("rows", "grid", "size") for el in self.family.image)
            h, w = (0, 0) if plain else self.grid
            self._image_layout = families.image_elements(self.family, self._token_id, self.tok.encode, h, w)
        return self._image_layout

    def image_tokens(self, codes: torch.Tensor | Sequence[int]) -> list[int]:
        """One image in the family's layout: boi, (size / grid), the codes (each row followed by its
        end-of-line where the family has one), (end of frame), eoi."""
        toks = self.codes_to_tokens(codes)
        w = self.grid[1] if "rows" in self.family.image else 0
        out: list[int] = []
        row = 0
        for el in self.image_layout():
            if el == "codes":
                out += toks
            elif el == "row":
                out += toks[row * w:(row + 1) * w]
                row += 1
            else:
                out += el
        return out

    def image_structure(self) -> list[int] | None:
        """The generated image's template after the prompt (which ends with the layout's head): -1
        where the sampler samples a code, else the structural token it forces at that step. None for
        the plain layout (boi, codes, eoi): image_seq_len free codes, as the sampler does by default."""
        if self.family.image == ("boi", "codes", "eoi"):
            return None
        return families.image_structure(self.image_layout(), *self.grid)

    def _wrapped_text(self, kind: str, text: TextPart) -> list[int]:
        """The query's text inside the family's wrapper for this kind (e.g. Liquid's "{text} Generate
        an image based on this description."); one string through the tokenizer where it is plain text."""
        wrap = self.family.text_wrap.get(kind)
        if not wrap:
            return self.text_ids(text)
        size = dict(width=self.resolution, height=self.resolution)
        if isinstance(text, str):
            return self.tok.encode(wrap.format(text=text, **size))
        before, after = wrap.split("{text}")
        return self.tok.encode(before.format(**size)) + self.text_ids(text) + self.tok.encode(after.format(**size))

    def _check_agreement(self) -> None:
        tok, cfg = self.tok, self.cfg
        problems = []
        if tok.vocab_size > cfg.vocab_size:
            problems.append(f"tokenizer has {tok.vocab_size} ids, model vocab_size={cfg.vocab_size}")
        if tok.image_token_ids() != cfg.image_token_id_tensor().tolist():
            problems.append("image token ids differ")
        for role, tid in tok.special_ids.items():
            if getattr(cfg, f"{role}_id") != tid:
                problems.append(f"{role}_id: tokenizer {tid}, config {getattr(cfg, f'{role}_id')}")
        if self.vq is not None:
            vc = self.vq.config
            if vc.num_embeddings != cfg.image_codebook_size:
                problems.append(f"VQ codebook {vc.num_embeddings}, config image_codebook_size={cfg.image_codebook_size}")
            if self.resolution is not None and (self.resolution // vc.downsample_factor) ** 2 != cfg.image_seq_len:
                problems.append(f"VQ gives {(self.resolution // vc.downsample_factor) ** 2} codes at "
                                f"{self.resolution}px, config image_seq_len={cfg.image_seq_len}")
        if problems:
            raise ValueError(f"tokenizer {tok.source} and ModelConfig disagree: " + "; ".join(problems))

    # --- images
    def _image_codes(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """Codes [image_seq_len] per image; PIL images go through the VQ tokenizer in one batch."""
        n, K = self.cfg.image_seq_len, self.cfg.image_codebook_size
        out: list[torch.Tensor | None] = [None] * len(images)
        pil = [i for i, im in enumerate(images) if isinstance(im, Image.Image)]
        if pil:
            if self.vq is None or self.resolution is None:
                raise ValueError("document holds a PIL image but the codec has no VQ tokenizer; pass codes instead")
            codes = self.vq.encode(preprocess([images[i] for i in pil], self.resolution)).cpu()
            for i, c in zip(pil, codes):
                out[i] = c
        for i, im in enumerate(images):
            if out[i] is not None:
                continue
            if im.is_floating_point() or im.is_complex() or im.dtype == torch.bool:
                raise ValueError(f"image part {i}: codes must be an integer tensor, got {im.dtype}")
            c = im.reshape(-1).long().cpu()
            if c.numel() != n or (im.ndim != 1 and not (im.ndim == 2 and im.shape[0] == 1)):
                raise ValueError(f"image part {i}: expected {n} codes as a 1-D tensor, got shape {tuple(im.shape)}")
            if int(c.min()) < 0 or int(c.max()) >= K:
                raise ValueError(f"image part {i}: codes must lie in [0, {K}), got [{int(c.min())}, {int(c.max())}]")
            out[i] = c
        return out  # type: ignore[return-value]

    def image_codes(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """Codes [image_seq_len] per image (PIL images through the VQ in one batch; codes checked).
        Callers that see the same image many times (VQA: several questions per image) encode once
        with this and put the codes in their Documents."""
        return self._image_codes(images)

    def codes_to_tokens(self, codes: torch.Tensor | Sequence[int]) -> list[int]:
        """VQ codes -> image token ids (no boi/eoi)."""
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1).cpu()
        K = self.cfg.image_codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):  # -1 would wrap silently
            raise ValueError(f"codes must lie in [0, {K}), got [{int(codes.min())}, {int(codes.max())}]")
        return self._code_to_token[codes].tolist()

    def decode_images(self, codes: Sequence[torch.Tensor | Sequence[int]]) -> list[Image.Image]:
        """Code sequences (e.g. the sampler's image candidates) -> PIL images."""
        if self.vq is None:
            raise ValueError("decode_images needs a VQ tokenizer; the codec was built without one")
        if not len(codes):
            return []
        batch = torch.stack([torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in codes])
        return to_pil(self.vq.decode(batch, self.grid))

    # --- sequences
    def _parts(self, parts: Sequence[Part], *, mask_text: bool = False, mask_images: bool = False) -> list[int]:
        images = [p for p in parts if not _is_text(p)]
        codes = iter(self._image_codes(images) if images and not mask_images else [])
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i:
                ids += self._sep
            if _is_text(part):
                ids += [self._mask_id()] if mask_text else self.text_ids(part)
            elif mask_images:
                ids.append(self._mask_id())
            else:
                ids += self.image_tokens(next(codes))
        return ids

    def _mask_id(self) -> int:
        if self.cfg.mask_id is None:
            raise ValueError("the model has no <mask> token (cfg.mask_id is None)")
        return self.cfg.mask_id

    def role_id(self, role: str) -> int:
        """The id of a special role in this codec's family, from the vocabulary."""
        if role not in self.roles:
            have = ", ".join(sorted(self.roles))
            raise ValueError(f"the {self.family.name} vocabulary has no {role!r} token "
                             f"({self.family.roles.get(role, 'not a role of this family')}); it has {have}")
        return self.roles[role]

    def text_ids(self, part: TextPart) -> list[int]:
        """A text part's ids: str pieces through the BPE, `Special` pieces as their role's id."""
        if isinstance(part, str):
            return self.tok.encode(part)
        ids: list[int] = []
        for piece in part.pieces:
            ids += self.tok.encode(piece) if isinstance(piece, str) else [self.role_id(piece.role)]
        return ids

    # --- the family's prompt streams
    def stream(self, kind: str, stream: str = "cond", *, text: TextPart = "",
               image: Image.Image | torch.Tensor | None = None, context: Docs = ()) -> list[int] | None:
        """One prompt stream of a task kind ("t2i", "edit", "caption", "vqa") in this family's
        layout: "cond" (the prompt), "uncond" (CFG / CD-K amateur), "image_cond" (editing's
        image-only stream). None when the family has no such stream for the kind."""
        layout = self.family.layout(kind, stream)
        if layout is None:
            return None
        if layout == FILTER:  # Meta: the full prompt filtered to bos, boi, eoi and image tokens
            full = self.stream(kind, "cond", text=text, image=image, context=context)
            keep = {self.roles.get(r) for r in ("bos", "boi", "eoi")} - {None}
            image_ids = set(self._code_to_token.tolist())
            return [t for t in full if t in keep or t in image_ids]
        ids: list[int] = []
        for slot in layout:
            if slot == "bos":
                ids += [self.roles["bos"]] if "bos" in self.roles else []
            elif slot == "context":
                for doc in context:
                    ids += self._parts(doc.parts) + self._slots(self.family.context_end)
            elif slot == "text":
                ids += self._wrapped_text(kind, text)
            elif slot == "image_head":
                ids += families.split_image(self.image_layout())[0]
            elif slot == "negative":
                ids += self.tok.encode(self.family.negative_prompt)
            elif slot.startswith("lit:"):
                ids += self.tok.encode(slot[len("lit:"):])
            elif slot == "text?":  # the text and its separator, or nothing for an empty text
                ids += self.text_ids(text) + self._sep if text else []
            elif slot == "image":
                if image is None:
                    raise ValueError(f"the {kind} {stream} stream needs an image")
                ids += self._parts([image])
            else:
                ids += self._slots((slot,))
        return ids

    def _slots(self, slots: Sequence[str]) -> list[int]:
        out: list[int] = []
        for slot in slots:
            out += self._sep if slot == "sep" else [self.role_id(slot)]
        return out

    def text_barred(self) -> list[int]:
        """Ids text decoding may not emit in this family (pass to Sampler(text_barred=...))."""
        return self.family.banned_text_ids(self.tok)

    def encode(self, doc: Document, retrieved: Docs = (), *, bos: bool = True, eos: bool = True) -> list[int]:
        """A whole document, retrieved documents first; a finished document ends with <eos>."""
        ids = [self.roles["bos"]] if bos and "bos" in self.roles else []
        for r in retrieved:
            ids += self._parts(r.parts) + self._sep
        ids += self._parts(doc.parts)
        if eos:
            ids.append(self.cfg.eos_id)
        return ids

    def prompt(self, doc: Document, output: Literal["text", "image"], retrieved: Docs = (), *,
               mask_text: bool = False, mask_images: bool = False) -> list[int]:
        """ids up to where generation of the next part starts (after <break>, plus <image> for images)."""
        if output not in ("text", "image"):
            raise ValueError(f"output must be 'text' or 'image', got {output!r}")
        ids = [self.roles["bos"]] if "bos" in self.roles else []
        for r in retrieved:
            ids += self._parts(r.parts) + self._sep
        if doc.parts:
            ids += self._parts(doc.parts, mask_text=mask_text, mask_images=mask_images) + self._sep
        if output == "image":
            ids.append(self.cfg.boi_id)
        return ids

    def text_to_image_prompt(self, caption: TextPart, retrieved: Docs = ()) -> list[int]:
        return self.stream("t2i", text=caption, context=retrieved)

    def image_to_text_prompt(self, image: Image.Image | torch.Tensor, retrieved: Docs = ()) -> list[int]:
        return self.stream("caption", image=image, context=retrieved)

    def vqa_prompt(self, image: Image.Image | torch.Tensor, question: TextPart, retrieved: Docs = ()) -> list[int]:
        return self.stream("vqa", text=question, image=image, context=retrieved)

    def edit_prompt(self, instruction: TextPart, image: Image.Image | torch.Tensor, retrieved: Docs = ()) -> list[int]:
        return self.stream("edit", text=instruction, image=image, context=retrieved)

    # Guidance streams. CM3leon's unconditional stream replaces the text with <mask>;
    # Chameleon's is `<s> <racm3:break>` (see cm3leon/families.py).
    def uncond_image_prompt(self) -> list[int]:
        """Text-to-image without its caption (cm3leon: [bos] <mask> <break> <image>)."""
        return self.stream("t2i", "uncond")

    def edit_image_cond_prompt(self, image: Image.Image | torch.Tensor) -> list[int]:
        """Editing stream that sees the source image but not the instruction."""
        return self.stream("edit", "image_cond", image=image)

    def edit_uncond_prompt(self) -> list[int]:
        """Editing stream that sees neither instruction nor source image."""
        return self.stream("edit", "uncond")

    def parse(self, ids: Sequence[int] | torch.Tensor) -> Document:
        """Token ids -> Document: text spans decoded, image spans as code tensors.

        Stops at <eos>. An image span runs from <image> over image tokens; a missing </image>
        (generation cut short) just ends it.
        """
        cfg = self.cfg
        ids = [int(t) for t in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"parse: token id {bad[0]} is outside the vocabulary of {cfg.vocab_size}")
        skip = {cfg.bos_id, cfg.pad_id, cfg.eoi_id}
        boundary = {cfg.break_id, cfg.mask_id, cfg.infill_id} - {None}
        parts: list[Part] = []
        text: list[int] = []

        def flush() -> None:
            if text:
                s = self.tok.decode(text)
                if s:
                    parts.append(s)
                text.clear()

        i = 0
        while i < len(ids):
            t = ids[i]
            if t == cfg.eos_id:
                break
            if t == cfg.boi_id:  # checked before break: Chameleon's boi is also its break
                flush()
                j = i + 1
                while j < len(ids) and self._token_to_code[ids[j]] >= 0:
                    j += 1
                parts.append(self._token_to_code[ids[i + 1:j]] if j > i + 1 else torch.zeros(0, dtype=torch.long))
                i = j + 1 if j < len(ids) and ids[j] == cfg.eoi_id else j
                continue
            if t in boundary:
                flush()
            elif t not in skip:
                text.append(t)
            i += 1
        flush()
        return Document(parts)

    def cm3_mask(self, ids: Sequence[int], rng: np.random.Generator | int, n_spans: int | None = None,
                 **kwargs) -> list[int]:
        return cm3_mask(ids, rng, n_spans, cfg=self.cfg, **kwargs)


# ----------------------------------------------------------------------------- CM3 objective


def _barriers(cfg: ModelConfig) -> set[int]:
    return {t for t in (cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.boi_id, cfg.eoi_id, cfg.break_id) if t is not None}


def cm3_mask(ids: Sequence[int], rng: np.random.Generator | int, n_spans: int | None = None, *,
             cfg: ModelConfig, rate: float = 1.0, max_spans: int = 16, max_span_len: int | None = None) -> list[int]:
    """CM3's causally-masked objective: spans move to the end of the document.

    `a b c d e <eos>` with span (b c) becomes `a <mask> d e <infill> <mask> b c <eos>`. The number
    of spans is n_spans, or Poisson(rate) clamped to [1, max_spans]; each span starts at a uniform
    maskable position and has a uniform length within its segment. Segments are the runs between
    bos/eos/pad/<break>/<image>/</image>, so a span never crosses a <break> and never takes an
    image's delimiters (it may cover codes inside one image). One <mask> token stands for CM3's
    <mask:k>: spans keep their order, so the k-th <mask> in the body is the k-th span. A sequence
    with nothing maskable comes back unchanged. Deterministic given rng (a numpy Generator or seed).
    """
    if cfg.mask_id is None or cfg.infill_id is None:
        raise ValueError("the CM3 objective needs <mask> and <infill> tokens (cfg.mask_id / cfg.infill_id)")
    ids = [int(t) for t in ids]
    if cfg.mask_id in ids or cfg.infill_id in ids:
        raise ValueError("cm3_mask: the sequence already holds <mask> or <infill> tokens")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    barriers = _barriers(cfg)
    seg_end = [0] * len(ids)  # exclusive end of the segment holding each maskable position
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] not in barriers:
            seg_end[i] = seg_end[i + 1] if i + 1 < len(ids) and ids[i + 1] not in barriers else i + 1
    positions = [i for i, t in enumerate(ids) if t not in barriers]
    if not positions:
        return ids
    n = n_spans if n_spans is not None else int(np.clip(rng.poisson(rate), 1, max_spans))
    taken = np.zeros(len(ids), dtype=bool)
    spans: list[tuple[int, int]] = []
    for _ in range(20 * n):  # rejection sampling of non-overlapping spans
        if len(spans) == n:
            break
        start = positions[int(rng.integers(len(positions)))]
        longest = seg_end[start] - start
        if max_span_len is not None:
            longest = min(longest, max_span_len)
        end = start + int(rng.integers(1, longest + 1))
        if taken[start:end].any():
            continue
        taken[start:end] = True
        spans.append((start, end))
    spans.sort()
    tail_eos = bool(ids) and ids[-1] == cfg.eos_id
    body_ids = ids[:-1] if tail_eos else ids
    body, infill, prev = [], [cfg.infill_id], 0
    for s, e in spans:
        body += body_ids[prev:s] + [cfg.mask_id]
        infill += [cfg.mask_id] + body_ids[s:e]
        prev = e
    body += body_ids[prev:]
    return body + infill + ([cfg.eos_id] if tail_eos else [])


def cm3_unmask(ids: Sequence[int], cfg: ModelConfig) -> list[int]:
    """Inverse of cm3_mask: put each infilled span back in place of its <mask>."""
    ids = [int(t) for t in ids]
    if cfg.infill_id is None or cfg.infill_id not in ids:
        return ids
    k = ids.index(cfg.infill_id)
    body, tail = ids[:k], ids[k + 1:]
    tail_eos = bool(tail) and tail[-1] == cfg.eos_id
    if tail_eos:
        tail = tail[:-1]
    if not tail or tail[0] != cfg.mask_id:
        raise ValueError("cm3_unmask: <infill> must be followed by <mask> span ...")
    spans: list[list[int]] = []
    for t in tail:
        if t == cfg.mask_id:
            spans.append([])
        else:
            spans[-1].append(t)
    if body.count(cfg.mask_id) != len(spans):
        raise ValueError(f"cm3_unmask: {body.count(cfg.mask_id)} <mask> in the body but {len(spans)} infilled spans")
    out, it = [], iter(spans)
    for t in body:
        out += next(it) if t == cfg.mask_id else [t]
    return out + ([cfg.eos_id] if tail_eos else [])
