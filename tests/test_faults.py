"""Regression tests for the run-folder holes that fault injection found (issue 14): each one
fails on the engine before the fix.

- model files hashed in full (a changed middle tensor is seen), cached so a resume reads nothing
- image bytes in the sample lines (swapped images are refused on resume, fixed ones recomputed)
- the run lock: a second `cm3eval run` on one --out is refused naming the holder (two processes)
- metrics.json merged atomically (concurrent merges lose nothing)
- `.NAME.tmp-PID` files of dead processes cleaned up
- a finished sample whose PNG is unreadable is regenerated
- a full disk (injected ENOSPC, and a real tiny tmpfs where one can be mounted) stops with one
  line, and the same command then completes with the metrics of an uninterrupted run
- the exit-status data the CLI maps to exit codes (n_failed, first_failure, missing metrics)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fixtures
import tasks
from evals import engine, provenance, runs
from tasks.spec import apply_overrides

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))


spec, run = fixtures.spec, fixtures.run_engine  # shared with the other engine tests


def metric_values(out: Path) -> dict:
    data = json.loads((out / "metrics.json").read_text())
    return {t: {k: (v["value"], v["ci"], v["n"]) for k, v in e["metrics"].items()} for t, e in data["tasks"].items()}


def copy_vqav2(root: Path, dst: Path) -> Path:
    fixtures.copy_tree(root / "annotations", dst / "annotations")
    fixtures.copy_tree(root / "val2014", dst / "val2014")
    return dst


# ----------------------------------------------------------------------------- fingerprints
def test_model_files_are_hashed_in_full_and_a_resume_reads_none_of_them(tmp_path, root):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"d_model": 8}')
    weights = model / "model.safetensors"
    weights.write_bytes(os.urandom(6 << 20))
    out = tmp_path / "run"
    run(spec("vqav2", limit="3"), out, root, fixtures.EchoPredictor(model_path=model))
    cfg = json.loads((out / "vqav2" / "config.json").read_text())
    assert set(cfg["hashed"]["model_files"]) == {"config.json", "model.safetensors"}
    read_before = provenance.digest_cache().hashed_bytes
    _, p = run(spec("vqav2", limit="3"), out, root, fixtures.EchoPredictor(model_path=model))
    assert p.calls == [] and provenance.digest_cache().hashed_bytes == read_before  # cached: nothing re-read
    # negate bytes in the middle of the file, in place; size and mtime kept (what the old
    # size + first/last MiB fingerprint could not see)
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(3 << 20)
        chunk = f.read(4096)
        f.seek(3 << 20)
        f.write(bytes(255 - b for b in chunk))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(engine.RunError, match=r"model_files\.model\.safetensors \('[0-9a-f]+' -> '[0-9a-f]+'\)"):
        run(spec("vqav2"), out, root, fixtures.EchoPredictor(model_path=model))


_DIGEST_WORKER = """
import hashlib, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # the cache logs a failed write at debug
from evals.provenance import DigestCache
db, start, out, files = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
cache = DigestCache(db)
cache.digest(Path(files[0]))  # a first write, then wait until the other process has written too
Path(str(out) + ".ready").touch()
while not start.exists():
    time.sleep(0.01)
