"""The engine's mechanics, end to end on fixtures in the official layouts.

Most tests drive the engine with `fixtures.EchoPredictor`, a deterministic predictor whose output
is a pure function of (sample id, seed) — the same property the real sampler has — so they test
the engine alone: run folder layout, resume, config-hash refusal, per-sample failures, batch-size
and process-count independence, kill -9. The last tests run the real `evals.predict` predictor on
a tiny random-weight cm3leon checkpoint built in the test.
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
from typer.testing import CliRunner

import fixtures
import tasks
from evals import engine
from evals.cli import app
from tasks.spec import apply_overrides

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_all(tmp_path_factory.mktemp("data"))


def spec(name: str, **over):
    return apply_overrides(tasks.get(name), over) if over else tasks.get(name)


def run(specs, out, root, predictor=None, **kw):
    predictor = predictor or fixtures.EchoPredictor()
    opts = engine.RunOptions(out=out, data_root=root, progress=False, **kw)
    return engine.run(specs if isinstance(specs, list) else [specs], predictor, opts), predictor


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
    env.update(CM3EVAL_TEST_PREDICTOR=fixtures.ECHO_HOOK, PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", **extra)
    if "CM3EVAL_TEST_DELAY" not in extra:
        env.pop("CM3EVAL_TEST_DELAY", None)
    return env


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
    monkeypatch.setattr(fid_lib, "inception_extractor", lambda weights=None, device="cpu": ext)
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    results, _ = run(spec("coco-fid", limit="4", **{"metrics.fid.cache_dir": str(cache)}), out, root)
    m = results["coco-fid"].metrics["FID"]
    recs = lines(out / "coco-fid")
    gen = [out / "coco-fid" / r["images"]["output"] for r in recs]
    ref = [root / r["input"]["image"] for r in recs]
    expected = fid_lib.compute_fid(gen, fid_lib.image_stats(ref, ext, resolution=256), feature_extractor=ext,
                                   resolution=256)
    assert m["n"] == 4 and m["value"] == pytest.approx(expected.value, rel=1e-9)
    assert len(list(cache.glob("ref-*.npz"))) == 1  # the reference statistics are cached on disk


def test_a_broken_report_never_fails_the_run(tmp_path, root, monkeypatch, caplog):
    import reports.html

    def boom(run_dir, **kw):
        raise RuntimeError("report exploded")

    monkeypatch.setattr(reports.html, "write_run_report", boom)
    results, _ = run(spec("vizwiz"), tmp_path / "run", root)
    assert results["vizwiz"].metrics["accuracy"]["n"] == 4 and (tmp_path / "run" / "metrics.json").is_file()
    assert "report.html not written: RuntimeError: report exploded" in caplog.text


def test_demo_tasks_build_their_world_in_the_cache(tmp_path, root, monkeypatch):
    from tasks import shapes_world

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    small = shapes_world.WorldConfig(n_train=6, n_val=2, n_test=3)
    calls = []

    def ensure(path, cfg=None, **kw):  # the real ensure_world with a smaller world, to stay fast
        calls.append(Path(path))
        return shapes_world.write_world(shapes_world.generate_world(small), path)

    monkeypatch.setattr(shapes_world, "ensure_world", ensure)
    results, _ = run(spec("shapes-vqa"), tmp_path / "run", None)
    assert calls == [tmp_path / "cache" / "shapes"]
    assert results["shapes-vqa"].n_samples == 3 * small.questions_per_image


# ----------------------------------------------------------------------------- the command line
def test_cli_errors_are_one_line(tmp_path, root, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_PREDICTOR", fixtures.ECHO_HOOK)
    runner = CliRunner()

    def check(args, code, *needles):
        res = runner.invoke(app, args)
        assert res.exit_code == code, (res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr
        for n in needles:
            assert n in res.stderr
        return res

    base = ["run", "vqav2", "--data-root", str(root), "--out", str(tmp_path / "o")]
    check(base + ["--set", "generation.cfg_scal=2"], 2, "did you mean generation.cfg_scale")
    check(base + ["--set", "generation.top_p=high"], 2, "--set generation.top_p=high: expected a number in (0, 1]")
    check(["run", "vqav2", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")], 1,
          "vqav2: data root", "does not exist; expected layout:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: [vqa\n")
    check(["run", str(bad), "--data-root", str(root)], 2, f"{bad}: malformed YAML at line")
    check(["run", "vqav2", "--data-root", str(root), "--out", str(tmp_path / "o"), "--sweep", "x"], 2, "--sweep x")


def test_cli_run_with_a_corrupt_image_finishes_and_reports_it(tmp_path, root, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_PREDICTOR", fixtures.ECHO_HOOK)
    data = tmp_path / "data"
    fixtures.copy_tree(root / "vizwiz", data / "vizwiz")
    fixtures.corrupt(data / "vizwiz" / "val" / "VizWiz_val_00000002.jpg")
    res = CliRunner().invoke(app, ["run", "vizwiz", "--data-root", str(data), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.stderr
    entry = json.loads(res.stdout)[str(tmp_path / "o")]["vizwiz"]
    assert entry["failures"] == [{"id": "VizWiz_val_00000002", "error": entry["failures"][0]["error"]}]
    assert "corrupt or unreadable image vizwiz/val/VizWiz_val_00000002.jpg" in entry["failures"][0]["error"]
    assert entry["metrics"]["accuracy"]["n"] == 3


def test_cli_sweep_writes_one_run_per_value_and_a_leaderboard(tmp_path, root, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_PREDICTOR", fixtures.ECHO_HOOK)
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["run", "vizwiz", "--data-root", str(root), "--out", str(out),
                                   "--sweep", "generation.cfg_scale=1,2", "--json"])
    assert res.exit_code == 0, res.stderr
    for v in ("1", "2"):
        cfg = json.loads((out / f"cfg_scale={v}" / "vizwiz" / "config.json").read_text())
        assert cfg["task"]["generation"]["cfg_scale"] == float(v) and cfg["overrides"] == {"generation.cfg_scale": float(v)}
    assert (out / "leaderboard.csv").is_file()


# ----------------------------------------------------------------------------- processes
def _cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "evals.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kw)


def test_kill_9_then_resume_gives_identical_metrics_and_no_recomputation(tmp_path, root):
    args = ["run", "vqav2", "--data-root", str(root), "--batch-size", "1"]
    ref = _cli(args + ["--out", str(tmp_path / "ref")], env_with_echo(), timeout=300)
    assert ref.returncode == 0, ref.stderr
    out, log = tmp_path / "killed", tmp_path / "calls.log"
    env = env_with_echo(CM3EVAL_TEST_DELAY="0.4", CM3EVAL_TEST_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-m", "evals.cli", *args, "--out", str(out)], cwd=REPO, env=env,
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
                          "-m", "evals.cli", *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
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


# ----------------------------------------------------------------------------- the real predictor
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from tasks import shapes_world

    root = tmp_path_factory.mktemp("shapes")
    shapes_world.write_world(shapes_world.generate_world(shapes_world.WorldConfig(n_train=16, n_val=2, n_test=4, questions_per_image=2)), root)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shapes_root) -> Path:
    """A random-weight cm3leon checkpoint in the native folder format: tokenizer trained on the
    world's text, a 16-px VQ (16 codes per image), a 1-layer decoder and a small dual encoder."""
    import torch

    from cm3leon import checkpoint
    from cm3leon.config import ModelConfig
    from cm3leon.encoder import NativeDualEncoder, NativeEncoderConfig
    from cm3leon.text import TextTokenizer
    from cm3leon.transformer import Transformer
    from cm3leon.vq import VQConfig, VQModel

    corpus = []
    for f in (shapes_root / "annotations").glob("captions_*.json"):
        corpus += [a["caption"] for a in json.loads(f.read_text())["annotations"]]
    for f in (shapes_root / "vqa").glob("*_questions.json"):
        corpus += [q["question"] for q in json.loads(f.read_text())["questions"]]
    torch.manual_seed(0)
    tok = TextTokenizer.train(corpus, n_text=300, image_codebook_size=16)
    vq = VQModel(VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
                          attn_resolutions=[], latent_channels=32, embed_dim=8, num_embeddings=16)).eval()
    cfg = ModelConfig(**tok.model_config_fields(), image_seq_len=16, d_model=32, n_layers=1, n_heads=2,
                      max_seq_len=512)
    enc = NativeDualEncoder(NativeEncoderConfig(image_size=16, image_channels=(8, 16), text_dim=16, text_layers=1,
                                                text_heads=2, dim=16)).eval()
    bundle = checkpoint.ModelBundle(cfg, Transformer(cfg).eval(), tok, vq, 16, encoder=enc)
    return checkpoint.save(bundle, tmp_path_factory.mktemp("ckpt") / "tiny")


