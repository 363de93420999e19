"""Stage "index": the memory bank over the training documents and each document's neighbours.

Neighbours follow CM3leon's training-time selection (relevance, modality, diversity; the document
itself excluded; query dropout), computed once so the LM stages only look them up.
"""

from __future__ import annotations

import torch

from ..encoder import NativeDualEncoder
from ..retrieval import MemoryBank, RetrievalDoc, Retriever, SelectionConfig
from .recipe import DemoData, DemoRecipe


def build_bank(data: DemoData, encoder: NativeDualEncoder) -> MemoryBank:
    """One multimodal document per training image: its most descriptive caption and the image."""
    docs = [RetrievalDoc(id=im.id, text=im.captions[0], image=im.image) for im in data.images]
    return MemoryBank.build(docs, encoder, progress=False)


def precompute_neighbours(bank: MemoryBank, encoder: NativeDualEncoder, data: DemoData, recipe: DemoRecipe
                          ) -> torch.Tensor:
    """Rows [N, neighbours] of each training document's retrieved documents (-1 where fewer came back).

    The query is the document itself (caption with query dropout + image), itself excluded: CM3leon's
    training-time retrieval."""
    retriever = Retriever(bank, encoder, SelectionConfig(k=recipe.neighbours, max_similarity=recipe.max_similarity,
                                                         query_dropout=recipe.query_dropout))
    out = torch.full((len(data.images), recipe.neighbours), -1, dtype=torch.long)
    for s in range(0, len(data.images), 256):
        chunk = data.images[s:s + 256]
        queries = [RetrievalDoc(id=im.id, text=im.captions[0], image=im.image) for im in chunk]
        qvecs = retriever.query_vectors(queries, [recipe.seed * 1_000_003 + s + j for j in range(len(chunk))])
        picks = retriever.select(qvecs, recipe.neighbours, [{im.id} for im in chunk])
        for j, rows in enumerate(picks):
            for n, (row, _) in enumerate(rows):
                out[s + j, n] = row
    return out
