"""compare's paired statistics for set metrics (FID/FD): the linearised paired bootstrap of
reports/paired.py checked against the plain bootstrap it replaces, and compare's verdicts on
runs that saved their features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from evals import runs
from evals.metrics.fid_stats import frechet_distance
from reports import cli as reports_cli
from reports.paired import fd_influence, fd_reference, paired_set_delta, set_value

D = 6
REF = np.random.default_rng(7).normal(size=(3000, D))
REF_MU, REF_SIGMA = REF.mean(0), np.cov(REF, rowvar=False)


def _saved(features: np.ndarray, ids: list[str] | None = None) -> dict[str, np.ndarray]:
    ids = ids or [f"p{i}" for i in range(len(features))]
    return {"ids": np.asarray(ids), "features": features, "ref_mu": REF_MU, "ref_sigma": REF_SIGMA}


def _fd(x: np.ndarray) -> float:
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), REF_MU, REF_SIGMA)


def test_value_is_the_frechet_distance():
    x = np.random.default_rng(0).normal(size=(300, D)) * 1.2 + 0.3
    value, infl = fd_influence(x, fd_reference(REF_MU, REF_SIGMA))
    assert value == pytest.approx(_fd(x), rel=1e-9)
    assert abs(infl.mean()) < 1e-9 * np.abs(infl).max()
    # The influence values are the first-order change: dropping one sample moves FD by about -IF/n.
    n = len(x)
    for i in (0, 5, 17):
        drop = _fd(np.delete(x, i, axis=0)) - value
        assert drop == pytest.approx(-infl[i] / (n - 1), rel=0.2, abs=2e-3 * np.abs(infl).mean() / n)


@pytest.mark.parametrize("seed", [0, 1])
def test_linearised_ci_matches_the_plain_paired_bootstrap(seed):
    """The plain paired bootstrap recomputes both runs' FD on every resample of the shared prompts;
    the linearised one averages influence values. Same width and place, to a fraction of the width."""
    rng = np.random.default_rng(seed)
    n = 400
    base = rng.normal(size=(n, D)) * 1.1 + 0.1
    new = base + rng.normal(size=(n, D)) * 0.5 + 0.05  # the same prompts, another model
    got = paired_set_delta("FID", _saved(base), _saved(new), n_resamples=4000, seed=seed)
    assert got.delta == pytest.approx(_fd(new) - _fd(base), rel=1e-9) and got.n == n
    boot = np.random.default_rng(seed + 10)
    deltas = []
    for _ in range(500):
        idx = boot.integers(0, n, n)
        deltas.append(_fd(new[idx]) - _fd(base[idx]))
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    width = hi - lo
    assert (got.ci[1] - got.ci[0]) == pytest.approx(width, rel=0.15)
    assert abs(got.ci[0] - lo) < 0.25 * width and abs(got.ci[1] - hi) < 0.25 * width


def test_pairing_needs_shared_ids_and_one_reference():
    x = np.random.default_rng(0).normal(size=(50, D))
    assert "shared by id" in paired_set_delta("FID", _saved(x), _saved(x, [f"q{i}" for i in range(50)]))
    other = {**_saved(x), "ref_sigma": REF_SIGMA * 2}
    assert "different reference" in paired_set_delta("FD-demo", _saved(x), other)
    assert set_value("FD-demo", _saved(x)) == pytest.approx(_fd(x), rel=1e-9)
    assert set_value("CLIPScore", _saved(x)) is None


# ---------------------------------------------------------------- compare on runs with saved features

def _run(root: Path, name: str, features: np.ndarray, *, value: float | None = None) -> Path:
    run = root / name
    ids = [f"p{i}" for i in range(len(features))]
    runs.write_features(run / "t2i", "FD-demo", ids, features.astype(np.float32), ref_mu=REF_MU, ref_sigma=REF_SIGMA)
    v = set_value("FD-demo", _saved(features.astype(np.float32))) if value is None else value
    lines = [{"id": i, "index": k, "kind": "t2i", "failure": None, "per_sample": {}} for k, i in enumerate(ids)]
    (run / "t2i" / "samples").mkdir(parents=True)
    (run / "t2i" / "samples" / "rank-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    entry = {"metrics": {"FD-demo": {"value": v, "ci": None, "n": len(ids), "higher_is_better": False}},
             "failures": [], "n_samples": len(ids)}
    (run / "metrics.json").write_text(json.dumps({"run": {}, "tasks": {"t2i": entry}}))
    return run


def _compare(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command("compare")(reports_cli.compare)
    app.command("report")(reports_cli.report)
    r = CliRunner().invoke(app, ["compare", *args])
    return r.exit_code, r.output


def test_paired_fd_same_prompts_other_seed_is_no_regression_and_a_shift_is(tmp_path):
    rng = np.random.default_rng(3)
    prompts = rng.normal(size=(300, D))  # what each prompt asks for: shared by both runs
    base = _run(tmp_path, "base", prompts + 0.3 * rng.normal(size=prompts.shape))
    reseeded = _run(tmp_path, "reseeded", prompts + 0.3 * rng.normal(size=prompts.shape))
    worse = _run(tmp_path, "worse", prompts + 0.3 * rng.normal(size=prompts.shape) + 0.25)
    code, out = _compare(str(base), str(reseeded), "--json")
    row = next(r for r in json.loads(out)["rows"] if r["metric"] == "FD-demo")
    assert code == 0 and row["verdict"] == "same" and row["ci_method"] == "paired bootstrap (linearised)"
    assert row["n_paired"] == 300 and row["ci_low"] < 0 < row["ci_high"]
    code, out = _compare(str(base), str(worse), "--json")
    data = json.loads(out)
    row = next(r for r in data["rows"] if r["metric"] == "FD-demo")
    assert code == 1 and data["verdict"] == "regression" and row["verdict"] == "regression" and row["ci_low"] > 0
    # A practical margin larger than the worsening turns it into "same".
    assert _compare(str(base), str(worse), "--tolerance", f"FD-demo={row['ci_high'] * 2}")[0] == 0


def test_hand_edited_fd_is_refused_naming_the_metric(tmp_path):
    x = np.random.default_rng(4).normal(size=(100, D))
    good = _run(tmp_path, "good", x)
    edited = _run(tmp_path, "edited", x, value=set_value("FD-demo", _saved(x.astype(np.float32))) * 0.9)
    code, out = _compare(str(good), str(edited))
    assert code == 2 and "t2i/FD-demo" in out and "saved features" in out
    assert len(out.strip().splitlines()) == 1
