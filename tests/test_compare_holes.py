"""compare, as a CI job runs it: one regression test per hole issue 14 found (each failed on the
old code: direction guessed from names, missing/NaN/absent metrics passing, failed samples
ignored, unequal sample sets, inconsistent files and different protocols compared silently).

Only the command (reports.cli.compare) is used, so the same file runs against any version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from typer.testing import CliRunner

from reports import cli as reports_cli

SPEC = {"name": "t", "version": 1, "dataset": {"split": "val2014"}, "generation": {"n_candidates": 1},
        "retrieval": {"enabled": True, "k": 2}, "prompt": {"k_shot": 0}, "metrics": {}}


def constant_samples(metrics: dict[str, dict[str, Any]], n: int = 100) -> list[dict[str, Any]]:
    """n sample lines whose per-sample score of each metric is its recorded value (so the value is
    their mean, as compare's verification demands)."""
    per = {k: e["value"] for k, e in metrics.items() if isinstance(e.get("value"), (int, float))}
    return [{"id": f"s{i}", "index": i, "kind": "x", "failure": None, "per_sample": per} for i in range(n)]


def write_run(root: Path, name: str, tasks: dict[str, dict[str, Any]]) -> Path:
    """tasks: {task: {"metrics": {name: entry}, "samples": [...], "spec": {...}, "failures": [...]}};
    without "samples", constant_samples of the metrics."""
    run = root / name
    out = {}
    for task, t in tasks.items():
        samples = t["samples"] if "samples" in t else constant_samples(t["metrics"], t.get("n_samples", 100))
        (run / task / "samples").mkdir(parents=True)
        (run / task / "samples" / "rank-00000.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (run / task / "config.json").write_text(json.dumps({"task": t.get("spec", SPEC), "model": "m",
                                                            "overrides": {}, "hash": f"{name}-{task}"}))
        out[task] = {"metrics": t["metrics"], "failures": t.get("failures", []),
                     "n_samples": t.get("n_samples", len(samples) or 100),
                     "task_version": t.get("spec", SPEC).get("version", 1)}
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({"run": {"model": "m"}, "tasks": out}))
    return run


def m(value: Any, hib: bool | None, ci: list | None = None, n: int = 100) -> dict[str, Any]:
    e = {"value": value, "ci": ci, "n": n}
    if hib is not None:
        e["higher_is_better"] = hib
    return e


