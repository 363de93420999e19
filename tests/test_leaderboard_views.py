"""The leaderboard a researcher reads (issue 21): one table per task with direction arrows and
the scale in the header, every off-protocol row marked (an n=2 --limit VQA row beside
Flamingo), partial/failed/in-progress runs marked and never ranked above a complete one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reports.leaderboard import collect_runs, leaderboard, task_tables
from reports.publish import to_latex, to_markdown, write_leaderboard


def vqa_run(folder: Path, model: str, acc: float | None, *, n: int = 4, failed: int = 0,
            limit: int | None = None) -> Path:
    (folder / "vqav2").mkdir(parents=True)
    spec = {"name": "vqav2", "version": 1, "dataset": {"split": "val2014"}, "prompt": {"k_shot": 0},
            "generation": {"greedy": True}, "limit": limit}
    overrides = {"limit": limit} if limit else {}
    (folder / "vqav2" / "config.json").write_text(json.dumps({"task": spec, "model": model, "overrides": overrides}))
    metrics = {} if acc is None else {"accuracy": {"value": acc, "ci": [acc - 5, acc + 5], "n": n - failed,
                                                   "higher_is_better": True}}
    entry = {"metrics": metrics, "failures": [{"id": f"q{i}", "error": "boom"} for i in range(failed)],
             "n_samples": n, "n_failed": failed, "task_version": 1, "limit": limit}
    (folder / "metrics.json").write_text(json.dumps({"run": {"model": model}, "tasks": {"vqav2": entry}}))
    return folder


def test_n2_vqa_row_is_marked_off_protocol_beside_flamingo(tmp_path):
    small = vqa_run(tmp_path / "small", "zoo/small", 50.0, n=2, limit=2)
    lb = leaderboard(collect_runs([small]))
    row = lb[(lb.source == "measured") & (lb.metric == "accuracy")].iloc[0]
    assert row.comparable is False and "--limit 2 subset" in row.notes
    (table,) = [t for t in task_tables(lb) if t.task == "vqav2"]
    assert "accuracy (%) ↑" in table.headers
    mine = table.rows[table.classes.index("measured complete")]
    assert mine[table.headers.index("accuracy (%) ↑")] == "50 †" and "--limit 2 subset" in mine[-1]
    flamingo = next(r for r in table.rows if r[0] == "Flamingo-9B")
    assert "†" not in flamingo[table.headers.index("accuracy (%) ↑")]
    md = to_markdown(lb)
    assert "## vqav2" in md and "50 †" in md


def test_partial_and_failed_runs_are_marked_and_never_ranked_above_a_complete_one(tmp_path):
    full = vqa_run(tmp_path / "full", "zoo/full", 60.0)
    partial = vqa_run(tmp_path / "partial", "zoo/partial", 90.0, failed=1)  # 1 of 4 failed: a higher mean
    dead = vqa_run(tmp_path / "dead", "zoo/dead", None, failed=4)
    running = vqa_run(tmp_path / "running", "zoo/running", 70.0)
    (running / "okvqa").mkdir()  # a second task started, no metrics.json entry yet
    (running / "okvqa" / "config.json").write_text(json.dumps({"task": {"name": "okvqa"}, "model": "zoo/running"}))
    lb = leaderboard(collect_runs([full, partial, dead, running]), baselines=False)
    vqa = lb[lb.task == "vqav2"]
    assert vqa.run.tolist() == ["running", "full", "partial", "dead"]  # complete (ranked) first
    assert vqa["rank"].tolist()[:2] == [1, 2] and vqa["rank"].isna().tolist()[2:] == [True, True]
    assert vqa.status.tolist() == ["complete", "complete", "partial", "failed"]
    assert "1 of 4 samples failed" in vqa.notes.iloc[2] and "4 of 4 samples failed" in vqa.notes.iloc[3]
    (vqa_table,) = [t for t in task_tables(leaderboard(collect_runs([full, partial, dead]))) if t.task == "vqav2"]
    statuses = [r[2] for r in vqa_table.rows]  # every run above the papers' rows, complete ones first
    assert statuses[:3] == ["complete", "partial", "failed"] and set(statuses[3:]) == {"published"}
    ok = lb[lb.task == "okvqa"]
    assert ok.status.tolist() == ["in progress"] and ok.metric.tolist() == [""]
    paths = write_leaderboard(lb, tmp_path / "lb", ["csv", "md", "html", "tex"])
    md = paths[1].read_text()
    assert "| dead | failed |" in md and "| partial | partial |  | 90 |" in md and "in progress" in md
    html = paths[2].read_text()
    assert '<tr class="measured partial">' in html and '<tr class="measured failed">' in html
    tex = to_latex(lb)
    assert "dead" in tex and r"accuracy (\%) $\uparrow$" in tex and "↑" not in tex.split("\n", 2)[2]


def test_every_caption_metric_on_one_scale_with_its_unit(tmp_path):
    (tmp_path / "c" / "coco-caption").mkdir(parents=True)
    metrics = {m: {"value": v, "ci": None, "n": 5, "higher_is_better": True}
               for m, v in (("CIDEr", 1.25), ("BLEU-4", 0.3), ("METEOR", 0.25))}
    entry = {"metrics": metrics, "failures": [], "n_samples": 5}
    (tmp_path / "c" / "metrics.json").write_text(json.dumps({"run": {"model": "m"}, "tasks": {"coco-caption": entry}}))
    lb = leaderboard(collect_runs([tmp_path / "c"]))
    (t,) = [t for t in task_tables(lb) if t.task == "coco-caption"]
    assert t.headers[4] == "CIDEr (x100) ↑"  # the papers' metric leads
    assert {"BLEU-4 (x100) ↑", "METEOR (x100) ↑"} <= set(t.headers)
    mine = t.rows[0]
    assert mine[4].startswith("125") and "30" in mine and "25" in mine  # † here: shots not recorded
    assert next(r for r in t.rows if r[0] == "Flamingo-9B")[4] == "79.4"


def test_a_specs_own_limit_is_its_protocol_not_a_deviation(tmp_path):
    run = vqa_run(tmp_path / "r", "zoo/m", 50.0, n=2, limit=2)
    cfg = json.loads((run / "vqav2" / "config.json").read_text())
    cfg["overrides"] = {}  # limit 2 came with the spec (as coco-fid's 30000 does), not from --limit
    (run / "vqav2" / "config.json").write_text(json.dumps(cfg))
    row = leaderboard(collect_runs([run])).query("source == 'measured'").iloc[0]
    assert "--limit" not in row.notes


@pytest.mark.parametrize("decoding,marked", [("ar", False), ("jacobi", True)])
def test_a_decoding_mode_that_changes_tokens_is_a_deviation(tmp_path, decoding, marked):
    run = vqa_run(tmp_path / "r", "zoo/m", 50.0)
    cfg = json.loads((run / "vqav2" / "config.json").read_text())
    cfg["task"]["generation"]["decoding"] = decoding
    (run / "vqav2" / "config.json").write_text(json.dumps(cfg))
    row = leaderboard(collect_runs([run])).query("source == 'measured'").iloc[0]
    assert ("decoding jacobi" in row.notes) is marked


def test_compare_prints_caption_metrics_on_the_same_scale():
    from reports.compare import Verdict, to_markdown

    v = Verdict("coco-caption", "CIDEr", 1.20, 1.25, 0.05, 0.01, 0.09, "paired bootstrap", 500, 0.0, True,
                "improvement")
    row = next(line for line in to_markdown([v], "a", "b").splitlines() if line.startswith("| coco-caption"))
    assert "CIDEr (x100) ↑" in row and r"| 120 | 125 | +5 | \[1, 9\] (paired bootstrap)" in row


def test_the_command_lists_every_run_of_a_runs_folder_marked(tmp_path):
    import typer
    from typer.testing import CliRunner

    from reports import cli as reports_cli

    runs = tmp_path / "runs"
    vqa_run(runs / "full", "zoo/full", 60.0)
    vqa_run(runs / "partial", "zoo/partial", 90.0, failed=1)
    vqa_run(runs / "dead", "zoo/dead", None, failed=4)
    started = runs / "started" / "vqav2"  # killed before its first task was scored: no metrics.json
    started.mkdir(parents=True)
    (started / "config.json").write_text(json.dumps({"task": {"name": "vqav2"}, "model": "zoo/started"}))
    (runs / "empty").mkdir()
    app = typer.Typer()
    app.command("leaderboard")(reports_cli.leaderboard)
    app.command("report")(reports_cli.report)
    r = CliRunner().invoke(app, ["leaderboard", *map(str, sorted(runs.iterdir())), "--no-baselines"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.split("## vqav2", 1)[1].split("##", 1)[0].splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[1] for row in rows[1:]] == ["full", "partial", "dead", "started"]
    assert "| full | complete | 1 | 60 |" in rows[1]
    assert "| partial | partial |  | 90 |" in rows[2] and "1 of 4 samples failed" in rows[2]
    assert "| dead | failed |" in rows[3] and "4 of 4 samples failed" in rows[3]
    assert "| started | in progress |" in rows[4]
    assert f"skipped {runs / 'empty'}: no metrics.json" in r.output


def test_a_limit_the_papers_n_covers_is_compared_by_n(tmp_path):
    """coco-fid's published rows state n=30000: --limit 30000 is the protocol, --limit 4 is n=4."""
    def fid_run(folder: Path, n: int) -> Path:
        (folder / "coco-fid").mkdir(parents=True)
        spec = {"name": "coco-fid", "dataset": {"split": "val2014"}, "generation": {"n_candidates": 8},
                "retrieval": {"enabled": True, "k": 2}, "prompt": {"k_shot": 0}, "metrics": {"fid": {"resolution": 256}}}
        (folder / "coco-fid" / "config.json").write_text(json.dumps(
            {"task": spec, "model": "m", "overrides": {"limit": n}}))
        entry = {"metrics": {"FID": {"value": 9.0, "ci": None, "n": n, "higher_is_better": False}},
                 "failures": [], "n_samples": n}
        (folder / "metrics.json").write_text(json.dumps({"run": {"model": "m"}, "tasks": {"coco-fid": entry}}))
        return folder

    lb = leaderboard(collect_runs([fid_run(tmp_path / "full", 30000), fid_run(tmp_path / "small", 4)]))
    meas = lb[lb.source == "measured"].set_index("run")
    assert meas.loc["full", "comparable"] is True and meas.loc["small", "comparable"] is False
    assert "n=4 (published: 30000)" in meas.loc["small", "notes"] and "--limit" not in meas.loc["small", "notes"]
