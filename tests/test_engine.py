"""The engine's mechanics, end to end on fixtures in the official layouts.

Most tests drive the engine with `fixtures.EchoPredictor`, a deterministic predictor whose output
is a pure function of (sample id, seed) — the same property the real sampler has — so they test
the engine alone: run folder layout, resume, config-hash refusal, per-sample failures, batch-size
and process-count independence, kill -9. The command line gets the same predictor injected
(`evals.cli.main(argv, predictor_factory=fixtures.make_echo)`; in subprocesses through
fixtures.ECHO_MAIN). The last tests run the real predictor on a tiny random-weight cm3leon
checkpoint built in the test. The run folder's own contract is tests/test_runs.py; the fault
injection cases of issue 14 are tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fixtures
import tasks
from evals import engine
from tasks.spec import apply_overrides

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_all(tmp_path_factory.mktemp("data"))


spec, run = fixtures.spec, fixtures.run_engine  # shared with the other engine tests


def lines(task_dir: Path) -> list[dict]:
    out = []
    for p in sorted((task_dir / "samples").glob("rank-*.jsonl")):
        out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out


def metric_values(out: Path) -> dict:
    data = json.loads((out / "metrics.json").read_text())
    return {t: {k: (v["value"], v["ci"], v["n"]) for k, v in e["metrics"].items()} for t, e in data["tasks"].items()}


def env_with_echo(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", **extra)
    if "CM3EVAL_TEST_DELAY" not in extra:
        env.pop("CM3EVAL_TEST_DELAY", None)
    return env


def with_model(args) -> list[str]:
    """`run` outside the demo suite needs --model; the injected echo predictor ignores its value."""
    args = [str(a) for a in args]
    return args[:1] + ["--model", "echo"] + args[1:] if args[:1] == ["run"] and "--model" not in args else args


def cli(args, capsys, factory=fixtures.make_echo) -> tuple[int, str, str]:
    """`cm3eval ARGS` in this process with the echo predictor injected: (exit code, stdout, stderr)."""
    from evals.cli import main

    capsys.readouterr()
    code = main(with_model(args), predictor_factory=factory)
    got = capsys.readouterr()
    return code, got.out, got.err


# ----------------------------------------------------------------------------- run folder
def test_run_folder_layout(tmp_path, root):
    out = tmp_path / "run"
    results, _ = run([spec("vqav2"), spec("magicbrush-edit"), spec("coco-fid")], out, root, batch_size=3)
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["run"]) >= {"created", "versions", "git_hash", "model", "model_fingerprint", "argv"}
    assert data["run"]["model_fingerprint"] == "echo-v1" and data["run"]["versions"]["cm3eval"]
    v = data["tasks"]["vqav2"]
    assert set(v) >= {"metrics", "failures", "config_hash", "n_samples", "data_fingerprint", "model_fingerprint"}
    acc = v["metrics"]["accuracy"]
    assert v["n_samples"] == 8 and acc["n"] == 8 and len(acc["ci"]) == 2 and acc["ci"][0] <= acc["value"] <= acc["ci"][1]
    # the value is the official VQA accuracy of the predictions written in the sample lines
    from evals.metrics.vqa import vqa_accuracy

    recs = lines(out / "vqav2")
    assert [r["index"] for r in recs] == list(range(8))
    again = vqa_accuracy({r["id"]: r["prediction"] for r in recs},
                         [{"question_id": r["id"], "answers": [{"answer": a} for a in r["references"]]} for r in recs])
    assert again.value == acc["value"]
    assert all(set(r) >= {"id", "index", "seed", "kind", "prompt", "prediction", "references", "images", "candidates",
                          "scores", "best", "failure", "retrieved", "per_sample"} for r in recs)
    assert all(r["per_sample"]["accuracy"] in (0.0, 0.3, 0.6, 0.9, 1.0) or 0 <= r["per_sample"]["accuracy"] <= 1
               for r in recs)
    cfg = json.loads((out / "vqav2" / "config.json").read_text())
    assert cfg["hash"] == v["config_hash"] and cfg["task"]["name"] == "vqav2"
    # images beside the lines, referenced relative to the task folder
    for r in lines(out / "magicbrush-edit"):
        assert (out / "magicbrush-edit" / r["images"]["output"]).is_file()
        assert (out / "magicbrush-edit" / r["images"]["input"]).is_file()
        assert (out / "magicbrush-edit" / r["images"]["target"]).is_file()
    t2i = lines(out / "coco-fid")
    assert all(len(r["candidates"]) == 2 and (out / "coco-fid" / r["candidates"][1]).is_file() for r in t2i)
    edit = data["tasks"]["magicbrush-edit"]
    assert {"L1", "L2 (MSE)"} <= set(edit["metrics"])
    # metrics that need weights this machine lacks are notes, never numbers
    assert "FID" not in data["tasks"]["coco-fid"]["metrics"]
    assert any("Inception" in n for n in data["tasks"]["coco-fid"]["notes"])
    assert not list(out.rglob(".*.tmp-*"))  # no temp files left behind


def test_results_do_not_depend_on_batch_size(tmp_path, root):
    (a, p1), (b, p4) = run(spec("vqav2"), tmp_path / "b1", root, batch_size=1), \
        run(spec("vqav2"), tmp_path / "b4", root, batch_size=4)
    assert set(p1.batch_sizes) == {1} and 4 in p4.batch_sizes
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(lines(tmp_path / "b1" / "vqav2")) == strip(lines(tmp_path / "b4" / "vqav2"))
    assert metric_values(tmp_path / "b1") == metric_values(tmp_path / "b4")
    assert a["vqav2"].config_hash == b["vqav2"].config_hash  # batch size and --out are not in the hash


def test_progress_bar_reports_throughput(tmp_path, root, capsys):
    run(spec("vizwiz"), tmp_path / "run", root, batch_size=2)  # progress off: nothing printed
    assert capsys.readouterr().err == ""
    opts = engine.RunOptions(out=tmp_path / "bar", data_root=root, progress=True)
    engine.run([spec("vizwiz")], fixtures.EchoPredictor(), opts)
    err = capsys.readouterr()
    text = err.out + err.err
    assert "vizwiz" in text and "4/4" in text and "samples/s" in text and "ETA" in text


def test_progress_without_a_terminal_is_plain_log_lines(tmp_path, root, capsys):
    """stderr is not a TTY under pytest: the default (auto) prints plain lines, never a bar that
    a CI log cannot show: the task's start, its progress with samples/s and ETA, its end."""
    opts = engine.RunOptions(out=tmp_path / "run", data_root=root, batch_size=1)  # progress=None: auto
    engine.run([spec("vqav2")], fixtures.EchoPredictor(), opts)
    got = capsys.readouterr().err.splitlines()
    mine = [x for x in got if x.startswith("cm3eval: vqav2: ")]
    assert mine[0] == "cm3eval: vqav2: start, 8 samples"
    assert mine[-1].startswith("cm3eval: vqav2: done, 8/8 in ") and mine[-1].endswith("samples/s)")
    middle = mine[1:-1]
    assert middle and all("samples/s ETA " in x for x in middle)
    assert "\x1b" not in "".join(got) and "\r" not in "".join(got)  # no terminal control codes


