"""`evals.bank_path`: what a `retrieval.bank` value names (the checkpoint's bank, a folder, or a
folder under the data root), as the predictor resolves it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks
from cm3leon.errors import Cm3evalError
from evals import bank_path as B
from evals.predictor import ModelPredictor, PredictorSetupError


def test_the_three_kinds_of_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert B.resolve_bank("model", tmp_path) is None
    assert B.resolve_bank("data:banks/coco", tmp_path / "root") == tmp_path / "root" / "banks" / "coco"
    assert B.resolve_bank("data:/banks/coco/", tmp_path) == tmp_path / "banks" / "coco"
    assert B.resolve_bank("/abs/bank", None) == Path("/abs/bank")
    assert B.resolve_bank("~/bank", None) == tmp_path / "bank"


def test_a_data_relative_bank_without_a_data_root_is_one_line():
    with pytest.raises(B.BankPathError) as e:
        B.resolve_bank(f"data:{B.COCO_BANK}", None)
    assert "--data-root" in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, Cm3evalError)
    with pytest.raises(B.BankPathError, match="expected data:RELATIVE"):
        B.resolve_bank("data:", Path("/d"))


def test_a_missing_bank_names_the_folder_and_the_command_that_builds_it(tmp_path):
    value = f"data:{B.COCO_BANK}"
    path = B.resolve_bank(value, tmp_path)
    msg = B.missing_bank("coco-fid", value, path)
    assert str(path) in msg and "--retrieval-k 0" in msg and "--set retrieval.bank=DIR" in msg
    assert f"cm3eval bank build --coco-root {tmp_path} --encoder clip-vit-b-32 --out {path}" in msg


def _fake_predictor(bank_dir=None):
    return SimpleNamespace(bundle=SimpleNamespace(bank_dir=bank_dir))


def test_the_predictor_resolves_a_data_relative_bank_against_the_batch_data_root(tmp_path, monkeypatch):
    bank = tmp_path / "root" / "banks" / "b"
    bank.mkdir(parents=True)
    assert ModelPredictor._bank_dir(_fake_predictor(), "data:banks/b", tmp_path / "root") == bank
    with pytest.raises(PredictorSetupError, match="not found"):
        ModelPredictor._bank_dir(_fake_predictor(), "data:banks/b", tmp_path / "elsewhere")
    with pytest.raises(PredictorSetupError, match="--data-root"):
        ModelPredictor._bank_dir(_fake_predictor(), "data:banks/b", None)
    # without the engine's data root, task_fingerprint's fallback: $CM3EVAL_DATA_ROOT
    spec = tasks.apply_overrides(tasks.get("coco-fid"), {"retrieval.bank": "data:banks/b"})
    monkeypatch.setenv("CM3EVAL_DATA_ROOT", str(tmp_path / "root"))
    assert ModelPredictor._default_root(spec) == tmp_path / "root"
    monkeypatch.delenv("CM3EVAL_DATA_ROOT")
    assert ModelPredictor._default_root(spec) is None
    assert ModelPredictor._default_root(tasks.get("coco-fid")) is None  # "model": no data root needed