def _real_run(args, monkeypatch):
    monkeypatch.delenv("CM3EVAL_TEST_PREDICTOR", raising=False)
    res = CliRunner().invoke(app, ["run", *args, "--json"])
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:])
    return json.loads(res.stdout)


def test_real_predictor_end_to_end_on_a_tiny_model(tmp_path, shapes_root, tiny_model, monkeypatch):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "4", "--out", str(out)]
    res = _real_run(["shapes-fid", "shapes-vqa", "shapes-edit", *common, "--batch-size", "3",
                     "--set", "metrics.fid.feature_space=model", "--set", "metrics.rank_accuracy.encoder=model",
                     "--set", "metrics.clip_i.encoder=model", "--set", "metrics.clip_t.encoder=model",
                     "--candidates", "2", "--set", "generation.rerank=true"], monkeypatch)[str(out)]
    fid = res["shapes-fid"]["metrics"]
    assert "FD-native" in fid and "FID" not in fid and "t2i_R@1" in fid  # an encoder's space is never "FID"
    assert 0 <= res["shapes-vqa"]["metrics"]["accuracy"]["value"] <= 100
    assert {"L1", "L2 (MSE)", "DEMO-I", "DEMO-T"} <= set(res["shapes-edit"]["metrics"])
    assert all(not r["failures"] for r in res.values())
    for r in lines(out / "shapes-fid"):  # two candidates, reranked by the encoder, the best one kept
        assert len(r["candidates"]) == 2 and len(r["scores"]) == 2 and r["best"] == max((0, 1), key=lambda j: r["scores"][j])
        from PIL import Image

        with Image.open(out / "shapes-fid" / r["images"]["output"]) as im:
            assert im.size == (16, 16)
    for r in lines(out / "shapes-vqa"):
        assert isinstance(r["prediction"], str) and r["prompt"].startswith("Question: ")
    # the same command resumes without recomputing anything, and batch size does not change results
    again = _real_run(["shapes-vqa", *common[:-2], "--out", str(tmp_path / "b1"), "--batch-size", "1"], monkeypatch)
    assert [r["prediction"] for r in lines(tmp_path / "b1" / "shapes-vqa")] == \
        [r["prediction"] for r in lines(out / "shapes-vqa")]
    assert again[str(tmp_path / "b1")]["shapes-vqa"]["metrics"] == res["shapes-vqa"]["metrics"]