def test_progress_mode_follows_the_terminals(monkeypatch):
    import io

    from evals.progress import resolve_mode

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", Tty())
    assert resolve_mode(None) == "rich" and resolve_mode("auto") == "rich"
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # `cm3eval run ... | tee log`
    assert resolve_mode(None) == "plain"
    assert (resolve_mode(True), resolve_mode(False), resolve_mode("plain")) == ("rich", "off", "plain")
    with pytest.raises(ValueError, match="progress='bar'"):
        resolve_mode("bar")


def test_plain_progress_logs_about_every_five_percent(capsys):
    from evals.progress import PlainProgress

    with PlainProgress(200, 40, "t") as bar:  # resumed at 40: the rate counts this run only
        for _ in range(160):
            bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "cm3eval: t: start, 200 samples (40 already done)"
    steps = [int(x.split()[2].split("/")[0]) for x in lines[1:-1]]
    assert steps == list(range(50, 200, 10))  # every 10 samples = 5 % of 200
    assert lines[-1].startswith("cm3eval: t: done, 200/200")


# ----------------------------------------------------------------------------- resume and the config hash
def test_resume_skips_finished_samples(tmp_path, root):
    out = tmp_path / "run"
    _, p = run(spec("vqav2", limit="3"), out, root)
    assert len(p.calls) == 3
    _, p2 = run(spec("vqav2"), out, root)  # a larger limit: the first 3 are a prefix, reused
    recs = lines(out / "vqav2")
    assert p2.calls == [r["id"] for r in recs if r["index"] >= 3] and len(p2.calls) == 5
    _, p3 = run(spec("vqav2"), out, root)
    assert p3.calls == []
    run(spec("vqav2"), tmp_path / "fresh", root)
    assert metric_values(out) == metric_values(tmp_path / "fresh")


