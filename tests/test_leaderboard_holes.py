"""leaderboard, as a user runs it on a runs/ folder: one regression test per hole issue 14 found
(sweep parents and failed runs exited 2; a base run beside sweep runs crashed under pandas 3;
a 4-sample val2017 FID sat beside the paper's numbers unmarked; raw HTML in leaderboard.md).

Only the command (reports.cli.leaderboard) is used, so the same file runs against any version,
and on pandas 2 and 3 alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import typer
from typer.testing import CliRunner

from reports import cli as reports_cli


def spec(task: str, **over: Any) -> dict[str, Any]:
    s = {"name": task, "version": 1, "dataset": {"split": "val2014"},
         "generation": {"cfg_scale": 1.0, "image_cfg_scale": None, "n_candidates": 8},
         "retrieval": {"enabled": True, "k": 2}, "prompt": {"k_shot": 0},
         "metrics": {"fid": {"resolution": 256}}}
    for path, v in over.items():
        node = s
        *head, last = path.split("__")
        for p in head:
            node = node[p]
        node[last] = v
    return s


def write_run(folder: Path, model: str, fid: float, *, overrides: dict | None = None, n: int = 30000,
              task_spec: dict | None = None, task: str = "coco-fid") -> Path:
    (folder / task).mkdir(parents=True)
    (folder / task / "config.json").write_text(json.dumps(
        {"task": task_spec or spec(task), "model": model, "overrides": overrides or {}, "hash": folder.name}))
    entry = {"metrics": {"FID": {"value": fid, "ci": [fid - 0.5, fid + 0.5], "n": n, "higher_is_better": False}},
             "failures": [], "n_samples": n, "task_version": 1}
    (folder / "metrics.json").write_text(json.dumps({"run": {"model": model}, "tasks": {task: entry}}))
    return folder


def leaderboard(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command("leaderboard")(reports_cli.leaderboard)
    app.command("report")(reports_cli.report)
    r = CliRunner().invoke(app, ["leaderboard", *args])
    return r.exit_code, r.output


def make_runs(root: Path) -> Path:
    """runs/: a base run, a sweep parent with two points, a run that overrides a setting the
    others leave unset (None), and the empty folder a failed run leaves."""
    runs = root / "runs"
    write_run(runs / "base", "zoo/demo", 20.0)
    for cfg, fid in ((2.0, 15.0), (3.0, 12.0)):
        write_run(runs / "sweep" / f"cfg_scale={cfg}", "zoo/demo", fid, overrides={"generation.cfg_scale": cfg})
    write_run(runs / "icfg", "zoo/demo", 18.0, overrides={"generation.image_cfg_scale": 1.5})
    (runs / "failed").mkdir()
    return runs


def test_runs_folder_with_a_sweep_a_failed_run_and_a_base_run(tmp_path):
    runs = make_runs(tmp_path)
    args = [str(p) for p in sorted(runs.iterdir())]  # what `runs/*` expands to
    code, out = leaderboard(*args, "--out", str(tmp_path / "lb"), "--format", "all")
    assert code == 0, out
    assert f"skipped {runs / 'failed'}: no metrics.json" in out  # listed, not fatal
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    for label in ("base", "icfg", "sweep/cfg\\_scale=2.0", "sweep/cfg\\_scale=3.0"):
        assert label in md, label
    html = (tmp_path / "lb" / "leaderboard.html").read_text()
    assert "coco-fid: FID vs generation.cfg_scale" in html  # base + sweep points: one line chart
    csv = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert sorted(csv[csv.source == "measured"].value) == [12.0, 15.0, 18.0, 20.0]
    assert (tmp_path / "lb" / "leaderboard.tex").exists()
    # Only unfinished folders: a one-line usage error.
    code, out = leaderboard(str(runs / "failed"))
    assert code == 2 and "no finished run" in out


def test_rows_not_measured_under_the_published_protocol_are_marked(tmp_path):
    small = write_run(tmp_path / "small", "zoo/demo", 41.0, n=4,
                      task_spec=spec("coco-fid", dataset__split="val2017", generation__n_candidates=1))
    full = write_run(tmp_path / "full", "zoo/big", 6.0)
    code, out = leaderboard(str(small), str(full), "--out", str(tmp_path / "lb"), "--format", "all")
    assert code == 0, out
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| zoo/demo") or line.startswith("| demo"))
    assert "41 †" in row
    assert "n=4 (published: 30000)" in md and "split val2017 (published: val2014)" in md
    assert "1 candidates (published: 8)" in md
    assert "† measured under another protocol" in md
    full_row = next(line for line in md.splitlines() if line.startswith("| big") and "| 6 " in line)
    assert "†" not in full_row  # 30K prompts, val2014, 8 candidates, k=2, 256 px: the paper's protocol
    csv = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    meas = csv[csv.source == "measured"].set_index("model")
    assert bool(meas.loc["demo", "comparable"]) is False and bool(meas.loc["big", "comparable"]) is True
    assert "val2017" in meas.loc["demo", "protocol"] and "n=4" in meas.loc["demo", "protocol"]
    tex = (tmp_path / "lb" / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"$^\dagger$" in tex


def test_every_string_is_escaped_in_every_format(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    run = write_run(tmp_path / "[x](javascript:alert(1))", evil, 10.0)
    latex_run = write_run(tmp_path / "a&b_c%d$e#f", "=HYPERLINK(\"http://x\")", 11.0)
    code, out = leaderboard(str(run), str(latex_run), "--no-baselines", "--out", str(tmp_path / "lb"),
                            "--format", "all")
    assert code == 0, out
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "[x](" not in md and "\\[x\\]" in md
    html = (tmp_path / "lb" / "leaderboard.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    tex = (tmp_path / "lb" / "leaderboard.tex").read_text()
    assert r"a\&b\_c\%d\$e\#f" in tex and "a&b_c" not in tex and r"\textless{}img" in tex
    csv = (tmp_path / "lb" / "leaderboard.csv").read_text()
    assert "'=HYPERLINK" in csv and ",=HYPERLINK" not in csv and ',"=HYPERLINK' not in csv
