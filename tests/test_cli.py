"""The command-line roof: start-up without heavy imports, one-line errors with the contract's exit
codes, the injectable predictor, and `cm3eval run`'s verdict (0 / 1 / 2 / 3) on real runs of the
demo tasks with the deterministic echo predictor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fixtures
from cm3leon.errors import Cm3evalError
from evals.cli import app, main
from evals.cli.run import PredictorSettings, model_predictor

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "numpy", "PIL", "scipy", "cm3leon.sampling", "cm3leon.transformer")


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# ----------------------------------------------------------------------------- start-up
OFFENDERS = """
import ast, sys
from pathlib import Path
import evals.cli
heavy = {m for m in %r if '.' not in m}
for name, mod in sorted(sys.modules.items()):
    f = getattr(mod, '__file__', None)
    if name.split('.')[0] not in ('cm3leon', 'tasks', 'evals', 'reports') or not f:
        continue
    for node in ast.parse(Path(f).read_text()).body:  # module level only: deferred imports are fine
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for n in names:
            if n.split('.')[0] in heavy or n in %r:
                print(name, 'imports', n)
"""


def test_importing_the_cli_imports_nothing_heavy():
    # `cm3eval --help` must not pay ~2 s for torch: every command module defers its heavy imports
    res = _python("import sys, evals.cli; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,))
    assert res.returncode == 0, res.stderr
    if res.stdout.strip() != "[]":
        culprits = _python(OFFENDERS % (HEAVY, HEAVY)).stdout.strip().replace("\n", "; ")
        pytest.fail(f"imported at start-up: {res.stdout.strip()}; module-level imports: {culprits}")


def test_help_and_usage_errors_are_fast_and_plain():
    times = {}
    for label, args in (("--help", ["--help"]), ("usage error", ["run"]), ("no such command", ["nope"])):
        t0 = time.perf_counter()
        res = _python("from evals.cli import cli; cli()", *args)
        times[label] = time.perf_counter() - t0
        assert ("Usage" in res.stdout + res.stderr) and res.returncode == (0 if label == "--help" else 2)
    print("start-up (s, incl. the interpreter):", {k: round(v, 2) for k, v in times.items()})


COMMANDS = ("run", "list", "show", "convert", "score", "bench", "bank", "train", "protocol", "leaderboard", "report",
            "compare")
SUBCOMMANDS = {"score": ("vqa", "caption", "fid", "edit", "images"), "bench": ("sampler", "retrieval", "metrics"),
               "protocol": ("write",)}


def _listed_commands(help_text: str) -> list[str]:
    """The command names of a --help page: the first word of each row of its Commands panel."""
    panel = help_text.split("Commands", 1)[1]
    return [m.group(1) for line in panel.splitlines() if (m := re.match(r"^[│|]? ?(\w[\w-]*)\s{2,}\S", line))]


def test_every_command_group_is_mounted():
    # The app's registered commands are exactly the expected ones, and --help lists each as a row
    # (a name that only appears inside another command's help text does not count).
    import typer.main

    root = typer.main.get_command(app)
    assert sorted(root.commands) == sorted(COMMANDS)
    assert sorted(_listed_commands(CliRunner().invoke(app, ["--help"], terminal_width=100).stdout)) == sorted(COMMANDS)
    for group, subs in SUBCOMMANDS.items():
        assert sorted(root.commands[group].commands) == sorted(subs)
        out = CliRunner().invoke(app, [group, "--help"], terminal_width=100).stdout
        assert sorted(_listed_commands(out)) == sorted(subs), out


def test_the_mount_check_fails_when_a_command_is_missing():
    """The check above can fail: an app without `compare` lists every other name but not it."""
    import typer

    from reports import cli as reports_cli

    partial = typer.Typer()
    for name in COMMANDS:
        if name != "compare":
            partial.command(name)(reports_cli.report)
    listed = _listed_commands(CliRunner().invoke(partial, ["--help"], terminal_width=100).stdout)
    assert "compare" not in listed and sorted(listed) == sorted(c for c in COMMANDS if c != "compare")


def test_cli_modules_use_plain_imports():
    src = (REPO / "evals" / "cli" / "__init__.py").read_text()
    assert "importlib" not in src and "import_module" not in src


# ----------------------------------------------------------------------------- errors and exit codes
def test_a_cm3eval_error_is_one_line_with_its_exit_code(capsys):
    import typer

    from evals.cli import _RootGroup

    class Unscorable(Cm3evalError):
        exit_code = 3

    probe = typer.Typer(cls=_RootGroup)

    @probe.command()
    def boom(code: int = 2) -> None:
        raise (Unscorable if code == 3 else Cm3evalError)("first line\nsecond line")

    @probe.command()
    def other() -> None:
        pass

    for code in (2, 3):
        res = CliRunner().invoke(probe, ["boom", "--code", str(code)])
        assert res.exit_code == code and res.stderr == "error: first line second line\n", res.output
    # through main(): the same line, the code returned rather than raised
    assert main(["show", "no-such-task"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task or suite 'no-such-task'") and err.count("\n") == 1


def test_console_script_calls_main():
    res = _python("from evals.cli import cli; cli()", "show", "shapes-vqa", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["name"] == "shapes-vqa"
    res = _python("from evals.cli import cli; cli()", "show", "shapes-vqa", "--set", "generation.top_k=0")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "generation.top_k" in res.stderr


# ----------------------------------------------------------------------------- cm3eval run
class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return fixtures.make_echo(**kwargs)


def _ids(task: str, n: int) -> list[str]:
    import tasks
    from evals.engine import select
    from tasks.loaders import load_dataset, resolve_data_root
    from tasks.spec import apply_overrides

    spec = apply_overrides(tasks.get(task), {"limit": n})
    return [s.id for s in select(load_dataset(spec, resolve_data_root(spec, None)), spec)]


def test_run_demo_tasks_with_an_injected_predictor(tmp_path, capsys):
    rec = Recorder()
    code = main(["run", "shapes-vqa", "--limit", "3", "--out", str(tmp_path / "r"), "--batch-size", "2", "--json"],
                predictor_factory=rec)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert rec.calls == [{"model": "demo", "device": "cpu", "batch_size": 2}]  # the demo suite's default model
    entry = json.loads(out.out)[str(tmp_path / "r")]["shapes-vqa"]
    assert entry["n_samples"] == 3 and entry["metrics"]["accuracy"]["value"] is not None
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_run_exit_1_over_max_failures_and_the_summary_names_the_first(tmp_path, capsys, monkeypatch):
    ids = _ids("shapes-vqa", 4)
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", ids[2])
    args = ["run", "shapes-vqa", "--limit", "4", "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "a")], predictor_factory=fixtures.make_echo) == 1
    err = capsys.readouterr().err
    assert f"1 of 4 samples failed" in err and ids[2] in err and "test failure for sample" in err
    # the same run with a budget that allows one failure in four
    assert main([*args, "--out", str(tmp_path / "b"), "--max-failures", "25%"],
                predictor_factory=fixtures.make_echo) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--max-failures", "0.2"],
                predictor_factory=fixtures.make_echo) == 1
    assert main([*args, "--out", str(tmp_path / "d"), "--max-failures", "lots"],
                predictor_factory=fixtures.make_echo) == 2


def test_run_exit_1_when_every_sample_failed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", ",".join(_ids("shapes-vqa", 2)))
    code = main(["run", "shapes-vqa", "--limit", "2", "--batch-size", "1", "--max-failures", "100%",
                 "--out", str(tmp_path / "r")], predictor_factory=fixtures.make_echo)
    assert code == 1 and "2 of 2 samples failed" in capsys.readouterr().err


def test_run_exit_3_when_a_requested_metric_cannot_be_computed(tmp_path, capsys, monkeypatch):
    # rank accuracy needs at least two samples: of two, one fails (allowed) and the metric is missing
    import yaml

    import tasks

    spec = tasks.get("shapes-fid").to_dict()
    spec.update(name="rank-only", metrics={"rank_accuracy": spec["metrics"]["rank_accuracy"]})
    (tmp_path / "rank-only.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", _ids("shapes-fid", 2)[1])
    code = main(["run", str(tmp_path / "rank-only.yaml"), "--model", "demo", "--limit", "2", "--max-failures", "50%",
                 "--out", str(tmp_path / "r")], predictor_factory=fixtures.make_echo)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "metric rank_accuracy not computed" in err


def test_run_requires_a_model_outside_the_demo_suite(tmp_path, capsys):
    rec = Recorder()
    assert main(["run", "vqav2", "--out", str(tmp_path / "r")], predictor_factory=rec) == 2
    assert main(["run", "demo", "coco-caption", "--out", str(tmp_path / "r")], predictor_factory=rec) == 2
    err = capsys.readouterr().err
    assert err.count("--model is required for") == 2 and "vqav2" in err and "coco-caption" in err
    assert rec.calls == []


@pytest.mark.parametrize("args, expected", [
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda:banana"], "--device cuda:banana: expected auto"),
    (["--dtype", "float16"], "--dtype float16"),
    (["--tp", "0"], "--tp 0"),
    (["--sweep", "generation.temperature"], "--sweep generation.temperature: expected key.path=v1,v2"),
    (["--sweep", "generation.top_k=5,0"], "generation.top_k: expected an integer >= 1"),
])
def test_run_usage_errors_before_the_predictor(tmp_path, capsys, args, expected):
    rec = Recorder()
    assert main(["run", "shapes-vqa", "--out", str(tmp_path / "r"), *args], predictor_factory=rec) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and rec.calls == []


def test_run_sweep_writes_one_folder_per_point(tmp_path, capsys):
    code = main(["run", "shapes-vqa", "--limit", "2", "--out", str(tmp_path / "s"),
                 "--sweep", "generation.max_new_tokens=4,8"], predictor_factory=fixtures.make_echo)
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == \
        ["max_new_tokens=4", "max_new_tokens=8"]
    cfg = json.loads((tmp_path / "s" / "max_new_tokens=8" / "shapes-vqa" / "config.json").read_text())
    assert cfg["overrides"]["generation.max_new_tokens"] == 8  # typed, as the spec holds it
    # a CI log names the swept values: the progress lines and the results table's rows
    out, err = capsys.readouterr()
    assert "cm3eval: shapes-vqa [generation.max_new_tokens=8]: start, 2 samples" in err
    rows = [line for line in out.splitlines() if "shapes-vqa" in line and "accuracy" in line]
    assert len(rows) == 2 and "max_new_tokens=4" in rows[0] and "max_new_tokens=8" in rows[1]


def test_list_is_readable_at_80_columns():
    res = _python("from evals.cli import cli; cli()", "list", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    coco = next(line for line in lines if line.startswith("coco-fid "))
    assert coco.split()[:3] == ["coco-fid", "t2i", "30000"] and coco.split()[3].startswith("fid")  # one line
    assert any(line.startswith("suite demo:") for line in lines)


def test_caption_scores_on_the_papers_scale_in_the_results_table(tmp_path, capsys):
    code = main(["run", "shapes-caption", "--limit", "3", "--out", str(tmp_path / "c")],
                predictor_factory=fixtures.make_echo)
    out = capsys.readouterr().out
    assert code == 0
    raw = json.loads((tmp_path / "c" / "metrics.json").read_text())["tasks"]["shapes-caption"]["metrics"]["CIDEr"]
    row = next(line for line in out.splitlines() if "CIDEr" in line)
    from reports.format import fmt
    assert fmt(raw["value"] * 100) in row and "x100" in row  # metrics.json keeps the raw 0-1 value


def test_model_flags_reach_the_loader_and_the_predictor(monkeypatch, tmp_path):
    import cm3leon.checkpoint
    import evals.predictor

    seen: dict = {}
    monkeypatch.setattr(cm3leon.checkpoint, "load", lambda model, **kw: seen.setdefault("load", (model, kw)))

    class FakePredictor:
        def __init__(self, bundle, **kw):
            seen["predictor"] = kw

    monkeypatch.setattr(evals.predictor, "ModelPredictor", FakePredictor)
    model_predictor(PredictorSettings("demo", "cpu", "bfloat16", None, vq=tmp_path / "vqgan.ckpt", compile=True,
                                      tp=2, save_candidates=True))
    model, kw = seen["load"]
    assert model == "demo" and kw["vq"] == tmp_path / "vqgan.ckpt" and str(kw["dtype"]) == "torch.bfloat16"
    assert seen["predictor"]["save_candidates"] is True and "batch_size" not in seen["predictor"]
    assert seen["predictor"]["sampler_options"] == {"compile": True, "tp": 2}
    seen.clear()
    model_predictor(PredictorSettings("demo", "cpu", "float32", 4))  # defaults: nothing extra is passed
    assert "vq" not in seen["load"][1] and seen["predictor"]["sampler_options"] is None


def test_each_task_runs_in_chunks_of_the_prompts_per_step_the_plan_sized(tmp_path, monkeypatch, capsys):
    """The plan sizes each task once (evals/sizing.py) and the engine's chunk is that size;
    --batch-size overrides it for every task."""
    import evals.plan
    from evals import engine, sizing

    sizes = {"shapes-fid": 2, "shapes-edit": 2}
    asked: list[tuple[str, int | None]] = []

    def size_task(t, info, device, req):
        asked.append((t.spec.name, req.batch_size))
        return sizing.TaskSizing(req.batch_size or sizes.get(t.spec.name, 5), overridden=bool(req.batch_size))

    calls: list[tuple[list[str], int]] = []
    real_run = engine.run

    def recording_run(specs, predictor, options, dist=None, on_task=None):
        calls.append(([s.name for s in specs], options.batch_size))
        return real_run(specs, predictor, options, dist, on_task)

    monkeypatch.setattr(evals.plan, "size_task", size_task)
    monkeypatch.setattr(engine, "run", recording_run)
    args = ["run", "demo", "--limit", "2", "--out", str(tmp_path / "r")]
    assert main(args, predictor_factory=fixtures.make_echo) == 0, capsys.readouterr().err
    new = ["shapes-dialog", "shapes-paragraph", "shapes-text-render", "shapes-canny2image"]
    assert calls == [(["shapes-fid"], 2), (["shapes-caption", "shapes-vqa"], 5), (["shapes-edit"], 2), (new, 5)]
    err = capsys.readouterr().err.splitlines()
    sized = [(n, sizes.get(n, 5)) for n in ["shapes-fid", "shapes-caption", "shapes-vqa", "shapes-edit", *new]]
    assert [line for line in err if "per step" in line] == [f"{n}: {k} prompts per step" for n, k in sized]
    assert [n for n, _ in asked] == [n for n, _ in sized]  # once each
    calls.clear()
    assert main([*args, "--batch-size", "3"], predictor_factory=fixtures.make_echo) == 0
    assert calls == [(["shapes-fid", "shapes-caption", "shapes-vqa", "shapes-edit", *new], 3)]
    assert "shapes-fid: 3 prompts per step (--batch-size)" in capsys.readouterr().err


def test_the_plan_prints_the_device_then_the_disk_then_each_task(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rec = Recorder()
    assert main(["run", "shapes-vqa", "--limit", "2", "--out", str(tmp_path / "r")], predictor_factory=rec) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "device: cpu (auto: no CUDA), dtype float32"
    assert err[1].startswith("disk: ") and err[2] == "shapes-vqa: 8 prompts per step"
    assert rec.calls == [{"model": "demo", "device": "cpu", "batch_size": 8}]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_the_disk_line(tmp_path):
    """The real command, as a user types it: no traceback, no disk line, exit 2."""
    res = subprocess.run([sys.executable, "-m", "evals.cli", "run", "shapes-vqa", "--model", "demo",
                          "--device", "cuda", "--out", str(tmp_path / "r")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: --device cuda: torch sees no CUDA device") and res.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()