def test_changed_config_is_refused_with_the_differing_keys(tmp_path, root):
    out = tmp_path / "run"
    run(spec("vqav2", limit="2"), out, root)
    with pytest.raises(engine.RunError) as e:
        run(spec("vqav2", **{"generation.max_new_tokens": "3", "prompt.template": "Q: {question} A:"}), out, root)
    msg = str(e.value)
    assert "task.generation.max_new_tokens (10 -> 3)" in msg and "task.prompt.template" in msg
    assert "--out" in msg and "--overwrite" in msg
    with pytest.raises(engine.RunError, match=r"model \('echo-v1' -> 'other'\)"):
        run(spec("vqav2", limit="2"), out, root, predictor=fixtures.EchoPredictor("other"))
    results, p = run(spec("vqav2", **{"generation.max_new_tokens": "3"}), out, root, overwrite=True)
    assert len(p.calls) == 8 and results["vqav2"].n_samples == 8
    # metric options only change the scoring, which every run redoes from the sample lines
    f = tmp_path / "fid"
    run(spec("coco-fid"), f, root)
    results, p = run(spec("coco-fid", **{"metrics.fid.weights": str(tmp_path / "nowhere.pth")}), f, root)
    assert p.calls == [] and "nowhere.pth" in results["coco-fid"].entry["notes"][0]


def test_torn_last_line_is_ignored_and_recomputed(tmp_path, root):
    out = tmp_path / "run"
    run(spec("vqav2", limit="3"), out, root)
    f = out / "vqav2" / "samples" / "rank-00000.jsonl"
    whole = lines(out / "vqav2")
    # a kill in the middle of writing the 4th line
    with open(f, "a") as fh:
        fh.write(json.dumps({**whole[0], "id": "802001", "index": 3})[:40])
    _, p = run(spec("vqav2", limit="4"), out, root)
    assert p.calls == ["802001"]
    assert [r["index"] for r in lines(out / "vqav2")] == [0, 1, 2, 3]  # every line parses again


# ----------------------------------------------------------------------------- failures
def test_corrupt_image_is_a_recorded_failure(tmp_path, root):
    data = tmp_path / "data"
    fixtures.copy_tree(root / "annotations", data / "annotations")
    fixtures.copy_tree(root / "val2014", data / "val2014")
    victim = sorted((data / "val2014").glob("*.jpg"))[1]
    fixtures.corrupt(victim)
    out = tmp_path / "run"
    results, p = run(spec("vqav2"), out, data)
    r = results["vqav2"]
    bad = [x for x in lines(out / "vqav2") if x["failure"]]
    assert bad and all(victim.name in x["failure"] and "corrupt" in x["failure"] for x in bad)
    assert {f["id"] for f in r.failures} == {x["id"] for x in bad}
    assert r.metrics["accuracy"]["n"] == 8 - len(bad)
    assert not set(p.calls) & {x["id"] for x in bad}
    _, p2 = run(spec("vqav2"), out, data)  # a data failure is final: not retried
    assert p2.calls == []


