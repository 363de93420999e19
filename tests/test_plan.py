"""The plan phase (evals/plan.py): every setting, data root, weights file and model capability is
checked before any model loads, each failure is one line naming the setting (exit 2), and the
command-line values are typed once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import fixtures
import tasks
import tasks.spec
from chameleon_fixture import hf_folder, meta_vq  # noqa: F401 (pytest fixtures)
from cm3leon.checkpoint import inspect
from evals import plan
from evals.cli import main
from evals.plan import PlanError, RunRequest, build_plan


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return fixtures.write_mini_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """No Inception weights anywhere the FID metric looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("CM3EVAL_INCEPTION_WEIGHTS", raising=False)


def _never(**kwargs):
    raise AssertionError("the predictor (the model) was built although the plan should have failed")


def _fails_before_the_model(args: list[str], capsys) -> str:
    """exit 2 with one line, and the model never built (the factory raises if it is called)."""
    code = main(args, predictor_factory=_never)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------- the four refusals of issue 12
def test_temperature_zero_fails_before_the_model(tmp_path, capsys):
    err = _fails_before_the_model(["run", "shapes-fid", "--out", str(tmp_path), "--set",
                                   "generation.temperature=0"], capsys)
    assert "generation.temperature: expected a number > 0" in err


def test_unknown_metric_fails_before_the_model(tmp_path, capsys):
    spec = tasks.get("shapes-vqa").to_dict()
    spec.update(name="my-vqa", metrics={"bleu": {}})
    import yaml

    (tmp_path / "my-vqa.yaml").write_text(yaml.safe_dump(spec))
    err = _fails_before_the_model(["run", str(tmp_path / "my-vqa.yaml"), "--model", "demo", "--out",
                                   str(tmp_path / "r")], capsys)
    assert "metrics.bleu: unknown metric" in err


def test_missing_data_root_fails_before_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CM3EVAL_DATA_ROOT", raising=False)
    err = _fails_before_the_model(["run", "coco-caption", "--model", "m", "--data-root", str(tmp_path / "nope")],
                                  capsys)
    assert f"data root {tmp_path / 'nope'} does not exist" in err and "expected layout" in err
    err = _fails_before_the_model(["run", "coco-caption", "--model", "m"], capsys)
    assert "no data root; pass --data-root DIR (or set CM3EVAL_DATA_ROOT)" in err
    (tmp_path / "empty").mkdir()
    err = _fails_before_the_model(["run", "coco-caption", "--model", "m", "--data-root", str(tmp_path / "empty")],
                                  capsys)
    assert "has no annotations/dataset_coco.json" in err


def test_missing_weights_file_fails_before_the_model(tmp_path, capsys, coco_root, no_inception):
    err = _fails_before_the_model(["run", "coco-fid", "--model", "m", "--data-root", str(coco_root),
                                   "--out", str(tmp_path / "r")], capsys)
    assert "Inception" in err and "not found" in err and "metrics.fid.weights" in err
    err = _fails_before_the_model(["run", "coco-fid", "--model", "m", "--data-root", str(coco_root),
                                   "--set", f"metrics.fid.weights={tmp_path / 'w.pth'}"], capsys)
    assert str(tmp_path / "w.pth") in err


# ----------------------------------------------------------------------------- capabilities (no weights read)
def test_chameleon_without_decoder_bank_or_encoder_is_refused_with_the_flag(tmp_path, capsys, coco_root,
                                                                           hf_folder, meta_vq, monkeypatch):  # noqa: F811
    import cm3leon.checkpoint

    monkeypatch.setattr(cm3leon.checkpoint, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"present")
    # the encoder-in-the-model settings (the registry's defaults name CLIP files instead)
    base = ["run", "coco-fid", "--model", str(hf_folder), "--data-root", str(coco_root), "--out",
            str(tmp_path / "r"), "--set", f"metrics.fid.weights={weights}", "--set", "retrieval.bank=model",
            "--set", "retrieval.encoder=model", "--set", "generation.scorer=model"]

    def refused(*extra: str) -> str:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "no VQ decoder" in refused() and "--vq PATH" in refused()
    assert "retrieval.bank=model" in refused("--vq", str(meta_vq))
    assert "generation.scorer=model" in refused("--vq", str(meta_vq), "--retrieval-k", "0")
    err = refused("--vq", str(meta_vq), "--set", f"retrieval.bank={tmp_path / 'bank'}")
    assert "no such folder" in err and "cm3eval bank build" in err
    (tmp_path / "bank").mkdir()
    assert "retrieval.encoder=model" in refused("--vq", str(meta_vq), "--set", f"retrieval.bank={tmp_path / 'bank'}")


def test_capabilities_from_the_checkpoint_info():
    demo = inspect("demo")
    fid = tasks.apply_overrides(tasks.get("coco-fid"), {"retrieval.bank": "model", "retrieval.encoder": "model",
                                                        "generation.scorer": "model"})
    plan.check_capabilities(fid, demo)  # the demo ships a decoder, an encoder and a bank
    plan.check_capabilities(tasks.get("coco-caption"), dataclasses.replace(demo, has_vq_decoder=False))
    with pytest.raises(Exception, match="--vq PATH"):
        plan.check_capabilities(fid, dataclasses.replace(demo, has_vq_decoder=False))
    with pytest.raises(PlanError, match="ships no bank/"):
        plan.check_capabilities(fid, dataclasses.replace(demo, has_bank=False))
    no_enc = dataclasses.replace(demo, has_encoder=False)
    with pytest.raises(PlanError, match="retrieval.encoder=model"):
        plan.check_capabilities(fid, no_enc)
    lm = tasks.apply_overrides(fid, {"retrieval.enabled": "false", "generation.scorer": "lm"})
    plan.check_capabilities(lm, no_enc)  # the decoder reranks itself: no encoder needed
    one = tasks.apply_overrides(fid, {"retrieval.enabled": "false", "generation.n_candidates": "1"})
    plan.check_capabilities(one, no_enc)  # nothing to rerank
    clip = dataclasses.replace(one, metrics={"clip_score": {"encoder": "model"}})
    with pytest.raises(PlanError, match="metrics.clip_score.encoder=model"):
        plan.check_capabilities(clip, no_enc)


