"""`from evals import evaluate`: the README's example run on the demo model, and the errors a
caller gets instead of an exit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import fixtures
from cm3leon.errors import Cm3evalError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "from evals import evaluate" in b]
    return code


def test_readme_example_runs_on_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)  # the example as documented
    result = scope["result"]
    on_disk = json.loads((tmp_path / "runs" / "demo-python" / "metrics.json").read_text())
    assert result.metrics == {t: e["metrics"] for t, e in on_disk["tasks"].items()}
    assert result.metrics["shapes-vqa"]["accuracy"]["n"] == 4 and result.exit_code == 0
    assert result.run_dir == Path("runs/demo-python") and result.report == result.run_dir / "report.html"
    assert result.report.is_file()
    assert on_disk["run"]["commands"] == [["evals.evaluate", "shapes-vqa", "--model", "demo", "--out",
                                           "runs/demo-python", "--limit", "4"]]
    assert str(result.metrics["shapes-vqa"]["accuracy"]["value"]) in capsys.readouterr().out


def test_errors_are_raised_not_exits(tmp_path, monkeypatch):
    from evals import evaluate
    from evals.cli.api import EvaluationIncomplete

    with pytest.raises(Cm3evalError, match="unknown task or suite 'no-such-task'") as e:
        evaluate("no-such-task", model="demo", out=tmp_path / "x")
    assert e.value.exit_code == 2
    with pytest.raises(Cm3evalError, match="generation.top_k"):
        evaluate("shapes-vqa", model="demo", out=tmp_path / "x", settings={"generation.top_k": 0})
    # every sample fails: exit code 1 as an exception carrying the finished run
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", "300001000,300001001")
    with pytest.raises(EvaluationIncomplete) as e:
        evaluate("shapes-vqa", out=tmp_path / "f", limit=2, predictor_factory=fixtures.make_echo)
    assert e.value.exit_code == 1 and "2 of 2 samples failed" in str(e.value)
    assert e.value.result.run_dir == tmp_path / "f" and (tmp_path / "f" / "metrics.json").is_file()
    result = evaluate("shapes-vqa", out=tmp_path / "f", limit=2, predictor_factory=fixtures.make_echo, check=False)
    assert result.exit_code == 1 and result.metrics["shapes-vqa"] == {}


def test_a_sweep_returns_one_evaluation_per_point(tmp_path):
    from evals import evaluate

    result = evaluate(["shapes-vqa"], out=tmp_path / "s", limit=2, sweep={"generation.max_new_tokens": [4, 8]},
                      predictor_factory=fixtures.make_echo)
    assert sorted(result.sweep) == ["max_new_tokens=4", "max_new_tokens=8"] and result.run_dir == tmp_path / "s"
    assert all(p.report is not None and "accuracy" in p.metrics["shapes-vqa"] for p in result.sweep.values())
    assert (tmp_path / "s" / "leaderboard.md").is_file()