def test_predictor_failure_is_isolated_and_retried_next_run(tmp_path, root, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", "802000")
    results, p = run(spec("vqav2"), out, root, batch_size=4)
    assert [f["id"] for f in results["vqav2"].failures] == ["802000"]
    assert "RuntimeError: test failure for sample 802000" in results["vqav2"].failures[0]["error"]
    assert len(set(p.calls)) == 7  # its batch neighbours were retried alone and succeeded
    monkeypatch.delenv("CM3EVAL_TEST_FAIL_IDS")
    results, p2 = run(spec("vqav2"), out, root)
    assert p2.calls == ["802000"] and results["vqav2"].failures == []
    assert len(lines(out / "vqav2")) == 8  # merged: one line per sample


def test_systematic_predictor_failure_aborts(tmp_path, root, monkeypatch):
    from tasks.loaders import load_dataset

    every = [s.id for s in load_dataset(spec("vqav2"), root).samples]
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", ",".join(every))
    with pytest.raises(engine.RunError, match="all failed in the predictor"):
        run(spec("vqav2"), tmp_path / "run", root, batch_size=4)


def test_fatal_predictor_errors_stop_the_run_and_sample_errors_do_not(tmp_path, root):
    from cm3leon.errors import Cm3evalError
    from evals.protocol import FatalPredictorError, PredictorProtocolError, is_fatal
    from tasks.errors import DataError

    class Setup(Cm3evalError):  # what evals.predictor.PredictorSetupError is: no decoder, no weights
        pass

    class Raising(fixtures.EchoPredictor):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def predict(self, batch):
            if any(it.sample.index == 2 for it in batch.items):
                raise self.exc
            return super().predict(batch)

    with pytest.raises(Setup, match="the checkpoint has no VQ decoder"):
        run(spec("vqav2"), tmp_path / "a", root, Raising(Setup("the checkpoint has no VQ decoder")), batch_size=4)
    results, p = run(spec("vqav2"), tmp_path / "b", root, Raising(DataError("prompt too long")), batch_size=4)
    assert [f["error"] for f in results["vqav2"].failures] == ["DataError: prompt too long"] and len(p.calls) == 7
    assert is_fatal(FatalPredictorError("x")) and is_fatal(PredictorProtocolError("x"))
    assert not is_fatal(RuntimeError("CUDA out of memory")) and not is_fatal(DataError("x"))

    class Short(fixtures.EchoPredictor):
        def predict(self, batch):
            return super().predict(batch)[:-1]

    with pytest.raises(PredictorProtocolError, match="predictor returned 3 results for 4 samples"):
        run(spec("vqav2"), tmp_path / "c", root, Short(), batch_size=4)


def test_fid_scores_the_generated_images_against_the_prompts_images(tmp_path, root, monkeypatch):
    """coco-fid's wiring: outputs vs the val2014 images of the same prompts, pytorch-fid protocol,
    256 px, reference statistics cached. The Inception weights are not available offline, so a
    cheap stand-in network (pooled pixels) takes the Inception's place; the metric module itself is
    tested against pytorch-fid by its own tests."""
    import torch

    from evals.metrics import fid as fid_lib
    from evals.metrics.inception import FIDInceptionV3

    class PooledPixels(FIDInceptionV3):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # [N, 48]

    ext = fid_lib.Extractor(PooledPixels().eval(), "inception", 299, "pooled-pixels-for-tests")
    monkeypatch.setattr(fid_lib, "inception_extractor", lambda weights=None, device="cpu", protocol="pytorch-fid": ext)
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    results, _ = run(spec("coco-fid", limit="4", **{"metrics.fid.cache_dir": str(cache)}), out, root)
    m = results["coco-fid"].metrics["FID"]
    recs = lines(out / "coco-fid")
    gen = [out / "coco-fid" / r["images"]["output"] for r in recs]
    ref = [root / r["input"]["image"] for r in recs]
    expected = fid_lib.compute_fid(gen, fid_lib.image_stats(ref, ext, resolution=256), feature_extractor=ext,
                                   resolution=256, keep_features=True)  # as the engine: compare's features kept
    assert m["n"] == 4 and m["value"] == pytest.approx(expected.value, rel=1e-9)
    assert len(list(cache.glob("ref-*.npz"))) == 1  # the reference statistics are cached on disk


def test_a_broken_report_never_fails_the_run(tmp_path, root, monkeypatch, caplog, capsys):
    """The CLI writes report.html after the run (the engine renders no reports); a broken
    report is a warning, never a lost evaluation."""
    import reports.html

    def boom(run_dir, **kw):
        raise RuntimeError("report exploded")

    monkeypatch.setattr(reports.html, "write_run_report", boom)
    code, out, err = cli(["run", "vizwiz", "--data-root", root, "--out", tmp_path / "run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)[str(tmp_path / "run")]["vizwiz"]["metrics"]["accuracy"]["n"] == 4
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert "report exploded" in caplog.text + err


def test_the_engine_renders_no_reports(tmp_path, root):
    results, _ = run(spec("vizwiz"), tmp_path / "run", root)
    assert results["vizwiz"].n_samples == 4 and not (tmp_path / "run" / "report.html").exists()
    source = (REPO / "evals" / "engine.py").read_text()
    assert "reports" not in {n.split(".")[0] for n in _imported(source)}


def _imported(source: str) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_demo_tasks_build_their_world_in_the_cache(tmp_path, root, monkeypatch):
    from tasks.shapes import world

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    small = world.WorldConfig(n_train=6, n_val=2, n_test=3)
    calls = []

    def ensure(path, cfg=None, **kw):  # the real ensure_world with a smaller world, to stay fast
        calls.append(Path(path))
        return world.write_world(world.generate_world(small), path)

    monkeypatch.setattr(world, "ensure_world", ensure)
    results, _ = run(spec("shapes-vqa"), tmp_path / "run", None)
    assert calls == [tmp_path / "cache" / "shapes"]
    assert results["shapes-vqa"].n_samples == 3 * small.questions_per_image


# ----------------------------------------------------------------------------- the command line
def test_cli_errors_are_one_line(tmp_path, root, capsys):
    def check(args, code, *needles):
        got, out, err = cli(args, capsys)
        assert got == code, (out, err)
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err
        for n in needles:
            assert n in err
        return err

    base = ["run", "vqav2", "--data-root", str(root), "--out", str(tmp_path / "o")]
    check(base + ["--set", "generation.cfg_scal=2"], 2, "did you mean generation.cfg_scale")
    check(base + ["--set", "generation.top_p=high"], 2, "--set generation.top_p=high: expected a number in (0, 1]")
    # a missing input is exit 2 (the exit-code contract; it was 1 before the contract existed)
    check(["run", "vqav2", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")], 2,
          "vqav2: data root", "does not exist; expected layout:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: [vqa\n")
    check(["run", str(bad), "--data-root", str(root)], 2, f"{bad}: malformed YAML at line")
    check(["run", "vqav2", "--data-root", str(root), "--out", str(tmp_path / "o"), "--sweep", "x"], 2, "--sweep x")


def test_cli_run_with_a_corrupt_image_finishes_and_reports_it(tmp_path, root, capsys):
    data = tmp_path / "data"
    fixtures.copy_tree(root / "vizwiz", data / "vizwiz")
    fixtures.corrupt(data / "vizwiz" / "val" / "VizWiz_val_00000002.jpg")
    args = ["run", "vizwiz", "--data-root", data, "--out", tmp_path / "o", "--json"]
    code, out, err = cli(args + ["--max-failures", "0.5"], capsys)  # 1 of 4 failed: under 50 %
    assert code == 0, err
    entry = json.loads(out)[str(tmp_path / "o")]["vizwiz"]
    assert entry["failures"] == [{"id": "VizWiz_val_00000002", "error": entry["failures"][0]["error"]}]
    assert "corrupt or unreadable image vizwiz/val/VizWiz_val_00000002.jpg" in entry["failures"][0]["error"]
    assert entry["metrics"]["accuracy"]["n"] == 3
    # the default allows 1 %: 25 % failed is exit 1, the results still printed and saved, the
    # failure named
    code, out, err = cli(args, capsys)
    assert code == 1 and json.loads(out)[str(tmp_path / "o")]["vizwiz"]["metrics"]["accuracy"]["n"] == 3
    assert "VizWiz_val_00000002" in err


def test_cli_sweep_writes_one_run_per_value_and_a_leaderboard(tmp_path, root, capsys):
    out = tmp_path / "sweep"
    code, _, err = cli(["run", "vizwiz", "--data-root", root, "--out", out, "--sweep", "generation.cfg_scale=1,2",
                        "--json"], capsys)
    assert code == 0, err
    for v in ("1", "2"):
        cfg = json.loads((out / f"cfg_scale={v}" / "vizwiz" / "config.json").read_text())
        assert cfg["task"]["generation"]["cfg_scale"] == float(v) and cfg["overrides"] == {"generation.cfg_scale": float(v)}
    assert (out / "leaderboard.csv").is_file()


# ----------------------------------------------------------------------------- processes
def _cli(args, env, **kw):
    return subprocess.run([sys.executable, "-c", fixtures.ECHO_MAIN, *with_model(args)], cwd=REPO, env=env, capture_output=True,
                          text=True, **kw)


def test_kill_9_then_resume_gives_identical_metrics_and_no_recomputation(tmp_path, root):
    args = ["run", "vqav2", "--data-root", str(root), "--batch-size", "1"]
    ref = _cli(args + ["--out", str(tmp_path / "ref")], env_with_echo(), timeout=300)
    assert ref.returncode == 0, ref.stderr
    out, log = tmp_path / "killed", tmp_path / "calls.log"
    env = env_with_echo(CM3EVAL_TEST_DELAY="0.4", CM3EVAL_TEST_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-c", fixtures.ECHO_MAIN, *with_model(args), "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "vqav2" / "samples" / "rank-00000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not samples.exists() or samples.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = [json.loads(x)["id"] for x in samples.read_text().splitlines() if x.strip() and x.endswith("}")]
    assert 3 <= len(written) < 8, "the kill came too late to test anything"
    first = log.read_text().split()
    env.pop("CM3EVAL_TEST_DELAY")
    res = _cli(args + ["--out", str(out)], env, timeout=300)
    assert res.returncode == 0, res.stderr
    second = log.read_text().split()[len(first):]
    assert not set(second) & set(written)  # finished samples are never recomputed
    assert len(first) - len(written) <= 1  # at most the batch in flight was lost
    assert sorted(set(first) | set(second)) == sorted(r["id"] for r in lines(out / "vqav2"))
    assert metric_values(out) == metric_values(tmp_path / "ref")


def test_torchrun_two_processes_match_one(tmp_path, root):
    args = ["run", "vqav2", "vizwiz", "--data-root", str(root), "--batch-size", "2"]
    one = _cli(args + ["--out", str(tmp_path / "one")], env_with_echo(), timeout=300)
    assert one.returncode == 0, one.stderr
    env = env_with_echo(CM3EVAL_TEST_LOG=str(tmp_path / "calls.log"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(TESTS / "echo_cli.py"), *with_model(args), "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert metric_values(tmp_path / "two") == metric_values(tmp_path / "one")
    calls = (tmp_path / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)) == 12  # every sample once, across both ranks
    for task in ("vqav2", "vizwiz"):  # merged by rank 0 into one file sorted by index
        files = sorted((tmp_path / "two" / task / "samples").glob("*.jsonl"))
        assert [f.name for f in files] == ["rank-00000.jsonl"]
        strip = lambda rs: [{k: v for k, v in r.items() if k != "extra"} for r in rs]  # noqa: E731
        assert strip(lines(tmp_path / "two" / task)) == strip(lines(tmp_path / "one" / task))