# ----------------------------------------------------------------------------- plans
def test_plan_of_a_sweep(tmp_path, coco_root):
    req = RunRequest(("coco-caption", "vqav2"), sets=("generation.max_new_tokens=7",),
                     sweeps=("generation.top_k=5,10", "limit=2,3"), model="m", data_root=coco_root,
                     out=tmp_path / "s", inspect_model=False)
    with pytest.raises(Exception, match="has no annotations/v2_OpenEnded"):  # vqav2's files are not in coco_root
        build_plan(req)
    p = build_plan(dataclasses.replace(req, names=("coco-caption",)))
    assert [r.out.name for r in p.runs] == ["top_k=5,limit=2", "top_k=5,limit=3", "top_k=10,limit=2",
                                            "top_k=10,limit=3"]
    r = p.runs[-1]
    assert r.overrides == {"generation.max_new_tokens": 7, "generation.top_k": 10, "limit": 3}
    (t,) = r.tasks
    assert t.spec.generation.top_k == 10 and t.sampling.top_k == 10 and t.data_root == coco_root
    assert p.max_failures == 0.01 and p.model == "m" and p.checkpoint is None


def test_command_line_values_are_typed_once(monkeypatch):
    calls = []
    real = tasks.spec.parse_value
    monkeypatch.setattr(tasks.spec, "parse_value", lambda raw, tp, key: calls.append(key) or real(raw, tp, key))
    ov = plan.collect_overrides(["generation.top_p=0.5"], {"cfg_scale": 2.5, "retrieval_k": 2, "candidates": 4})
    assert ov == {"generation.top_p": "0.5", "generation.cfg_scale": 2.5, "retrieval.k": 2,
                  "generation.n_candidates": 4, "retrieval.enabled": True}
    (spec,) = plan.resolve_specs(["coco-fid"], ov)
    assert spec.generation.cfg_scale == 2.5 and spec.sampling_config().cfg_scale == 2.5
    assert spec.retrieval.k == 2 and spec.retrieval.enabled is True and spec.generation.top_p == 0.5
    assert set(calls) == {"generation.top_p"}  # the typed options never go back through a string


def test_model_is_required_outside_the_demo_suite():
    assert plan.resolve_model(["shapes-fid", "shapes-vqa"], None) == "demo"
    assert plan.resolve_model(["coco-fid"], "/ckpt") == "/ckpt"
    with pytest.raises(PlanError, match="--model is required for coco-fid, vqav2"):
        plan.resolve_model(["shapes-fid", "coco-fid", "vqav2"], None)


@pytest.mark.parametrize("text, value", [("1%", 0.01), ("0.05", 0.05), ("100%", 1.0), ("0", 0.0)])
def test_max_failures(text, value):
    assert plan.parse_max_failures(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "-1%", "x", "101%"])
def test_max_failures_refused(text):
    with pytest.raises(PlanError, match="--max-failures"):
        plan.parse_max_failures(text)


def test_demo_plan_with_the_real_checkpoint(tmp_path):
    p = build_plan(RunRequest(("demo",), out=tmp_path / "d"))
    assert p.model == "demo" and p.checkpoint.has_vq_decoder
    assert [t.spec.name for t in p.runs[0].tasks] == tasks.suites()["demo"]


def test_tensor_parallel_is_checked_before_the_model(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(PlanError, match="--tp 2: needs 2 ranks per model copy"):
        plan.check_tensor_parallel(2, inspect("demo"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(Exception, match="not a multiple of tp=2"):
        plan.check_tensor_parallel(2, inspect("demo"))


def test_a_usage_error_answers_without_importing_torch():
    """`--set generation.temperature=0` is refused by the spec layer before the checkpoint is
    inspected: torch (seconds to import) and numpy are never loaded, no run folder is made."""
    import subprocess
    import sys

    code = ("import sys; from evals.cli import main; "
            "rc = main(['run', 'shapes-fid', '--set', 'generation.temperature=0', '--out', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules, 'cm3leon.checkpoint' in sys.modules)")
    out = Path("/tmp/never-written-by-test-plan")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    rc, torch_loaded, checkpoint_loaded = res.stdout.split()
    assert rc == "2" and torch_loaded == "False" and checkpoint_loaded == "False", res.stderr
    assert "generation.temperature" in res.stderr and not out.exists()


def test_templates_are_checked_against_the_checkpoints_family(coco_root, hf_folder, tmp_path, capsys):  # noqa: F811
    """A template may name specials by role; {mask} is a native CM3leon token that Chameleon lacks."""
    import cm3leon.checkpoint

    with pytest.raises(PlanError, match=r"coco-caption: prompt.template: .*\{mask\} is not a token of the "
                                        r"chameleon family"):
        build_plan(RunRequest(("coco-caption",), ("prompt.template={mask} A picture of",), model=str(hf_folder),
                              data_root=coco_root, out=tmp_path / "r"))
    ok = build_plan(RunRequest(("coco-caption",), ("prompt.template=A picture of{eot}",), model=str(hf_folder),
                               data_root=coco_root, out=tmp_path / "r"))
    assert ok.checkpoint.family == "chameleon" and ok.runs[0].specs[0].prompt.template == "A picture of{eot}"
    assert isinstance(ok.checkpoint, cm3leon.checkpoint.CheckpointInfo)