def compare(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command("compare")(reports_cli.compare)
    app.command("report")(reports_cli.report)
    r = CliRunner().invoke(app, ["compare", *args])
    return r.exit_code, r.output


def verdicts(*args: str) -> dict[tuple[str, str], str]:
    code, out = compare(*args, "--json")
    assert code in (0, 1), out
    return {(v["task"], v["metric"]): v["verdict"] for v in json.loads(out)["rows"]}


def test_direction_comes_from_metrics_json_not_the_name(tmp_path):
    # "L2 (MSE)" and "t2i_rank" are lower-is-better; both 50 % worse must fail (the old code
    # guessed from the names, called both "improvement" and exited 0).
    a = write_run(tmp_path, "a", {"edit": {"metrics": {"L2 (MSE)": m(0.02, False)}},
                                  "t2i": {"metrics": {"t2i_rank": m(4.0, False)}}})
    b = write_run(tmp_path, "b", {"edit": {"metrics": {"L2 (MSE)": m(0.03, False)}},
                                  "t2i": {"metrics": {"t2i_rank": m(6.0, False)}}})
    code, out = compare(str(a), str(b))
    assert code == 1 and "no regression" not in out
    v = verdicts(str(a), str(b))
    assert v[("edit", "L2 (MSE)")] == v[("t2i", "t2i_rank")] == "regression"
    assert verdicts(str(b), str(a))[("t2i", "t2i_rank")] == "improvement"
    # A name that "looks" lower-is-better but is recorded as higher-is-better follows the record.
    c = write_run(tmp_path, "c", {"x": {"metrics": {"FID-like": m(10.0, True)}}})
    d = write_run(tmp_path, "d", {"x": {"metrics": {"FID-like": m(5.0, True)}}})
    assert verdicts(str(c), str(d))[("x", "FID-like")] == "regression"


def test_unrecorded_direction_is_never_called_same(tmp_path):
    a = write_run(tmp_path, "a", {"t": {"metrics": {"score": m(10.0, None)}}})
    b = write_run(tmp_path, "b", {"t": {"metrics": {"score": m(9.0, None)}}})
    code, out = compare(str(a), str(b))
    assert code == 1 and "no regression" not in out
    assert verdicts(str(a), str(b))[("t", "score")] == "unknown"
    code, _ = compare(str(a), str(b), "--direction", "score=lower")
    assert code == 0  # 9 < 10 with lower better: an improvement
    assert compare(str(a), str(b), "--direction", "score=higher")[0] == 1


def _sixteen(value: float) -> dict[str, Any]:
    return {f"metric{i}": m(value + i, True) for i in range(16)}


def test_missing_metrics_fail_unless_allowed(tmp_path):
    a = write_run(tmp_path, "a", {"t": {"metrics": _sixteen(10.0)}})
    b = write_run(tmp_path, "b", {"t": {"metrics": {"metric0": m(10.0, True)}}})  # lacks 15 of 16
    code, out = compare(str(a), str(b))
    assert code == 1 and "no regression" not in out and "15 missing" in out
    assert compare(str(a), str(b), "--allow-missing")[0] == 0
    # Neither run has any metric: nothing was compared, which is never a pass.
    e1 = write_run(tmp_path, "e1", {"t": {"metrics": {}}})
    e2 = write_run(tmp_path, "e2", {"t": {"metrics": {}}})
    assert compare(str(e1), str(e2))[0] == 1
    assert compare(str(e1), str(e2), "--allow-missing")[0] == 1


def test_nan_null_and_absent_task_fail(tmp_path):
    a = write_run(tmp_path, "a", {"t": {"metrics": {"acc": m(50.0, True)}}, "u": {"metrics": {"acc": m(1.0, True)}}})
    nan = write_run(tmp_path, "nan", {"t": {"metrics": {"acc": m(None, True)}},
                                      "u": {"metrics": {"acc": m(1.0, True)}}})
    no_task = write_run(tmp_path, "notask", {"t": {"metrics": {"acc": m(50.0, True)}}})
    assert compare(str(a), str(nan))[0] == 1
    assert verdicts(str(a), str(nan))[("t", "acc")] == "missing"
    assert compare(str(a), str(no_task))[0] == 1
    assert verdicts(str(a), str(no_task))[("u", "acc")] == "missing"
    assert compare(str(a), str(no_task), "--allow-missing")[0] == 0
    (nan / "metrics.json").write_text((nan / "metrics.json").read_text().replace("null", "NaN", 1))
    assert compare(str(a), str(nan))[0] == 1  # a literal NaN in the file, too


def _acc_samples(scores: list[float | None]) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "index": i, "kind": "vqa",
             "failure": "boom" if s is None else None, "per_sample": {} if s is None else {"accuracy": s}}
            for i, s in enumerate(scores)]


def _acc_task(scores: list[float | None], n_samples: int | None = None) -> dict[str, Any]:
    ok = [s for s in scores if s is not None]
    failures = [{"id": f"q{i}", "error": "boom"} for i, s in enumerate(scores) if s is None]
    value = 100 * float(np.mean(ok)) if ok else None
    return {"metrics": {"accuracy": m(value, True, [value - 3, value + 3] if ok else None, len(ok))},
            "samples": _acc_samples(scores), "failures": failures, "n_samples": n_samples or len(scores)}


def test_failed_samples_count(tmp_path):
    rng = np.random.default_rng(0)
    scores = [float(x) for x in rng.choice([0.0, 1.0], size=300)]
    half_failed = [s if i % 2 == 0 else None for i, s in enumerate(scores)]  # 150 of 300 failed
    a = write_run(tmp_path, "a", {"vqa": _acc_task(scores)})
    b = write_run(tmp_path, "b", {"vqa": _acc_task(half_failed)})
    code, out = compare(str(a), str(b))
    assert code == 1 and "no regression" not in out
    assert verdicts(str(a), str(b))[("vqa", "failures")] == "regression"
    assert compare(str(a), str(a))[0] == 0


def test_unequal_sample_sets_refused_then_paired_on_the_same_samples(tmp_path):
    rng = np.random.default_rng(1)
    big = [float(x) for x in rng.choice([0.0, 1.0], size=1000, p=[0.4, 0.6])]
    small = big[:20]
    a = write_run(tmp_path, "a", {"vqa": _acc_task(big)})
    b = write_run(tmp_path, "b", {"vqa": _acc_task(small)})
    code, out = compare(str(a), str(b))
    assert code == 2 and "--force" in out and "n: base 1000, new 20" in out
    md = tmp_path / "cmp.md"
    code, out = compare(str(a), str(b), "--force", "--json", "--markdown", str(md))
    (v,) = [x for x in json.loads(out)["rows"] if x["metric"] == "accuracy"]
    # The delta is computed from the 20 matched samples, the same ones as its CI.
    assert v["n_paired"] == 20 and v["delta"] == 0 and v["ci_low"] <= v["delta"] <= v["ci_high"]
    assert v["verdict"] == "same" and "paired on 20 of 1000" in v["note"]
    text = md.read_text()
    assert "Protocol differences" in text and "| vqa | n | 1000 | 20 |" in text