def test_lm_scorer_reranks_by_caption_likelihood(tmp_path, shapes_root, tiny_model, monkeypatch):
    """scorer=lm: each candidate's score is log p(caption + eos | candidate image) under the decoder
    itself (the math is tested in test_sampling; here: what reaches it and what comes back)."""
    import evals.predict as predict
    from cm3leon import checkpoint

    real, calls = predict.continuation_logprobs, []

    def spy(model, prompts, continuation, **kw):
        calls.append((prompts, continuation))
        return real(model, prompts, continuation, **kw)

    monkeypatch.setattr(predict, "continuation_logprobs", spy)
    out = tmp_path / "run"
    _real_run(["shapes-fid", "--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "3",
               "--out", str(out), "--set", "metrics.fid.feature_space=model",
               "--set", "metrics.rank_accuracy.encoder=model", "--candidates", "3",
               "--set", "generation.rerank=true", "--set", "generation.scorer=lm"], monkeypatch)
    b = checkpoint.load(tiny_model)
    rows = lines(out / "shapes-fid")
    assert len(rows) == 3 and len(calls) == 3
    by_caption = {tuple(cont): prompts for prompts, cont in calls}
    for r in rows:
        cont = tuple(b.tokenizer.encode(r["prompt"]) + [b.config.eos_id])
        prompts = by_caption[cont]  # the caption itself, after each candidate image
        assert len(prompts) == 3 and all(p[-1] == b.config.break_id and b.config.boi_id in p for p in prompts)
        assert len(set(map(tuple, prompts))) > 1  # three different candidates were scored
        assert all(x <= 0 for x in r["scores"])  # log-probabilities
        assert r["best"] == max(range(3), key=lambda j: (r["scores"][j], -j))


