"""CMMD, PRDC's recall and coverage, and a category's FID are verified from the rows the run saved.

Each is a function of whole feature sets, with no per-sample scores: the run now keeps the generated
rows and the reference (moments for a Fréchet distance, rows for CMMD and PRDC) under
TASK/features/, and `reports.verify` recomputes each value with the metric's own code. Before, compare
and the leaderboard refused every run that held one of them as if it had been edited by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evals import scoring
from evals.metrics.cmmd import cmmd_from_embeddings
from evals.metrics.fid import FeatureStats, compute_fid
from evals.metrics.prdc import compute_prdc
from evals.scoring_inputs import Context
from reports.errors import InconsistentRun
from reports.verify import verify_task

N, N_REF, DIM = 24, 30, 8


def _sets():
    rng = np.random.default_rng(0)
    gen = rng.normal(size=(N, DIM)).astype(np.float32)
    ref = (rng.normal(size=(N_REF, DIM)) + 0.3).astype(np.float32)
    return gen, ref


def _fake_metrics(monkeypatch):
    """Metric table entries that return the real metric code's results on fixed feature sets, as the
    image metrics do on their encoders' features."""
    gen, ref = _sets()

    def cmmd(ctx, opts):
        res = cmmd_from_embeddings(gen, ref, bootstrap=10)
        res.set_inputs = {"features": gen, "ref_features": ref}
        return {"CMMD": res}

    def prdc(ctx, opts):
        return compute_prdc(ref, gen, 3, space="test", n_resamples=10)

    def per_category(ctx, opts):  # two categories, as fid_per_category writes them
        out = {}
        for cat, idx in (("a", list(range(0, N, 2))), ("b", list(range(1, N, 2)))):
            res = compute_fid(gen[idx], FeatureStats.from_features(ref[: N_REF // 2 + len(idx)]), keep_features=True)
            res.set_inputs["ids"] = [ctx.ids()[i] for i in idx]
            out[f"FID/{cat}"] = res
        return out

    table = dict(scoring.METRICS)
    for key, fn in (("cmmd", cmmd), ("prdc", prdc), ("fid_per_category", per_category)):
        table[key] = scoring.MetricDef(fn, ("t2i",), {}, scoring.METRICS[key].outputs)
    monkeypatch.setattr(scoring, "METRICS", table)


def _scored_run(tmp_path, monkeypatch):
    _fake_metrics(monkeypatch)
    task_dir = tmp_path / "run" / "t2i"
    task_dir.mkdir(parents=True)
    records = [{"id": f"s{i}"} for i in range(N)]
    ctx = Context(records, task_dir, tmp_path, "cpu", 0, None)
    scored = scoring.score_metrics({"cmmd": {}, "prdc": {}, "fid_per_category": {}}, ctx)
    assert not scored.unavailable, scored.unavailable
    entry = {"metrics": {name: {**res.to_json(), "n": res.n} for name, res in scored.metrics.items()}}
    samples = [{"id": i, "per_sample": scored.per_sample[i]} for i in ctx.ids()]
    return tmp_path / "run", entry, samples


def test_set_metrics_are_verified_from_their_saved_rows(tmp_path, monkeypatch):
    run_dir, entry, samples = _scored_run(tmp_path, monkeypatch)
    how = verify_task(run_dir, "t2i", entry, samples)
    assert how == {"CMMD": "features", "precision": "mean", "recall": "features", "density": "mean",
                   "coverage": "features", "FID/a": "features", "FID/b": "features"}
    saved = sorted(p.name for p in (run_dir / "t2i" / "features").iterdir())
    assert saved == ["CMMD.npz", "FID_a.npz", "FID_b.npz", "PRDC.npz"]  # recall and coverage share one file


@pytest.mark.parametrize("metric", ["CMMD", "recall", "coverage", "FID/b"])
def test_a_hand_edited_set_metric_is_refused(metric, tmp_path, monkeypatch):
    run_dir, entry, samples = _scored_run(tmp_path, monkeypatch)
    entry["metrics"][metric]["value"] *= 1.01
    with pytest.raises(InconsistentRun, match="saved features give"):
        verify_task(run_dir, "t2i", entry, samples)