def test_inconsistent_metrics_json_is_an_error_naming_the_metric(tmp_path):
    rng = np.random.default_rng(2)
    scores = [float(x) for x in rng.choice([0.0, 1.0], size=200)]
    a = write_run(tmp_path, "a", {"vqa": _acc_task(scores)})
    b = write_run(tmp_path, "b", {"vqa": _acc_task(scores)})
    data = json.loads((b / "metrics.json").read_text())
    data["tasks"]["vqa"]["metrics"]["accuracy"]["value"] /= 2  # halved, samples unchanged
    (b / "metrics.json").write_text(json.dumps(data))
    code, out = compare(str(a), str(b))
    assert code == 2 and "vqa/accuracy" in out and "disagree" in out
    assert len(out.strip().splitlines()) == 1


def test_different_protocols_refused_unless_forced(tmp_path):
    base = {"t": {"metrics": {"FID": m(10.0, False)}, "n_samples": 100}}
    a = write_run(tmp_path, "a", base)
    for field_path, value, shown in ((("dataset", "split"), "val2017", "split"),
                                     (("generation", "n_candidates"), 8, "candidates"),
                                     (("retrieval", "k"), 0, "k"),
                                     (("metrics",), {"fid": {"resolution": 512}}, "resolution"),
                                     (("version",), 2, "task version")):
        spec = json.loads(json.dumps(SPEC))
        node = spec
        for p in field_path[:-1]:
            node = node[p]
        node[field_path[-1]] = value
        b = write_run(tmp_path, f"b-{shown.replace(' ', '_')}", {"t": {**base["t"], "spec": spec}})
        code, out = compare(str(a), str(b))
        assert code == 2 and shown in out and "--force" in out, (shown, out)
        md = tmp_path / f"{shown}.md"
        code, _ = compare(str(a), str(b), "--force", "--markdown", str(md))
        assert code == 0 and "Protocol differences" in md.read_text() and shown in md.read_text()


# ---------------------------------------------------------------- issue 21's holes (each failed on the code before it)

def test_option_names_that_name_no_metric_are_refused(tmp_path):
    # The old code ignored them silently: --tolerance FID=0.5 on runs that report FD-demo allowed nothing.
    a = write_run(tmp_path, "a", {"t2i": {"metrics": {"FD-demo": m(1.0, False), "t2i_R@1": m(40.0, True)}}})
    for option, value in (("--tolerance", "FID=0.5"), ("--tolerance", "t2i/R@1=2"), ("--direction", "FID=lower"),
                          ("--tolerance", "other/FD-demo=1")):
        code, out = compare(str(a), str(a), option, value)
        assert code == 2 and f"{option} {value.split('=')[0]}" in out and "(metrics: FD-demo, failures, t2i_R@1)" in out, (value, out)
        assert len(out.strip().splitlines()) == 1
    assert compare(str(a), str(a), "--tolerance", "fd-demo=0.5", "--tolerance", "t2i/t2i_R@1=1",
                   "--tolerance", "failures=3")[0] == 0


def test_direction_cannot_override_a_recorded_one(tmp_path):
    # The old code let --direction '*=higher' turn an FD regression into an "improvement", exit 0.
    a = write_run(tmp_path, "a", {"t": {"metrics": {"FD-demo": m(1.0, False), "score": m(5.0, None)}}})
    b = write_run(tmp_path, "b", {"t": {"metrics": {"FD-demo": m(2.0, False), "score": m(5.0, None)}}})
    for value in ("*=higher", "FD-demo=higher", "t/FD-demo=lower"):
        code, out = compare(str(a), str(b), "--direction", value)
        assert code == 2 and "records higher_is_better" in out, (value, out)
    code, out = compare(str(a), str(b), "--direction", "score=higher")  # not recorded: allowed
    assert code == 1 and verdicts(str(a), str(b), "--direction", "score=higher")[("t", "FD-demo")] == "regression"


def test_json_is_one_object_with_the_overall_verdict(tmp_path):
    a = write_run(tmp_path, "a", {"t": {"metrics": {"acc": m(50.0, True)}}})
    b = write_run(tmp_path, "b", {"t": {"metrics": {"acc": m(40.0, True)}}})
    for base, new, verdict, code in ((a, a, "no regression", 0), (a, b, "regression", 1)):
        got, out = compare(str(base), str(new), "--json")
        data = json.loads(out)
        assert isinstance(data, dict) and got == code, out
        assert data["verdict"] == verdict and data["exit_code"] == code
        assert {(r["task"], r["metric"]) for r in data["rows"]} == {("t", "acc"), ("t", "failures")}


