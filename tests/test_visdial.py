"""VisDial: the shared-prompt continuation scorer and the ranking metrics against the challenge's
own evaluation code (visdialch/metrics.py, vendored with its BSD licence)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3leon.sampling import continuation_logprobs
from cm3leon.scoring import score_continuations
from evals.metrics.visdial import visdial_metrics

from test_sampling import tiny_model

REFERENCE = Path(__file__).parent / "data" / "reference" / "visdial-challenge-starter-pytorch" / "metrics.py"


def reference_module():
    spec = importlib.util.spec_from_file_location("visdialch_metrics", REFERENCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_score_continuations_equals_full_forwards_per_candidate():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompt = [72] + torch.randint(0, 40, (9,), generator=g).tolist()
    conts = [torch.randint(0, 40, (int(n),), generator=g).tolist() + [73]
             for n in torch.randint(0, 6, (23,), generator=g)]
    got = score_continuations(model, prompt, conts, pad_id=74)
    want = [continuation_logprobs(model, [prompt], c, pad_id=74)[0] for c in conts]
    assert got == pytest.approx(want, abs=1e-5)
    assert len({round(x, 3) for x in got}) > 10  # different candidates, different scores
    # scoring in chunks of rows gives the same numbers
    assert score_continuations(model, prompt, conts, pad_id=74, rows=4) == pytest.approx(got, abs=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(model, prompt, [[5], []])
    with pytest.raises(ValueError, match="non-empty prompt"):
        score_continuations(model, [], [[5]])


def test_visdial_metrics_equal_the_challenge_code():
    ref = reference_module()
    rng = np.random.default_rng(0)
    n_images, rounds, options = 7, 10, 100
    scores = rng.normal(size=(n_images, rounds, options))  # continuous: no ties
    gt = rng.integers(0, options, size=(n_images, rounds))
    relevance = np.zeros((n_images, options))
    for i in range(n_images):  # VisDial's dense values: 0, 0.25, 0.5, 0.75, 1 over a few candidates
        idx = rng.choice(options, size=int(rng.integers(1, 12)), replace=False)
        relevance[i, idx] = rng.choice([0.25, 0.5, 0.75, 1.0], size=len(idx))
    dense_round = rng.integers(0, rounds, size=n_images)

    sparse = ref.SparseGTMetrics()
    sparse.observe(torch.tensor(scores), torch.tensor(gt))
    want = sparse.retrieve()
    ndcg = ref.NDCG()
    ndcg.observe(torch.tensor(scores[np.arange(n_images), dense_round]), torch.tensor(relevance))
    want.update(ndcg.retrieve())

    flat = scores.reshape(-1, options)
    dense = [(i * rounds + int(dense_round[i]), relevance[i]) for i in range(n_images)]
    got = visdial_metrics(flat, gt.reshape(-1), dense)
    for ours, theirs in (("R@1", "r@1"), ("R@5", "r@5"), ("R@10", "r@10"), ("MRR", "mrr"), ("NDCG", "ndcg")):
        assert got[ours].value == pytest.approx(100 * want[theirs], abs=1e-4), ours
    assert got["mean_rank"].value == pytest.approx(want["mean"], abs=1e-4)
    assert got["NDCG"].n == n_images and got["MRR"].n == n_images * rounds
    assert 0 < got["NDCG"].value < 100


def test_a_perfect_ranking_scores_the_maximum():
    scores = np.tile(-np.arange(100.0), (3, 1))  # candidate 0 first
    rel = np.zeros(100)
    rel[[0, 1]] = [1.0, 0.5]
    got = visdial_metrics(scores, [0, 0, 0], [(1, rel)])
    assert got["R@1"].value == 100 and got["mean_rank"].value == 1 and got["NDCG"].value == pytest.approx(100)
