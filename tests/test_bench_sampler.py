"""`cm3eval bench sampler --json` runs end to end on the tiny size and reports the agreed keys."""

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")


def test_bench_sampler_json():
    from evals.cli import app

    res = CliRunner().invoke(app, ["bench", "sampler", "--size", "tiny", "--new-tokens", "8", "--batches", "1,2",
                                   "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    for key in ("tokens_per_s", "transformers_tokens_per_s", "speedup_vs_transformers", "step_over_roofline"):
        assert out[key] > 0
    assert out["identical_greedy_tokens"] is True
    assert {r["batch"] for r in out["by_batch"]} == {1, 2}