lines = [f"{f} {cache.digest(Path(f))}" for f in files[1:]]
cache.close()
out.write_text("\\n".join(lines))
"""


def test_two_processes_digest_new_files_at_once_without_waiting_on_the_lock(tmp_path):
    """Each digest of a new file is a write; the old cache committed only every 256 writes, so a
    second process's first write waited 30 s and failed with "database is locked"."""
    import hashlib

    db, start = tmp_path / "digests.sqlite", tmp_path / "go"
    shared = [tmp_path / f"shared{i}.bin" for i in range(10)]
    own = {w: [tmp_path / f"{w}{i}.bin" for i in range(30)] for w in ("a", "b")}
    for f in shared + own["a"] + own["b"]:
        f.write_bytes(os.urandom(64 << 10))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {w: subprocess.Popen([sys.executable, "-c", _DIGEST_WORKER, str(db), str(start), str(tmp_path / f"{w}.out"),
                                  *map(str, [own[w][0], *shared, *own[w][1:]])],
                                 env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for w in own}
    # both have written once (the old cache: the second one is stuck behind the first's open
    # transaction until its 30 s timeout, then logs "database is locked")
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{w}.out.ready").exists() for w in own) and time.monotonic() < deadline:
        time.sleep(0.05)
    start.touch()
    errs = {w: p.communicate(timeout=120)[1] for w, p in procs.items()}
    for w, p in procs.items():
        assert p.returncode == 0, errs[w]
        assert "database is locked" not in errs[w], errs[w]
        got = dict(line.split(" ") for line in (tmp_path / f"{w}.out").read_text().splitlines())
        want = {str(f.resolve()): hashlib.sha256(f.read_bytes()).hexdigest() for f in shared + own[w][1:]}
        assert {str(Path(k).resolve()): v for k, v in got.items()} == want
    # every digest of both processes reached the file: a third reader hashes nothing
    again = provenance.DigestCache(db)
    for f in shared + own["a"] + own["b"]:
        assert again.digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert again.hashed_bytes == 0
    again.close()


def test_swapped_image_bytes_are_refused_on_resume(tmp_path, root):
    data = copy_vqav2(root, tmp_path / "data")
    out = tmp_path / "run"
    run(spec("vqav2", limit="4"), out, data)
    a, b = sorted((data / "val2014").glob("*.jpg"))[:2]
    ab, bb = a.read_bytes(), b.read_bytes()
    a.write_bytes(bb)
    b.write_bytes(ab)
    with pytest.raises(engine.RunError, match="input images changed since their samples were computed") as e:
        run(spec("vqav2"), out, data)
    assert f"val2014/{a.name}" in str(e.value) and "--overwrite" in str(e.value) and "\n" not in str(e.value)
    # restored: the run resumes as if nothing happened
    a.write_bytes(ab)
    b.write_bytes(bb)
    results, p = run(spec("vqav2"), out, data)
    assert len(p.calls) == 4 and results["vqav2"].n_samples == 8


def test_a_fixed_image_is_recomputed_after_its_data_failure(tmp_path, root):
    data = copy_vqav2(root, tmp_path / "data")
    victim = sorted((data / "val2014").glob("*.jpg"))[1]
    good = victim.read_bytes()
    fixtures.corrupt(victim)
    out = tmp_path / "run"
    results, _ = run(spec("vqav2"), out, data)
    failed = {f["id"] for f in results["vqav2"].failures}
    assert failed
    _, p = run(spec("vqav2"), out, data)  # a data failure stays final while the file is unchanged
    assert p.calls == []
    victim.write_bytes(good)
    results, p = run(spec("vqav2"), out, data)
    assert set(p.calls) == failed and results["vqav2"].failures == [] and results["vqav2"].n_failed == 0


# ----------------------------------------------------------------------------- the lock
def _echo_cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", fixtures.ECHO_MAIN, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM3EVAL_TEST_")}
    env.update(PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", **extra)
    return env


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, root):
    out, gate = tmp_path / "run", tmp_path / "go"
    args = ["run", "vqav2", "--model", "echo", "--data-root", str(root), "--batch-size", "1", "--out", str(out)]
    # the first run holds its lock and waits in its first predict() until the test creates `gate`
    first = _echo_cli(args, _env(CM3EVAL_TEST_WAIT_FOR=str(gate), CM3EVAL_TEST_LOG=str(tmp_path / "first.log")))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and runs.lock_holder(out) is None:
            time.sleep(0.05)
        assert first.poll() is None, f"the first run ended early: {first.communicate()}"
        # the hole: a second run with a smaller --limit must not swap the samples file under the first
        second = subprocess.run([sys.executable, "-c", fixtures.ECHO_MAIN, *args, "--limit", "2"], cwd=REPO,
                                env=_env(CM3EVAL_TEST_LOG=str(tmp_path / "second.log")), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        # one error line; before it only the plan's lines (device, disk estimate, per-task sizing)
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and "Traceback" not in second.stderr, lines
        assert not any(line.startswith("error") for line in lines[:-1]), lines
        err = lines[-1]
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in err
        assert not (tmp_path / "second.log").exists()  # it computed nothing
        gate.touch()
        _, first_err = first.communicate(timeout=120)
        assert first.returncode == 0, first_err
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / "metrics.json").read_text())["tasks"]["vqav2"]["n_samples"] == 8
    assert len((tmp_path / "first.log").read_text().split()) == 8 and not (out / runs.LOCK).exists()


