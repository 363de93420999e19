"""compare: paired-bootstrap verdicts, fallbacks, tolerances, and the CI exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from evals.metrics.result import mean_result
from reports import cli as reports_cli
from reports.compare import compare_runs, parse_tolerances, to_markdown, tolerance_for
from reports.errors import ReportError
from reports.paired import set_value
from evals import runs

N = 200


def fid_features(seed: int = 0, shift: float = 0.0, n: int = N, d: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) + np.float32(shift)


REF = np.random.default_rng(99).normal(size=(2000, 6))


def make_run(root: Path, name: str, vqa: np.ndarray, *, fid: np.ndarray | None = None, fid_ids: list | None = None,
             clip: np.ndarray | None = None, vqa_ids: str = "vqav2") -> Path:
    """A run with VQA accuracy (per-sample 0..1, value x100), FID from saved features (computed
    from them, as the engine does) and optionally a continuous per-sample score; samples split over
    two rank files in a shuffled order so matching must go by id."""
    run = root / name
    tasks: dict = {}
    per_task = {"vqav2": {"accuracy": (vqa, 100.0)}}
    if clip is not None:
        per_task["t2i"] = {"CLIPScore": (clip, 1.0)}
    for task, metrics in per_task.items():
        prefix = vqa_ids if task == "vqav2" else task
        samples = [{"id": f"{prefix}-{i}", "index": i, "kind": "vqa", "failure": None,
                    "per_sample": {m: float(x[i]) for m, (x, _) in metrics.items()}} for i in range(N)]
        order = np.random.default_rng(len(name)).permutation(N)
        (run / task / "samples").mkdir(parents=True)
        for r in range(2):
            lines = [json.dumps(samples[j]) + "\n" for j in order[r::2]]
            (run / task / "samples" / f"rank-{r:05d}.jsonl").write_text("".join(lines))
        res = {m: mean_result(m, x, scale=s, higher_is_better=True) for m, (x, s) in metrics.items()}
        tasks[task] = {"metrics": {m: r.to_json() for m, r in res.items()}, "failures": [], "n_samples": N}
    feats = fid_features() if fid is None else fid
    ids = fid_ids or [f"p{i}" for i in range(len(feats))]
    saved = {"ids": np.asarray(ids), "features": feats, "ref_mu": REF.mean(0), "ref_sigma": np.cov(REF, rowvar=False)}
    runs.write_features(run / "coco-fid", "FID", ids, feats, ref_mu=saved["ref_mu"], ref_sigma=saved["ref_sigma"])
    tasks["coco-fid"] = {"metrics": {"FID": {"value": set_value("FID", saved), "ci": None, "n": len(feats),
                                             "higher_is_better": False}},
                         "failures": [], "n_samples": len(feats)}
    (run / "metrics.json").write_text(json.dumps({"run": {"model": "demo"}, "tasks": tasks}))
    return run


@pytest.fixture
def base_scores() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=N, p=[0.3, 0.1, 0.1, 0.5])


def _by(verdicts, task, metric):
    (v,) = [v for v in verdicts if v.task == task and v.metric == metric]
    return v


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("compare")(reports_cli.compare)
    app.command("report")(reports_cli.report)
    return app


def test_identical_runs_are_the_same(tmp_path, base_scores):
    a = make_run(tmp_path, "a", base_scores)
    b = make_run(tmp_path, "b", base_scores.copy())
    vs = compare_runs(a, b)
    assert {v.verdict for v in vs} == {"same"}
    v = _by(vs, "vqav2", "accuracy")
    assert v.delta == 0 and (v.ci_low, v.ci_high) == (0, 0) and v.ci_method == "paired bootstrap" and v.n_paired == N
    r = CliRunner().invoke(_app(), ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "no regression" in r.output


def test_planted_regression_fails(tmp_path, base_scores):
    new = base_scores.copy()
    correct = np.flatnonzero(new == 1.0)[:40]
    new[correct] = 0.0  # 40 of 200 answers now wrong: -20 points
    a, b = make_run(tmp_path, "a", base_scores), make_run(tmp_path, "b", new)
    v = _by(compare_runs(a, b), "vqav2", "accuracy")
    assert v.verdict == "regression" and v.higher_is_better
    assert v.delta == pytest.approx(-20.0)
    assert v.ci_high < 0 and v.ci_low < v.delta < v.ci_high  # CI in the metric's units (x100)
    md_file = tmp_path / "out" / "cmp.md"
    r = CliRunner().invoke(_app(), ["compare", str(a), str(b), "--markdown", str(md_file)])
    assert r.exit_code == 1, r.output
    assert "**REGRESSION**" in md_file.read_text() and "❌ regression" in r.output
    # The same drop inside a generous tolerance passes; the reverse direction is an improvement.
    r = CliRunner().invoke(_app(), ["compare", str(a), str(b), "--tolerance", "vqav2/accuracy=25", "--json"])
    assert r.exit_code == 0, r.output
    assert {x["verdict"] for x in json.loads(r.output)["rows"]} == {"same"}
    assert _by(compare_runs(b, a), "vqav2", "accuracy").verdict == "improvement"


def test_tiny_noise_is_not_a_regression(tmp_path, base_scores):
    new = base_scores.copy()
    ones, zeros = np.flatnonzero(new == 1.0), np.flatnonzero(new == 0.0)
    new[ones[:3]] = 0.0
    new[zeros[:1]] = 1.0  # net -2 answers of 200: -1 point, well inside the noise
    a, b = make_run(tmp_path, "a", base_scores), make_run(tmp_path, "b", new)
    v = _by(compare_runs(a, b), "vqav2", "accuracy")
    assert v.delta == pytest.approx(-1.0) and v.verdict == "same" and v.ci_low < 0 < v.ci_high
    assert CliRunner().invoke(_app(), ["compare", str(a), str(b)]).exit_code == 0


def test_paired_bootstrap_sees_a_consistent_shift(tmp_path, base_scores):
    # Per-sample scores vary a lot between samples, so the two runs' own CIs overlap, but
    # every sample lost 0.02: paired, that is far outside the noise.
    clip = np.random.default_rng(1).uniform(0.1, 0.9, size=N)
    a = make_run(tmp_path, "a", base_scores, clip=clip)
    b = make_run(tmp_path, "b", base_scores, clip=clip - 0.02)
    meta = json.loads((b / "metrics.json").read_text())["tasks"]["t2i"]["metrics"]["CLIPScore"]
    base_meta = json.loads((a / "metrics.json").read_text())["tasks"]["t2i"]["metrics"]["CLIPScore"]
    assert meta["ci"][1] > base_meta["ci"][0]  # the independent CIs overlap
    v = _by(compare_runs(a, b), "t2i", "CLIPScore")
    assert v.verdict == "regression" and v.ci_high < 0 and v.delta == pytest.approx(-0.02)
    assert _by(compare_runs(a, b, {"CLIPScore": 0.05}), "t2i", "CLIPScore").verdict == "same"


def test_unpaired_runs_fall_back_to_the_runs_own_cis(tmp_path, base_scores):
    # Different prompts (no id in common): FID's CI of the delta combines the two runs' own
    # linearised CIs; VQA (no CI recorded) decides on the tolerance alone; both say so.
    a = make_run(tmp_path, "a", base_scores)
    far = make_run(tmp_path, "far", base_scores, vqa_ids="other", fid=fid_features(1, shift=1.0),
                   fid_ids=[f"q{i}" for i in range(N)])
    near = make_run(tmp_path, "near", base_scores, vqa_ids="other", fid=fid_features(2),
                    fid_ids=[f"q{i}" for i in range(N)])
    v = _by(compare_runs(a, far), "coco-fid", "FID")
    assert not v.higher_is_better and v.verdict == "regression" and v.ci_method == "run CIs"
    assert "unpaired" in v.note and 0 < v.ci_low < v.delta < v.ci_high
    v = _by(compare_runs(a, near), "coco-fid", "FID")
    assert v.verdict == "same" and v.ci_low < 0 < v.ci_high and v.ci_method == "run CIs"
    v = _by(compare_runs(a, near), "vqav2", "accuracy")
    assert v.ci_method == "run CIs" and "unpaired" in v.note and v.n_paired == 0


def test_missing_metric_and_markdown(tmp_path, base_scores):
    a = make_run(tmp_path, "a", base_scores, clip=np.full(N, 0.5))
    b = make_run(tmp_path, "b", base_scores)
    vs = compare_runs(a, b)
    assert _by(vs, "t2i", "CLIPScore").verdict == "missing"
    md = to_markdown(vs, "base|<b>", b)
    assert "base\\|&lt;b&gt;" in md and "<b>" not in md
    assert md.count("\n| ") == 1 + len(vs)  # header + one row per verdict
    # A metric missing on one side fails the comparison unless it is allowed.
    assert CliRunner().invoke(_app(), ["compare", str(a), str(b)]).exit_code == 1
    assert CliRunner().invoke(_app(), ["compare", str(a), str(b), "--allow-missing"]).exit_code == 0


def test_tolerance_parsing_and_bad_input(tmp_path, base_scores):
    tol = parse_tolerances(["FID=0.5", "vqav2/accuracy=1", "*=0.1"])
    assert tolerance_for(tol, "vqav2", "accuracy") == 1 and tolerance_for(tol, "coco-fid", "fid") == 0.5
    assert tolerance_for(tol, "x", "CIDEr") == 0.1 and tolerance_for({}, "x", "y") == 0
    for bad in ("FID", "FID=abc", "=1", "FID=-1"):
        with pytest.raises(ReportError, match="--tolerance"):
            parse_tolerances([bad])
    a = make_run(tmp_path, "a", base_scores)
    r = CliRunner().invoke(_app(), ["compare", str(a), str(a), "--tolerance", "FID"])
    assert r.exit_code == 2 and "error: --tolerance" in r.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text('{"tasks": ')
    r = CliRunner().invoke(_app(), ["compare", str(a), str(tmp_path / "broken")])
    assert r.exit_code == 2 and "broken/metrics.json: malformed JSON" in r.output
    with open(a / "vqav2" / "samples" / "rank-00000.jsonl", "a") as f:
        f.write("{bad}\n")
    with pytest.raises(ReportError, match=r"rank-00000\.jsonl:\d+: malformed sample line"):
        compare_runs(a, a)


def test_mounted_in_the_cm3eval_app(tmp_path, base_scores):
    from evals.cli import app  # the real entry point, as `cm3eval compare` runs it

    new = base_scores.copy()
    new[np.flatnonzero(new == 1.0)[:40]] = 0.0
    a, b = make_run(tmp_path, "a", base_scores), make_run(tmp_path, "b", new)
    assert CliRunner().invoke(app, ["compare", str(a), str(a)]).exit_code == 0
    assert CliRunner().invoke(app, ["compare", str(a), str(b)]).exit_code == 1


def _concrete(pattern: str) -> str:
    """A result name matching a metric table pattern ("FD-*" -> "FD-demo", "t2i_R@*" -> "t2i_R@1")."""
    return pattern.replace("FD-*", "FD-demo").replace("*", "1")


def test_directions_of_every_registered_metric(tmp_path):
    """The metric table declares each result's direction; a run records it; compare follows it
    (made 50 % worse in the declared direction -> regression, better -> improvement)."""
    from evals.scoring import METRICS

    declared = {_concrete(p): (key, hib) for key, d in METRICS.items() for p, hib in d.outputs}
    for name in ("FID", "FD-demo", "L1", "L2 (MSE)", "t2i_rank"):
        assert declared[name][1] is False, name
    for name in ("CIDEr", "accuracy", "CLIP-I", "BLEU-4", "DINO", "CLIPScore", "t2i_R@1", "CLIP-T"):
        assert declared[name][1] is True, name

    def run(name: str, factor: float) -> Path:
        tasks = {}
        for metric, (key, hib) in declared.items():
            worse = factor if not hib else 1 / factor  # factor > 1: worse in the metric's own direction
            entry = {"value": 10.0 * worse, "ci": None, "n": 100,
                     "higher_is_better": METRICS[key].higher_is_better(metric)}
            tasks.setdefault(key, {"metrics": {}, "failures": [], "n_samples": 100})["metrics"][metric] = entry
        for key, t in tasks.items():  # per-sample scores that average to each value (what verification reads)
            line = {"id": "s0", "index": 0, "failure": None, "per_sample": {k: e["value"] for k, e in t["metrics"].items()}}
            (tmp_path / name / key / "samples").mkdir(parents=True)
            (tmp_path / name / key / "samples" / "rank-00000.jsonl").write_text(json.dumps(line) + "\n")
            t["n_samples"] = 1
            for e in t["metrics"].values():
                e["n"] = 1
        (tmp_path / name / "metrics.json").write_text(json.dumps({"run": {}, "tasks": tasks}))
        return tmp_path / name

    base, worse, better = run("base", 1.0), run("worse", 1.5), run("better", 1 / 1.5)
    got = {v.metric: v for v in compare_runs(base, worse) if v.metric != "failures"}
    assert set(got) == set(declared)
    for metric, (_, hib) in declared.items():
        assert got[metric].higher_is_better is hib and got[metric].verdict == "regression", metric
    assert {v.verdict for v in compare_runs(base, better) if v.metric != "failures"} == {"improvement"}
    r = CliRunner().invoke(_app(), ["compare", str(base), str(worse)])
    assert r.exit_code == 1 and "❌ regression" in r.output
