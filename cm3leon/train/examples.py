"""LM examples in the harness's exact prompt layouts, for pretraining and SFT.

Pretraining: retrieval-augmented CM3 on caption->image and image->caption documents with 0..k
retrieved documents prefixed, a share CM3-masked, and classifier-free dropout (the caption becomes
<mask>: exactly the unconditional stream the sampler uses). SFT: captioning, VQA, text->image and
editing with its two guidance streams, loss on the outputs only, pretraining mixed in.
"""

from __future__ import annotations

import numpy as np
import torch

from ..document import Document, DocumentCodec, cm3_mask
from .packing import Example
from .recipe import DemoData, DemoRecipe


class ExampleMaker:
    """Builds LM examples in the harness's layouts, from pre-encoded codes (never runs the VQ)."""

    def __init__(self, codec: DocumentCodec, data: DemoData, image_codes: torch.Tensor, edit_codes: torch.Tensor,
                 neighbours: torch.Tensor, recipe: DemoRecipe, extra_codes: torch.Tensor | None = None) -> None:
        self.codec, self.cfg, self.tok, self.data, self.r = codec, codec.cfg, codec.tok, data, recipe
        self.image_codes, self.edit_codes, self.neighbours = image_codes, edit_codes, neighbours
        self.extra_codes = extra_codes if extra_codes is not None else torch.zeros(0, image_codes.shape[1], dtype=torch.long)
        if len(self.extra_codes) != len(data.t2i_extra):
            raise ValueError(f"{len(data.t2i_extra)} extra text->image scenes but {len(self.extra_codes)} code rows")
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok.encode(text)
        return self._ids[text]

    def image_tokens(self, codes: torch.Tensor) -> list[int]:
        return [self.cfg.boi_id, *self.codec.codes_to_tokens(codes), self.cfg.eoi_id]

    def retrieved(self, i: int, rng: np.random.Generator, image_first: bool, k: int) -> list[Document]:
        rows = [int(r) for r in self.neighbours[i] if r >= 0]
        if k <= 0 or not rows:
            return []
        pick = sorted(rng.choice(len(rows), min(k, len(rows)), replace=False))  # keep relevance order
        docs = []
        for j in pick:
            row = rows[j]
            caption, codes = self.data.images[row].captions[0], self.image_codes[row]
            docs.append(Document([codes, caption] if image_first else [caption, codes]))
        return docs

    def _k(self, rng: np.random.Generator, prob: float) -> int:
        return int(rng.integers(1, self.r.retrieval_k_max + 1)) if rng.random() < prob else 0

    # --- pretraining documents (loss on every token)
    def pretrain(self, rng: np.random.Generator) -> Example:
        i = int(rng.integers(len(self.data.images)))
        im, codes, cfg = self.data.images[i], self.image_codes[i], self.cfg
        k = self._k(rng, self.r.retrieval_prob)
        caption = im.captions[rng.integers(len(im.captions))]
        if rng.random() < self.r.cm3_rate:  # CM3: spans moved to the end, in either direction
            image_first = bool(rng.random() < 0.5)
            doc = Document([codes, caption] if image_first else [caption, codes])
            ids = self.codec.encode(doc, self.retrieved(i, rng, image_first, k))
            return Example(cm3_mask(ids, rng, cfg=cfg), prefix_loss=True)
        if rng.random() < self.r.pt_t2i_share:  # caption -> image; the caption dropped for CFG's uncond stream
            if rng.random() < self.r.cfg_dropout:
                prompt = self.codec.uncond_image_prompt()
            else:
                prompt = self.codec.text_to_image_prompt(caption, self.retrieved(i, rng, False, k))
            return Example(prompt + self.image_tokens(codes)[1:] + [cfg.eos_id], prefix_loss=True)
        # image -> caption, two of its captions as branches off one image
        prompt = self.codec.image_to_text_prompt(codes, self.retrieved(i, rng, True, k))
        picks = rng.choice(len(im.captions), min(2, len(im.captions)), replace=False)
        branches = [(self.ids(im.captions[j]) + [cfg.eos_id], [True] * (len(self.ids(im.captions[j])) + 1))
                    for j in picks]
        return Example(prompt, branches, prefix_loss=True)

    # --- SFT examples (loss on the outputs only)
    def image_to_text(self, rng: np.random.Generator) -> Example:
        """Captioning (the most descriptive caption) and every VQA question, branching off one image."""
        i = int(rng.integers(len(self.data.images)))
        im, cfg = self.data.images[i], self.cfg
        prompt = self.codec.image_to_text_prompt(self.image_codes[i])
        head = self.ids(self.r.caption_template) + [cfg.break_id] if self.r.caption_template else []
        cap = self.ids(im.captions[0]) + [cfg.eos_id]
        branches = [(head + cap, [False] * len(head) + [True] * len(cap))]
        for q, a in im.qa:
            ctx = self.ids(self.r.vqa_template.format(question=q)) + [cfg.break_id]
            ans = self.ids(a) + [cfg.eos_id]
            branches.append((ctx + ans, [False] * len(ctx) + [True] * len(ans)))
        return Example(prompt, branches)

    def text_to_image(self, rng: np.random.Generator) -> Example:
        """A scene of the bank (with retrieval now and then) or one of the extra scenes (without)."""
        n = len(self.data.images)
        i = int(rng.integers(n + len(self.data.t2i_extra)))
        im, codes = (self.data.images[i], self.image_codes[i]) if i < n else \
            (self.data.t2i_extra[i - n], self.extra_codes[i - n])
        if rng.random() < self.r.cfg_dropout:
            prompt = self.codec.uncond_image_prompt()
        else:
            caption = im.captions[rng.integers(len(im.captions))]
            docs = self.retrieved(i, rng, False, self._k(rng, self.r.sft_t2i_retrieval_prob)) if i < n else []
            prompt = self.codec.text_to_image_prompt(caption, docs)
        out = self.image_tokens(codes)[1:] + [self.cfg.eos_id]
        return Example(prompt, [(out, [True] * len(out))])

    def edit(self, rng: np.random.Generator) -> Example:
        j = int(rng.integers(len(self.data.edits)))
        src, tgt = self.edit_codes[j, 0], self.edit_codes[j, 1]
        u, p = rng.random(), self.r.edit_cfg_dropout
        if u < p:
            prompt = self.codec.edit_uncond_prompt()
        elif u < 2 * p:
            prompt = self.codec.edit_image_cond_prompt(src)
        else:
            prompt = self.codec.edit_prompt(self.data.edits[j].instruction, src)
        out = self.image_tokens(tgt)[1:] + [self.cfg.eos_id]
        return Example(prompt, [(out, [True] * len(out))])

    def sft(self, rng: np.random.Generator) -> Example:
        mix = np.array(self.r.sft_mix, dtype=float)
        if not self.data.edits:
            mix[2] = 0.0
        kind = int(rng.choice(4, p=mix / mix.sum()))
        return (self.image_to_text, self.text_to_image, self.edit, self.pretrain)[kind](rng)