def test_a_lock_left_by_a_killed_run_is_stale(tmp_path, root):
    out = tmp_path / "run"
    args = ["run", "vqav2", "--model", "echo", "--data-root", str(root), "--batch-size", "1", "--out", str(out)]
    proc = _echo_cli(args, _env(CM3EVAL_TEST_WAIT_FOR=str(tmp_path / "never")))  # holds the lock, waits
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and runs.lock_holder(out) is None:
        time.sleep(0.05)
    assert proc.poll() is None
    proc.kill()
    proc.wait()
    assert json.loads((out / runs.LOCK).read_text())["pid"] == proc.pid  # left behind by kill -9
    results, _ = run(spec("vqav2"), out, root)
    assert results["vqav2"].n_samples == 8 and not (out / runs.LOCK).exists()


# ----------------------------------------------------------------------------- metrics.json
def test_concurrent_metric_merges_lose_no_update(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = ("import sys; from evals import runs\n"
            "for i in range(25):\n"
            "    runs.merge_task_metrics(sys.argv[1], {'w': sys.argv[2]}, {f'task-{sys.argv[2]}-{i}': {'i': i}})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(w)], cwd=REPO) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    tasks_ = runs.read_metrics(run_dir)["tasks"]
    assert len(tasks_) == 100 and sorted(tasks_) == sorted(f"task-{w}-{i}" for w in range(4) for i in range(25))


def test_temp_files_of_dead_processes_are_cleaned_up(tmp_path, root):
    out = tmp_path / "run"
    run(spec("vizwiz"), out, root)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    litter = [out / f".metrics.json.tmp-{pid}", out / "vizwiz" / "images" / f".0000001-x-output.png.tmp-{pid}",
              out / "vizwiz" / "samples" / f".rank-00000.jsonl.tmp-{pid}"]
    for p in litter:
        p.write_bytes(b"cut off by a kill")
    run(spec("vizwiz"), out, root)
    assert not list(out.rglob(".*.tmp-*"))


# ----------------------------------------------------------------------------- unreadable outputs
def test_a_truncated_png_of_a_finished_sample_is_regenerated(tmp_path, root):
    out = tmp_path / "run"
    run(spec("magicbrush-edit"), out, root)
    first = runs.read_samples(out / "magicbrush-edit")
    victim = next(iter(first.values()))
    png = out / "magicbrush-edit" / victim["images"]["output"]
    png.write_bytes(png.read_bytes()[:60])
    results, p = run(spec("magicbrush-edit"), out, root)
    assert p.calls == [victim["id"]] and results["magicbrush-edit"].failures == []
    run(spec("magicbrush-edit"), tmp_path / "fresh", root)
    assert metric_values(out) == metric_values(tmp_path / "fresh")


# ----------------------------------------------------------------------------- a full disk
class _Disk:
    """runs._os_write with a byte budget: past it, a partial write and then ENOSPC."""

    def __init__(self, budget: int | None) -> None:
        self.budget, self.written = budget, 0

    def __call__(self, fd: int, data) -> int:
        data = bytes(data)
        if self.budget is not None and self.written + len(data) > self.budget:
            room = max(0, self.budget - self.written)
            if room:
                self.written += os.write(fd, data[: room // 2 or 1])
                return room // 2 or 1
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, data)
        self.written += n
        return n


def test_a_full_disk_stops_with_one_line_and_the_same_command_completes(tmp_path, root, monkeypatch):
    counter = _Disk(None)
    monkeypatch.setattr(runs, "_os_write", counter)
    run(spec("magicbrush-edit"), tmp_path / "ref", root, batch_size=1)
    out = tmp_path / "run"
    monkeypatch.setattr(runs, "_os_write", _Disk(counter.written // 2))
    with pytest.raises(runs.DiskFullError) as e:
        run(spec("magicbrush-edit"), out, root, batch_size=1)
    msg = str(e.value)
    assert "no space left on device" in msg and "run the same command again" in msg and "\n" not in msg
    assert not list(out.rglob(".*.tmp-*"))  # the failed write left no temp file
    lines_file = out / "magicbrush-edit" / "samples" / "rank-00000.jsonl"
    assert not lines_file.exists() or lines_file.read_bytes().endswith(b"\n") or lines_file.read_bytes() == b""
    done = set(runs.read_samples(out / "magicbrush-edit"))
    monkeypatch.setattr(runs, "_os_write", os.write)  # space freed
    _, p = run(spec("magicbrush-edit"), out, root, batch_size=1)
    assert not set(p.calls) & done and len(done) + len(p.calls) == 4
    assert metric_values(out) == metric_values(tmp_path / "ref")


def test_a_full_disk_is_one_line_and_exit_2_on_the_command_line(tmp_path, root, monkeypatch, capsys):
    from evals.cli import main

    monkeypatch.setattr(runs, "_os_write", _Disk(6_000))
    args = ["run", "vqav2", "--model", "echo", "--data-root", str(root), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    code = main(args, predictor_factory=fixtures.make_echo)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "no space left on device" in err[0]


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_a_real_tiny_tmpfs_fills_up_then_resumes(tmp_path, root):
    ref = tmp_path / "ref"
    run(spec("magicbrush-edit"), ref, root, batch_size=1)
    need = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, max(16384, need // 2)):
        pytest.skip("cannot mount a tmpfs here (not root); the injected ENOSPC test covers the logic")
    try:
        with pytest.raises(runs.DiskFullError, match="no space left on device"):
            run(spec("magicbrush-edit"), disk / "run", root, batch_size=1)
        assert not list((disk / "run").rglob(".*.tmp-*"))
        subprocess.run(["mount", "-o", f"remount,size={need * 4 + (1 << 20)}", str(disk)], check=True)  # freed
        run(spec("magicbrush-edit"), disk / "run", root, batch_size=1)
        assert metric_values(disk / "run") == metric_values(ref)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- exit-status data
def test_task_results_carry_what_the_exit_code_needs(tmp_path, root, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", "802000")
    results, _ = run(spec("vqav2"), tmp_path / "a", root)
    r = results["vqav2"]
    assert (r.n_samples, r.n_failed) == (8, 1) and r.first_failure["id"] == "802000"
    assert "test failure for sample 802000" in r.first_failure["error"] and r.missing_metrics == {}
    assert engine.exit_status([r], max_failures=0.2) == (0, [])
    code, why = engine.exit_status([r], max_failures=0.01)
    assert code == 1 and "1 of 8 samples failed" in why[0] and "802000" in why[0]
    monkeypatch.delenv("CM3EVAL_TEST_FAIL_IDS")
    # coco-fid without the Inception weights: every sample generated, FID requested but missing
    results, _ = run(spec("coco-fid", limit="3"), tmp_path / "b", root)
    f = results["coco-fid"]
    assert f.n_failed == 0 and "fid" in f.missing_metrics and "Inception" in f.missing_metrics["fid"]
    assert f.entry["missing_metrics"] == f.missing_metrics
    code, why = engine.exit_status([f])
    assert code == 3 and any("fid" in w for w in why)
    assert engine.exit_status([r, f], max_failures=0.01)[0] == 1  # failures first


def test_every_sample_failed_is_never_exit_0(tmp_path, root, monkeypatch):
    from tasks.loaders import load_dataset

    every = [s.id for s in load_dataset(spec("vizwiz"), root).samples]
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", ",".join(every))
    results, _ = run(spec("vizwiz"), tmp_path / "run", root)  # 4 < max_systematic_failures: no abort
    r = results["vizwiz"]
    assert r.n_failed == r.n_samples == 4 and r.metrics == {}
    code, _ = engine.exit_status([r], max_failures=1.0)  # even when every failure is "allowed"
    assert code == 1 and r.missing_metrics
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", ",".join(
        s.id for s in load_dataset(spec("vqav2"), root).samples))
    with pytest.raises(engine.SystematicFailure) as e:
        run(spec("vqav2"), tmp_path / "run2", root, batch_size=4, max_systematic_failures=4)
    assert e.value.exit_code == 1


def test_metric_entries_carry_their_direction(tmp_path, root):
    run(spec("magicbrush-edit"), tmp_path / "run", root)
    metrics = runs.read_metrics(tmp_path / "run")["tasks"]["magicbrush-edit"]["metrics"]
    assert all(isinstance(m.get("higher_is_better"), bool) for m in metrics.values()), metrics
    assert metrics["L1"]["higher_is_better"] is False and metrics["L2 (MSE)"]["higher_is_better"] is False