def test_a_missing_metric_or_an_all_failed_run_is_exit_1_not_a_protocol_refusal(tmp_path):
    # The metric's `extra` (how it was measured) exists on one side only: the old code called that a
    # protocol difference (exit 2) instead of a missing metric (exit 1).
    fd = {**m(1.0, False), "extra": {"encoder": "demo-v7", "resolution": None}}
    a = write_run(tmp_path, "a", {"t": {"metrics": {"FD-demo": fd, "acc": m(50.0, True)}}})
    b = write_run(tmp_path, "b", {"t": {"metrics": {"acc": m(50.0, True)}}})
    code, out = compare(str(a), str(b))
    assert code == 1 and "missing" in out, out
    assert verdicts(str(a), str(b))[("t", "FD-demo")] == "missing"
    # Every sample failed: no metric at all, every sample line a failure.
    lines = [{"id": f"s{i}", "index": i, "kind": "x", "failure": "boom", "per_sample": {}} for i in range(100)]
    dead = write_run(tmp_path, "dead", {"t": {"metrics": {}, "samples": lines, "n_samples": 100,
                                              "failures": [{"id": x["id"], "error": "boom"} for x in lines]}})
    code, out = compare(str(a), str(dead))
    assert code == 1, out
    v = verdicts(str(a), str(dead))
    assert v[("t", "acc")] == "missing" and v[("t", "failures")] == "regression"


def _caption_task(preds: list[str], refs: list[list[str]]) -> dict[str, Any]:
    """BLEU-1..4 entries as the captioning metric records them (pycocoevalcap's corpus score, its
    sentence scores per sample, extra.corpus_level), whitespace tokenization (no Java)."""
    from pycocoevalcap.bleu.bleu import Bleu

    ids = [f"c{i}" for i in range(len(preds))]
    corpus, sentence = Bleu(4).compute_score({i: r for i, r in zip(ids, refs)}, {i: [p] for i, p in zip(ids, preds)},
                                             verbose=0)
    metrics = {f"BLEU-{k + 1}": {**m(float(corpus[k]), True, None, len(ids)),
                                 "extra": {"corpus_level": True, "tokenize": "none"}} for k in range(4)}
    samples = [{"id": i, "index": k, "kind": "caption", "failure": None, "prediction": p, "references": r,
                "per_sample": {f"BLEU-{n + 1}": float(sentence[n][k]) for n in range(4)}}
               for k, (i, p, r) in enumerate(zip(ids, preds, refs))]
    spec = {**SPEC, "metrics": {"captioning": {"tokenize": "none", "spice": False}}}
    return {"metrics": metrics, "samples": samples, "spec": spec}


_REFS = [["a red circle on the left", "one red circle at the left"], ["a blue square at the top", "a small blue square"],
         ["two green triangles", "a pair of green triangles"], ["a yellow star in the middle", "one yellow star"]] * 5


def test_a_collapsed_model_is_a_regression_not_a_fault_of_the_base(tmp_path):
    # The collapsed model's BLEU-4 is ~1e-9 and so are its sentence BLEUs: the old absolute tolerance
    # took BLEU for a mean, then blamed the healthy base's files ("disagree", exit 2).
    healthy = write_run(tmp_path, "healthy", {"cap": _caption_task([r[0] for r in _REFS], _REFS)})
    collapsed = write_run(tmp_path, "collapsed", {"cap": _caption_task(["a"] * len(_REFS), _REFS)})
    code, out = compare(str(healthy), str(collapsed))
    assert code == 1 and "❌ regression" in out and "disagree" not in out, out
    assert verdicts(str(healthy), str(collapsed))[("cap", "BLEU-4")] == "regression"


def test_hand_edited_corpus_metric_is_refused(tmp_path):
    a = write_run(tmp_path, "a", {"cap": _caption_task([r[1] for r in _REFS], _REFS)})
    b = write_run(tmp_path, "b", {"cap": _caption_task([r[1] for r in _REFS], _REFS)})
    assert compare(str(a), str(b))[0] == 0
    data = json.loads((b / "metrics.json").read_text())
    data["tasks"]["cap"]["metrics"]["BLEU-4"]["value"] += 0.05  # a better number, the samples unchanged
    (b / "metrics.json").write_text(json.dumps(data))
    code, out = compare(str(a), str(b))
    assert code == 2 and "cap/BLEU-4" in out and "disagree" in out and len(out.strip().splitlines()) == 1
