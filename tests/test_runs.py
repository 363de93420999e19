"""evals/runs.py, the run-folder contract: the one reader and its torn-line rule, the writer,
atomic writes, metrics.json merging, the run lock, temp-file clean-up, finished-run detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.errors import Cm3evalError
from evals import runs

REPO = Path(__file__).resolve().parents[1]


def rec(i: int, **kw) -> dict:
    return {"id": f"s{i}", "index": i, "failure": None, **kw}


# ----------------------------------------------------------------------------- the reader
def test_reader_skips_only_a_torn_last_line(tmp_path):
    task = tmp_path / "task"
    with runs.SampleWriter(task, 0) as w:
        for i in range(3):
            w.write(rec(i))
    f = task / "samples" / "rank-00000.jsonl"
    with open(f, "a") as fh:
        fh.write(json.dumps(rec(3))[:15])  # a kill in the middle of the 4th line
    assert list(runs.read_samples(task)) == ["s0", "s1", "s2"]
    # the writer cuts the torn line before appending, so the next line starts fresh
    with runs.SampleWriter(task, 0) as w:
        w.write(rec(3))
    assert list(runs.read_samples(task)) == ["s0", "s1", "s2", "s3"]
    assert f.read_text().count("\n") == 4


def test_a_malformed_complete_line_is_an_error_naming_file_and_line(tmp_path):
    task = tmp_path / "task"
    (task / "samples").mkdir(parents=True)
    f = task / "samples" / "rank-00001.jsonl"
    f.write_text(json.dumps(rec(0)) + "\n{not json}\n" + json.dumps(rec(1)) + "\n")
    with pytest.raises(runs.RunFolderError, match=r"rank-00001.jsonl:2: malformed sample line") as e:
        runs.read_samples(task)
    assert isinstance(e.value, Cm3evalError) and "\n" not in str(e.value)
    f.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(runs.RunFolderError, match=r":1: a sample line must be a JSON object with an id"):
        runs.read_samples(task)


def test_reader_merges_ranks_by_id_success_wins_ordered_by_index(tmp_path):
    task = tmp_path / "task"
    with runs.SampleWriter(task, 1) as w:
        w.write(rec(3))
        w.write(rec(1, failure="boom"))
    with runs.SampleWriter(task, 0) as w:
        w.write(rec(2))
        w.write(rec(1, prediction="ok"))
        w.write(rec(0))
    got = runs.read_samples(task)
    assert list(got) == ["s0", "s1", "s2", "s3"]
    assert got["s1"]["failure"] is None and got["s1"]["prediction"] == "ok"


def test_rewrite_samples_leaves_one_sorted_file(tmp_path):
    task = tmp_path / "task"
    for rank in (0, 1):
        with runs.SampleWriter(task, rank) as w:
            w.write(rec(rank + 2))
    runs.rewrite_samples(task, {**runs.read_samples(task), "s0": rec(0)})
    assert [p.name for p in runs.sample_files(task)] == ["rank-00000.jsonl"]
    assert [r["index"] for r in runs.read_samples(task).values()] == [0, 2, 3]


# ----------------------------------------------------------------------------- other files
def test_read_json_errors_are_one_line(tmp_path):
    with pytest.raises(runs.RunFolderError, match="missing"):
        runs.read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(runs.RunFolderError, match=r"bad.json: malformed JSON at line 1"):
        runs.read_json(tmp_path / "bad.json")


def test_metrics_config_and_task_names(tmp_path):
    run = tmp_path / "run"
    assert runs.read_metrics(run) == {} and not runs.is_finished_run(run)
    runs.write_task_config(run / "a", {"hash": "h"})
    assert runs.read_task_config(run, "a") == {"hash": "h"} and runs.read_task_config(run, "b") is None
    assert (run / "a" / "samples").is_dir() and (run / "a" / "images").is_dir()
    assert not runs.is_finished_run(run)  # a started task is not a finished run
    runs.merge_task_metrics(run, {"model": "m"}, {"b": {"metrics": {}}})
    assert runs.task_names(run) == ["a", "b"] and runs.is_finished_run(run)
    runs.merge_task_metrics(run, {"model": "m2"}, {"a": {"metrics": {"x": {"value": 1}}}})
    data = runs.read_metrics(run)
    assert data["run"] == {"model": "m2"} and set(data["tasks"]) == {"a", "b"}
    (tmp_path / "empty").mkdir()
    assert not runs.is_finished_run(tmp_path / "empty") and not runs.is_finished_run(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")
    assert not runs.is_finished_run(tmp_path / "broken")


def test_atomic_write_leaves_no_temp_file_and_cleanup_spares_live_writers(tmp_path):
    runs.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert runs.read_json(tmp_path / "x.json") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".metrics.json.tmp-{dead.stdout.strip()}").write_text("left by a kill")
    (tmp_path / "t" / "images").mkdir(parents=True)
    (tmp_path / "t" / "images" / f".a.png.tmp-{dead.stdout.strip()}").write_bytes(b"half")
    live = tmp_path / f".report.html.tmp-{os.getppid()}"  # a live process (our parent) still writing
    live.write_text("in progress")
    assert runs.clean_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob(".*tmp-*")) == [live.name]


# ----------------------------------------------------------------------------- the lock
def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with runs.RunLock(run):
        assert runs.lock_holder(run).pid == os.getpid()
        with pytest.raises(runs.RunLockedError) as e:
            runs.RunLock(run).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "\n" not in msg
    assert runs.lock_holder(run) is None and not (run / runs.LOCK).exists()  # released: the file is gone


def test_lock_held_by_another_process_then_stale_after_its_death(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from evals import runs; l = runs.RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunLockedError, match=f"pid {proc.pid} on host "):
            runs.RunLock(run).acquire()
    finally:
        proc.kill()
        proc.wait()
    # killed -9: its lock file is still there, naming a dead pid; the kernel dropped the flock
    assert json.loads((run / runs.LOCK).read_text())["pid"] == proc.pid
    with runs.RunLock(run) as lock:
        assert lock.held and runs.lock_holder(run).pid == os.getpid()


def test_stale_lock_without_flock_is_judged_by_pid(tmp_path, monkeypatch):
    """A file system without flock: a holder on this host whose pid is gone is stale; a live one
    (or one on another host, which cannot be checked) is refused."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / runs.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    runs.RunLock(run).acquire().release()
    (run / runs.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(runs.RunLockedError, match=f"pid {os.getppid()}"):
        runs.RunLock(run).acquire()
    (run / runs.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(runs.RunLockedError, match="host elsewhere"):
        runs.RunLock(run).acquire()


def test_unreadable_images_by_recorded_digest_size_or_verify(tmp_path, monkeypatch):
    from PIL import Image

    from evals.provenance import file_digest

    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task"
    (task / "images").mkdir(parents=True)
    a, b = task / "images" / "a.png", task / "images" / "b.png"
    da = runs.save_png(Image.new("RGB", (40, 40), (10, 200, 30)), a)
    runs.save_png(Image.new("RGB", (40, 40), (1, 2, 3)), b)
    assert da == file_digest(a)
    line = {"images": {"output": "images/a.png"}, "candidates": ["images/b.png"], "image_digests": {"images/a.png": da}}
    sized = {**{k: v for k, v in line.items() if k != "image_digests"}, "image_bytes": {"images/a.png": a.stat().st_size}}
    bare = {k: v for k, v in line.items() if k != "image_digests"}  # a line recording neither
    assert runs.unreadable_images(task, line) == runs.unreadable_images(task, sized) == \
        runs.unreadable_images(task, bare) == []
    data = bytearray(a.read_bytes())  # one flipped byte in the pixel data: same size, still a valid PNG chunk layout
    data[len(data) // 2] ^= 0xFF
    a.write_bytes(bytes(data))
    assert runs.unreadable_images(task, line) == ["images/a.png"]  # the digest sees it
    assert runs.unreadable_images(task, sized) == []  # a size cannot
    for path in (a, b):
        path.write_bytes(path.read_bytes()[:50])  # truncated
    assert runs.unreadable_images(task, line) == ["images/a.png", "images/b.png"]
    assert runs.unreadable_images(task, bare) == ["images/a.png", "images/b.png"]
    a.unlink()
    assert runs.unreadable_images(task, line)[0] == "images/a.png"
