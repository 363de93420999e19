"""Regression tests for the run-engine holes of issue 21: each one fails on the engine before
the fix, and each failure is one line with the exit code of the contract.

- generation bounds: every documented bound of the sampler's settings refused at plan time
  (`generation.cfg_scale=-1` ran)
- FID/FD with fewer than 2 samples: refused by the plan when --limit says so, else the metric is
  recorded as not computed (exit 3) and the later tasks still run
- a NaN prediction in a sample line, a 63k-token caption: per-sample failures, no traceback
- --overwrite keeps the samples of an unchanged config
- a PNG with a flipped byte (same size) is regenerated on resume (content digest in the line)
- the disk estimate within 1.5x of what a run writes
- a retrieval bank edited in the middle (same size) is noticed on resume; config.json records
  one digest for the bank
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import fixtures
from cm3leon.sampling_config import BOUNDS, SamplingConfig
from evals.cli import main
from tasks.spec import SpecError, apply_overrides

import tasks


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- generation bounds
def test_negative_cfg_scale_is_refused_by_the_plan_in_one_line(tmp_path, capsys):
    code = main(["run", "shapes-fid", "--limit", "2", "--set", "generation.cfg_scale=-1",
                 "--out", str(tmp_path / "r")], predictor_factory=fixtures.make_echo)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "generation.cfg_scale: expected a number >= 0, got -1.0" in line
    assert not (tmp_path / "r").exists()  # refused before anything ran


# one value outside each documented bound (the spec's words, the sampler's check)
OUTSIDE = {"greedy": "'yes'", "temperature": "nan", "top_k": "0", "top_p": "1.5", "cfg_scale": "-0.5",
           "image_cfg_scale": "-2", "cdk_alpha": "0", "cdk_k": "0", "mix_cdk_fraction": "1.5", "n_candidates": "0"}


@pytest.mark.parametrize("field", sorted(BOUNDS))
def test_every_sampling_bound_is_checked_by_spec_and_sampler(field):
    assert set(OUTSIDE) == set(BOUNDS)  # a new bound needs its case here
    task = "magicbrush-edit" if field == "image_cfg_scale" else "shapes-fid"
    with pytest.raises(SpecError) as e:
        apply_overrides(tasks.get(task), {f"generation.{field}": OUTSIDE[field], "generation.cdk_alpha": "0.5"}
                        if field == "mix_cdk_fraction" else {f"generation.{field}": OUTSIDE[field]})
    msg = str(e.value)
    assert f"generation.{field}" in msg and f"expected {BOUNDS[field][1]}" in msg and "\n" not in msg
    value = {"'yes'": "yes", "nan": math.nan}.get(OUTSIDE[field], None)
    if value is None:
        value = float(OUTSIDE[field]) if "." in OUTSIDE[field] or field.endswith(("scale", "alpha")) \
            else int(OUTSIDE[field])
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingConfig(**{field: value, **({"cdk_alpha": 0.5} if field == "mix_cdk_fraction" else {})}).validate()
