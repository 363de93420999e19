"""CM3leon's selection of the documents that get prefixed to a prompt, over a memory bank
(cm3leon/bank.py: vectors, search; re-exported here, where docs/INTERFACES.md names them).

Selection (`Retriever`), the rule implemented exactly:
  1. relevance r_i = cos(query, doc_i); the query vector follows the document rule of
     `encode_documents` (normalised mean of its text and image vectors).
  2. candidate pool = the `pool_factor * k` most relevant rows (grown x4 while too few survive).
  3. drop excluded docs (ids or bank-relative image paths; the query's own id by default) and
     docs with r_i > max_similarity (near-duplicates of the query, e.g. the query itself).
  4. order: with prefer_multimodal, documents having both text and image come first, then the
     rest; inside each group by decreasing relevance.
  5. walk that order, skipping a doc whose cosine to an already picked doc exceeds
     max_similarity (diversity); stop at k. Fewer than k come back when the bank runs out.
Query dropout (training only, when a seed is given): drop round(rate * n_words) of the query
text's words, chosen by a seeded RNG, before encoding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from cm3leon.bank import (BANK_FORMAT, BANK_VERSION, FAISS_AUTO_MAX_QUERIES, FAISS_AUTO_ROWS,  # noqa: F401
                          EncoderMismatchError, MemoryBank, Progress, RetrievalDoc, load_image)
from cm3leon.encoder import DualEncoder, encode_documents

__all__ = ["DualEncoder", "encode_documents", "RetrievalDoc", "MemoryBank", "EncoderMismatchError",
           "SelectionConfig", "Retriever", "query_dropout", "load_image"]


# ----------------------------------------------------------------------------- selection


@dataclass
class SelectionConfig:
    k: int = 2  # documents prefixed at inference (the paper: 2; 3 per pair in training)
    max_similarity: float = 0.9  # skip docs more similar than this to the query or to an earlier pick
    prefer_multimodal: bool = True  # documents with both text and image first
    pool_factor: int = 10  # candidate pool = pool_factor * k by relevance
    query_dropout: float = 0.2  # share of query words dropped in training (when a seed is given)
    backend: str = "auto"


def query_dropout(text: str, rate: float, seed: int) -> str:
    """Drop round(rate * n) of the n words (whitespace split), chosen by Random(seed); keeps >= 1 word."""
    words = text.split()
    n_drop = min(round(rate * len(words)), max(0, len(words) - 1))
    drop = set(random.Random(seed).sample(range(len(words)), n_drop))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


class Retriever:
    def __init__(self, bank: MemoryBank, encoder: DualEncoder, cfg: SelectionConfig | None = None) -> None:
        bank.check_encoder(encoder)  # refuse before any search: mismatched vectors give silent nonsense
        self.bank, self.encoder, self.cfg = bank, encoder, cfg or SelectionConfig()

    def query_vectors(self, queries: Sequence[RetrievalDoc], dropout_seeds: Sequence[int | None] | None = None) -> torch.Tensor:
        texts, images = [], []
        for i, qd in enumerate(queries):
            text = qd.text
            seed = dropout_seeds[i] if dropout_seeds is not None else None
            if text is not None and seed is not None and self.cfg.query_dropout > 0:
                text = query_dropout(text, self.cfg.query_dropout, seed)
            image = qd.image
            if image is None and qd.image_path is not None:
                image = load_image(Path(qd.image_path), f"query {qd.id!r}")
            texts.append(text)
            images.append(image)
        return encode_documents(self.encoder, texts, images)

    def select(self, qvecs: torch.Tensor, k: int, exclude: Sequence[Collection[str]] | None = None) -> list[list[tuple[int, float]]]:
        """Rows and relevances picked for each query vector, by the rule in the module docstring."""
        cfg, n = self.cfg, len(self.bank)
        out: list[list[tuple[int, float]] | None] = [None] * len(qvecs)
        todo = list(range(len(qvecs)))
        pool = max(k, cfg.pool_factor * k)
        while todo:
            extra = max((len(exclude[i]) for i in todo), default=0) if exclude else 0
            scores, rows = self.bank.search(qvecs[todo], min(n, pool + extra), backend=cfg.backend)
            retry = []
            for j, qi in enumerate(todo):
                picked = self._pick(scores[j].tolist(), rows[j].tolist(), k, exclude[qi] if exclude else ())
                if len(picked) < k and pool + extra < n:
                    retry.append(qi)  # too few survived the filters: look deeper
                out[qi] = picked
            todo, pool = retry, pool * 4
        return out  # type: ignore[return-value]

    def _pick(self, scores: list[float], rows: list[int], k: int, exclude: Collection[str]) -> list[tuple[int, float]]:
        cfg = self.cfg
        cands = []
        for s, r in zip(scores, rows):
            if s > cfg.max_similarity:
                continue  # a near-duplicate of the query (the query itself, usually)
            rec = self.bank.record(r)
            if rec["id"] in exclude or (rec.get("image") and rec["image"] in exclude):
                continue
            multimodal = bool(rec.get("has_text")) and bool(rec.get("has_image"))
            cands.append((0 if (multimodal or not cfg.prefer_multimodal) else 1, -s, r))
        cands.sort()  # multimodal group first, then by decreasing relevance
        picked: list[tuple[int, float]] = []
        vecs: list[torch.Tensor] = []
        emb = self.bank.embeddings
        for _, neg_s, r in cands:
            v = torch.from_numpy(np.array(emb[r], dtype=np.float32))
            if any(float(v @ u) > cfg.max_similarity for u in vecs):
                continue  # a near-duplicate of a document already picked
            picked.append((r, -neg_s))
            vecs.append(v)
            if len(picked) == k:
                break
        return picked

    def augment_batch(self, queries: Sequence[RetrievalDoc], k: int | None = None, *,
                      exclude: Sequence[Collection[str]] | None = None,
                      dropout_seeds: Sequence[int | None] | None = None) -> list[list[RetrievalDoc]]:
        """The documents to prefix for each query, best first. `exclude[i]`: ids or bank-relative image
        paths to skip (default: the query's own id). `dropout_seeds[i]`: apply query dropout (training)."""
        k = self.cfg.k if k is None else k
        if exclude is None:
            exclude = [{q.id} if q.id is not None else set() for q in queries]
        if len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        if k <= 0 or not queries:
            return [[] for _ in queries]
        picks = self.select(self.query_vectors(queries, dropout_seeds), k, [set(e) for e in exclude])
        out = []
        for rows in picks:
            docs = []
            for r, s in rows:
                d = self.bank.doc(r)
                d.meta.update(score=s, row=r)
                docs.append(d)
            out.append(docs)
        return out

    def augment(self, query: RetrievalDoc, k: int | None = None, *, exclude: Collection[str] | None = None,
                dropout_seed: int | None = None) -> list[RetrievalDoc]:
        return self.augment_batch([query], k, exclude=None if exclude is None else [exclude],
                                  dropout_seeds=None if dropout_seed is None else [dropout_seed])[0]