def test_real_predictor_with_retrieval_and_shots(tmp_path, shapes_root, tiny_model, monkeypatch):
    from cm3leon import checkpoint
    from cm3leon.retrieval import MemoryBank, RetrievalDoc

    bundle = checkpoint.load(tiny_model)
    train = json.loads((shapes_root / "annotations" / "captions_train.json").read_text())
    names = {im["id"]: im["file_name"] for im in train["images"]}
    docs = [RetrievalDoc(id=str(a["id"]), text=a["caption"], image_path=f"images/train/{names[a['image_id']]}")
            for a in train["annotations"][::5]]
    bank_dir = tmp_path / "bank"
    MemoryBank.build(docs, bundle.encoder, out_dir=bank_dir, image_root=shapes_root, progress=False)
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "3", "--out", str(out)]
    res = _real_run(["shapes-fid", "shapes-vqa", *common, "--set", "retrieval.enabled=true",
                     "--set", f"retrieval.bank={bank_dir}", "--retrieval-k", "2", "--set", "prompt.k_shot=1",
                     # a random encoder puts everything close together: keep the diversity filter out of the way
                     "--set", "retrieval.max_similarity=1.0",
                     "--set", "metrics.fid.feature_space=model", "--set", "metrics.rank_accuracy.encoder=model"],
                    monkeypatch)[str(out)]
    assert not res["shapes-fid"]["failures"] and not res["shapes-vqa"]["failures"]
    for task in ("shapes-fid", "shapes-vqa"):
        for r in lines(out / task):
            assert len(r["retrieved"]) == 2 and all(d["text"] and d["image"] for d in r["retrieved"])
            assert len(r["shots"]) == 1
    cfg = json.loads((out / "shapes-fid" / "config.json").read_text())
    assert cfg["hashed"]["predictor"]["bank"]  # the bank's identity is part of the config hash


def test_predictor_encodes_each_image_once_and_prompts_match_the_codec(shapes_root, tiny_model, monkeypatch):
    """VQA asks several questions per image: the predictor VQ-encodes each distinct image once (one
    batched call), and the prompt it builds from cached codes equals the codec's prompt from pixels."""
    from PIL import Image

    from cm3leon import checkpoint
    from cm3leon.document import Document
    from evals.engine import Batch, Item
    from evals.predict import ModelPredictor, sampling_config
    import tasks
    from tasks.loaders import load_dataset

    spec = tasks.get("shapes-vqa")
    samples = load_dataset(spec, shapes_root).samples[:6]
    for i, s in enumerate(samples):
        s.seed = i
    images = {s.image: Image.open(shapes_root / s.image).convert("RGB") for s in samples}
    assert len(images) < len(samples)  # the fixture repeats images across questions
    pred = ModelPredictor(checkpoint.load(tiny_model), batch_size=8)
    calls = []
    real = pred.codec.image_codes
    monkeypatch.setattr(pred.codec, "image_codes", lambda ims: calls.append(len(ims)) or real(ims))
    items = [Item(sample=s, images={"image": images[s.image].copy()}) for s in samples]
    outs = pred.predict(Batch(task=spec, items=items, data_root=shapes_root))
    assert len(outs) == len(samples) and calls == [len(images)]
    pred.predict(Batch(task=spec, items=items[:2], data_root=shapes_root))
    assert calls == [len(images)]  # the second batch hits the cache
    req, _, _ = pred._request(spec, items[0], sampling_config(spec), ([], []))
    text = spec.prompt.template.format(question=samples[0].text)
    assert req.prompt == pred.codec.prompt(Document([images[samples[0].image], text]), "text")
