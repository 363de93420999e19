"""Stage "tokenizer": byte-level BPE over every text the model reads or writes."""

from __future__ import annotations

from typing import Sequence

from ..text import TextTokenizer
from .recipe import DemoData, DemoRecipe


def train_text_tokenizer(texts: Sequence[str], n_text: int, image_codebook_size: int = 256) -> TextTokenizer:
    return TextTokenizer.train(texts, n_text=n_text, image_codebook_size=image_codebook_size)


def corpus(data: DemoData, recipe: DemoRecipe) -> list[str]:
    """Every text the model reads or writes, in the exact form it sees them."""
    out: list[str] = []
    for im in data.images:
        out += im.captions
        for q, a in im.qa:
            out += [recipe.vqa_template.format(question=q), a]
    out += [e.instruction for e in data.edits]
    if recipe.caption_template:
        out.append(recipe.caption_template)
    return out
