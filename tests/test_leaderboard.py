"""Leaderboard: tidy rows from run folders, published baselines kept apart, sweeps, writers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from reports import cli as reports_cli
from reports.errors import ReportError
from reports.format import canonical_metric
from reports.leaderboard import collect_runs, find_sweeps, leaderboard, load_baselines, model_info, pivot
from reports.publish import to_markdown, write_leaderboard


def make_run(root: Path, name: str, model: str, tasks: dict[str, dict]) -> Path:
    """tasks: {task: {"metrics": {name: (value, lo, hi, n)}, "overrides": {...}, "spec": {...}}}."""
    run = root / name
    run.mkdir(parents=True)
    out = {}
    for task, t in tasks.items():
        (run / task).mkdir()
        spec = t.get("spec", {"name": task, "generation": {"cfg_scale": 1.0}, "retrieval": {"k": 2}})
        (run / task / "config.json").write_text(json.dumps(
            {"task": spec, "model": model, "overrides": t.get("overrides", {}), "hash": f"{name}-{task}"}))
        out[task] = {"metrics": {m: {"value": v, "ci": [lo, hi] if lo is not None else None, "n": n}
                                 for m, (v, lo, hi, n) in t["metrics"].items()},
                     "failures": [], "config_hash": f"{name}-{task}", "n_samples": 10}
    (run / "metrics.json").write_text(json.dumps({"run": {"model": model, "git_hash": "x"}, "tasks": out}))
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    caption = {"metrics": {"CIDEr": (1.242, 1.1, 1.4, 500), "BLEU-4": (0.31, None, None, 500)}}
    return [
        make_run(tmp_path, "cfg1", "zoo/demo", {"coco-fid": {"metrics": {"FID": (20.0, 19.0, 21.0, 1000)}},
                                                 "coco-caption": caption,
                                                 "vqav2": {"metrics": {"vqa_accuracy": (55.5, 54.0, 57.0, 800)}}}),
        make_run(tmp_path, "cfg3", "zoo/demo", {"coco-fid": {"metrics": {"FID": (12.0, 11.0, 13.0, 1000)},
                                                             "overrides": {"generation.cfg_scale": 3.0}}}),
        make_run(tmp_path, "cfg5", "zoo/demo", {"coco-fid": {"metrics": {"FID": (14.0, 13.0, 15.0, 1000)},
                                                             "overrides": {"generation": {"cfg_scale": 5}}}}),
        make_run(tmp_path, "other", "zoo/big", {"coco-fid": {"metrics": {"FID": (3.0, 2.5, 3.5, 1000)},
                                                              "overrides": {"generation.cfg_scale": 3.0}}}),
    ]


def test_baselines_match_the_paper():
    b = load_baselines()
    assert list(b.columns) == ["model", "task", "metric", "value", "source", "notes"]

    def val(model, task, metric):
        row = b[(b.model == model) & (b.task == task) & (b.metric == metric)]
        assert len(row) == 1, (model, task, metric)
        return float(row.value.iloc[0])

    assert val("CM3leon-7B (2 docs)", "coco-fid", "FID") == 4.88
    assert val("CM3leon-7B (0 docs)", "coco-fid", "FID") == 10.82
    assert val("Parti", "coco-fid", "FID") == 7.23
    assert val("Flamingo-9B", "coco-caption", "CIDEr") == 79.4
    assert val("SFT-CM3leon-7B", "vizwiz", "accuracy") == 37.6
    assert val("OpenFlamingo-9B", "vqav2", "accuracy") == 43.5
    assert b[b.model == "OpenFlamingo-9B"].task.tolist() == ["coco-caption", "vqav2"]  # no VizWiz/OKVQA
    assert len(b[b.task == "coco-fid"]) == 11
    assert b[b.task != "mjhq-fid"].source.str.contains("2309.02591").all()  # the CM3leon paper's tables
    assert val("Liquid (7B)", "mjhq-fid", "FID") == 5.47  # MJHQ-30K, clean-fid protocol (arXiv:2412.04332)


def test_collect_runs_is_tidy(runs):
    df = collect_runs(runs)
    assert len(df) == 1 + 2 + 1 + 1 + 1 + 1  # one row per (run, task, metric)
    r = df[(df.run == "cfg1") & (df.metric == "CIDEr")].iloc[0]
    assert r.value == 1.242 and (r.ci_low, r.ci_high) == (1.1, 1.4) and r.n == 500  # raw, as on disk
    assert r.model == "demo" and r.checkpoint == "zoo/demo" and r.settings_hash == "cfg1-coco-caption"
    assert math.isnan(df[df.metric == "BLEU-4"].ci_low.iloc[0])
    # Overridden keys become columns; runs that did not override get the spec's value.
    fid = df[df.task == "coco-fid"].set_index("run")
    assert fid["generation.cfg_scale"].to_dict() == {"cfg1": 1.0, "cfg3": 3.0, "cfg5": 5, "other": 3.0}
    assert "retrieval.k" not in df.columns  # never overridden: not a setting column


def test_published_rows_kept_apart_and_cider_scaled(runs):
    lb = leaderboard(collect_runs(runs))
    pub = lb[lb.source == "published"]
    meas = lb[lb.source == "measured"]
    assert set(lb.source) == {"measured", "published"}
    assert len(pub) == len(load_baselines()) and pub.run.eq("").all() and pub.ci_low.isna().all()
    assert "CM3leon-7B (2 docs)" not in set(meas.model)
    assert len(meas) == 7
    # Measured CIDEr on the paper's x100 scale, beside Flamingo's 79.4.
    cider = meas[meas.metric == "CIDEr"].iloc[0]
    assert cider.value == pytest.approx(124.2) and cider.ci_low == pytest.approx(110.0) and cider.scale == 100
    assert cider.unit == "x100"
    # One scale per metric family: BLEU-4 beside CIDEr is x100 too; VQA accuracy is already in %.
    assert meas[meas.metric == "BLEU-4"].value.iloc[0] == pytest.approx(31.0)
    assert meas[meas.metric == "accuracy"].value.iloc[0] == 55.5
    # vqa_accuracy lines up with the published "accuracy" column.
    assert canonical_metric("vqa_accuracy") == "accuracy"
    assert {"vqav2 / accuracy", "coco-caption / CIDEr"} <= set(pivot(lb).columns)
    # Within a task/metric: measured first (best first), then published (best first).
    fid = lb[(lb.task == "coco-fid") & (lb.metric == "FID")]
    assert fid.source.tolist() == ["measured"] * 4 + ["published"] * 11
    assert fid.value.iloc[:4].tolist() == [3.0, 12.0, 14.0, 20.0]
    assert fid.value.iloc[4:].is_monotonic_increasing
    assert leaderboard(collect_runs(runs), baselines=False).source.eq("measured").all()


def test_directions_are_read_from_the_runs_never_from_names(tmp_path):
    """Best-first order follows "higher_is_better" as metrics.json records it (the direction of
    every registered metric is tested in test_compare.py against the metric table)."""
    run = make_run(tmp_path, "a", "m", {"t": {"metrics": {"FID-like": (5.0, None, None, 10)}}})
    run2 = make_run(tmp_path, "b", "m", {"t": {"metrics": {"FID-like": (9.0, None, None, 10)}}})
    for r in (run, run2):
        data = json.loads((r / "metrics.json").read_text())
        data["tasks"]["t"]["metrics"]["FID-like"]["higher_is_better"] = True
        (r / "metrics.json").write_text(json.dumps(data))
    lb = leaderboard(collect_runs([run, run2]), baselines=False)
    assert lb.value.tolist() == [9.0, 5.0] and lb.higher_is_better.tolist() == [True, True]


def test_sweeps(runs, tmp_path):
    sweeps = find_sweeps(collect_runs(runs))
    assert [(s.task, s.metric, s.axis) for s in sweeps] == [("coco-fid", "FID", "generation.cfg_scale")]
    (label, rows), = sweeps[0].series  # zoo/big has one point only: not a line
    assert rows.run.tolist() == ["cfg1", "cfg3", "cfg5"] and rows._x.tolist() == [1.0, 3.0, 5.0]
    # Checkpoint sweep: steps of one training run share the model name.
    ckpts = [make_run(tmp_path / "ck", f"s{s}", f"out/train-a/step-{s}", {"vqav2": {"metrics": {"accuracy": (
        40.0 + s / 1000, None, None, 10)}}}) for s in (1000, 2000, 3000)]
    df = collect_runs(ckpts)
    assert df.model.eq("train-a").all() and df.step.tolist() == [1000, 2000, 3000]
    assert [(s.axis, len(s.series)) for s in find_sweeps(df)] == [("step", 1)]
    assert model_info({"name": "m", "path": "/x/ckpt_42"}) == ("m", "/x/ckpt_42", 42)


def test_writers(runs, tmp_path):
    lb = leaderboard(collect_runs(runs))
    paths = write_leaderboard(lb, tmp_path / "out")
    assert [p.name for p in paths] == ["leaderboard.csv", "leaderboard.md", "leaderboard.html"]
    back = pd.read_csv(paths[0])
    assert set(back.source) == {"measured", "published"} and len(back) == len(lb)
    md = paths[1].read_text()
    assert "## Measured" in md and "## Published" in md and "| Parti" in md and "124.2" in md
    assert md.index("## Measured") < md.index("## Published")
    html = paths[2].read_text()
    assert "<svg" in html and "coco-fid: FID vs generation.cfg_scale" in html
    assert '<tr class="published"><td>Parti</td>' in html
    assert to_markdown(lb[lb.source == "published"]).count("_(none)_") == 1  # no measured rows


def test_hostile_names_escaped_in_leaderboard_html(tmp_path):
    run = make_run(tmp_path, "evil", "<img src=x onerror=alert(1)>", {"t<b>": {"metrics": {"m</td>": (1.0, 0.5, 1.5, 3)}}})
    html = write_leaderboard(leaderboard(collect_runs([run]), baselines=False), tmp_path / "o", ["html"])[0].read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b>" not in html and "m</td>" not in html
    blob = html.split('id="cm3eval-data">', 1)[1].split("</script>", 1)[0]
    assert "</" not in blob and json.loads(blob)[0]["task"] == "t<b>"


def test_bad_input_errors_name_the_file(tmp_path, runs):
    with pytest.raises(ReportError, match="nope: not a run folder"):
        collect_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty/metrics\.json: file not found"):
        collect_runs([tmp_path / "empty"])
    (runs[0] / "coco-fid" / "config.json").write_text("[1, 2")
    with pytest.raises(ReportError, match=r"coco-fid/config\.json: malformed JSON"):
        collect_runs(runs)
    (runs[1] / "metrics.json").write_text(json.dumps({"tasks": {"t": {"metrics": {"FID": 3}}}}))
    with pytest.raises(ReportError, match=r"cfg3/metrics\.json: tasks\.t\.metrics\.FID must be an object"):
        collect_runs(runs[1:])
    bad = tmp_path / "b.csv"
    bad.write_text("model,task,value\nx,y,1\n")
    with pytest.raises(ReportError, match=r"b\.csv: missing column\(s\) metric, source, notes"):
        load_baselines(bad)


def test_cli_leaderboard(runs, tmp_path):
    app = typer.Typer()
    app.command("leaderboard")(reports_cli.leaderboard)
    app.command("report")(reports_cli.report)
    r = CliRunner().invoke(app, ["leaderboard", *map(str, runs), "--out", str(tmp_path / "lb"), "--format", "all"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "lb").iterdir()) == ["leaderboard.csv", "leaderboard.html", "leaderboard.md", "leaderboard.tex"]
    r = CliRunner().invoke(app, ["leaderboard", str(runs[0]), "--no-baselines", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {x["source"] for x in rows} == {"measured"} and len(rows) == 4
    r = CliRunner().invoke(app, ["leaderboard", str(runs[0])])
    assert r.exit_code == 0 and "## Published" in r.output
    r = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "missing")])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
