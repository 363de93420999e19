"""Metric adapters of the task kinds beyond FID, captions, VQA and editing: VisDial's ranking
metrics (dialog), TextDiffuser's OCR word metrics (text rendered in images) and ControlNet++'s
Canny edge F1 (structure-guided generation). Rows of the metric table in evals/scoring.py."""

from __future__ import annotations

import logging
from typing import Any

from evals import scoring_inputs as inputs
from evals.metrics.errors import MetricUnavailable
from evals.metrics.result import MetricResult
from evals.scoring_inputs import Context

log = logging.getLogger("cm3eval")


def visdial(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """VisDial's ranking metrics from each round's 100 candidate scores (NDCG on the dense rounds)."""
    from evals.metrics.visdial import visdial_metrics

    recs = ctx.records
    if any(not isinstance(r.get("scores"), list) or len(r["scores"]) != len(r["meta"]["options"]) for r in recs):
        raise MetricUnavailable("visdial needs one score per candidate answer in every sample line (the predictor "
                                "gave none)")
    dense = [(i, r["meta"]["gt_relevance"]) for i, r in enumerate(recs) if r["meta"].get("gt_relevance") is not None]
    res = visdial_metrics([r["scores"] for r in recs], [r["meta"]["gt_index"] for r in recs], dense, seed=ctx.seed)
    if not dense:
        log.warning("visdial: no densely annotated round among the scored ones; NDCG not computed "
                    "(give dataset.files.dense: visdial_1.0_val_dense_annotations.json)")
    return res


def ocr(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """TextDiffuser's OCR word metrics of the generated images against the prompts' quoted words."""
    from evals.metrics import ocr

    words = [ocr.read_words(inputs.open_rgb(p)) for p in ctx.output_paths()]
    return ocr.ocr_metrics(words, [r["references"] for r in ctx.records], seed=ctx.seed, engine=ocr.engine_version())


def edge_f1(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """ControlNet++'s Canny controllability: edge F1 of each output against its source's edge map."""
    from evals.metrics.edges import edge_f1

    res = edge_f1([inputs.open_rgb(p) for p in ctx.output_paths()],
                  [inputs.open_rgb(p) for p in ctx.data_images("image")], seed=ctx.seed)
    return {res.name: res}
