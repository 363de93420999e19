"""`cm3eval run --tp N` end to end: tensor parallelism inside the engine (issue 15).

Under torchrun the world is split into data-parallel groups of `tp` ranks (evals/dist.py): the
engine shards samples by group, the ranks of a group run the same batches in lockstep on their
halves of the model (cm3leon/tensor_parallel.py), only the group's tp_rank 0 writes, and global
rank 0 scores every group's lines. On gloo/CPU with the shipped demo model, a text task and an
image task must give the metrics, sample lines and PNG bytes of a 1-process run, with `--tp 2`
on 2 processes, with `--tp 1` on 2 processes (pure data parallelism) and with `--tp 2` on 4
processes (2 copies x 2 ranks), and a cut-off run must resume under `--tp 2` to the same
result (about 40 s in all on 2 cores). The in-process tests check the engine's side of the
contract on one simulated rank (sharding by dp_rank, the silent peer, the group's errors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fixtures
from evals import engine
from evals.dist import Dist

REPO = Path(__file__).resolve().parents[1]
# a text task and an image task (t2i: sampled with top-p and CFG, PNGs); --limit 8 leaves each
# of 2 data-parallel shards 4 samples, i.e. uneven batches of 3 + 1 at --batch-size 3
TASKS = ["shapes-vqa", "shapes-fid"]
LIMIT = "8"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _cli(out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = ["run", *TASKS, "--model", "demo", "--limit", LIMIT, "--out", str(out), *extra]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    res = subprocess.run([*launcher, "-m", "evals.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _metrics(out: Path) -> dict:
    data = json.loads((out / "metrics.json").read_text())
    return {t: e["metrics"] for t, e in data["tasks"].items()}


def _run_meta(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["run"]


def _lines(task_dir: Path) -> list[dict]:
    files = sorted((task_dir / "samples").glob("*.jsonl"))
    assert [f.name for f in files] == ["rank-00000.jsonl"]  # every group's file merged by rank 0
    return [json.loads(x) for x in files[0].read_text().splitlines() if x.strip()]


def _pngs(task_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((task_dir / "images").glob("*.png"))}


def _assert_same_run(out: Path, ref: Path) -> None:
    assert _metrics(out) == _metrics(ref)  # values, CIs, n, higher_is_better: all identical
    for task in TASKS:
        assert _lines(out / task) == _lines(ref / task)  # predictions, tokens (extra.codes), PNG sizes
        assert _pngs(out / task) == _pngs(ref / task)
    assert _pngs(ref / "shapes-fid"), "the image task wrote no PNGs"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _cli(out, "--batch-size", "3")
    return out


def test_tp2_on_two_processes_matches_one_process(one_process, tmp_path):
    """One model copy split over 2 ranks: both run every batch, rank 0 alone writes."""
    res = _cli(tmp_path / "tp2", "--tp", "2", nproc=2)  # batch sizes from the model, agreed by both ranks
    assert "split over 2 ranks per copy (2 of 4 KV heads per rank), 1 data-parallel copies" in res.stderr
    assert _run_meta(tmp_path / "tp2")["world_size"] == 2 and _run_meta(tmp_path / "tp2")["tp"] == 2
    _assert_same_run(tmp_path / "tp2", one_process)


def test_tp1_on_two_processes_stays_data_parallel(one_process, tmp_path):
    res = _cli(tmp_path / "dp2", "--tp", "1", "--batch-size", "3", nproc=2)
    assert "tensor parallel" not in res.stderr
    assert _run_meta(tmp_path / "dp2")["tp"] == 1
    _assert_same_run(tmp_path / "dp2", one_process)


def test_two_copies_of_two_ranks_match_one_process(one_process, tmp_path):
    """dp 2 x tp 2 on 4 processes: each copy takes every other sample (uneven batches)."""
    res = _cli(tmp_path / "dp2tp2", "--tp", "2", "--batch-size", "3", nproc=4)
    assert "2 data-parallel copies" in res.stderr
    _assert_same_run(tmp_path / "dp2tp2", one_process)


def test_tp2_resumes_a_cut_off_run_in_lockstep(one_process, tmp_path):
    """Both ranks of the copy read the run folder before either writes: they compute the same
    to-do list from the lines a 1-process run left, and finish it to the same result."""
    out = fixtures.copy_tree(one_process, tmp_path / "resumed")
    for task in TASKS:
        f = out / task / "samples" / "rank-00000.jsonl"
        f.write_text("".join(f.read_text().splitlines(keepends=True)[:3]))  # 5 of 8 samples left to do
    res = _cli(out, "--tp", "2", nproc=2)
    assert "resuming, 3 of 8 samples already done" in res.stderr
    _assert_same_run(out, one_process)


def test_tp_that_does_not_divide_the_world_is_refused_before_the_model_loads(tmp_path):
    env = {**_env(), "WORLD_SIZE": "3"}
    res = subprocess.run([sys.executable, "-m", "evals.cli", "run", "shapes-vqa", "--model", "demo", "--tp", "2",
                          "--out", str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "world of 3 ranks is not a multiple of tp=2" in res.stderr
    assert not (tmp_path / "x").exists()


def test_the_plan_accepts_tp_that_splits_the_demo(monkeypatch):
    from cm3leon.checkpoint import inspect
    from evals import plan

    monkeypatch.setenv("WORLD_SIZE", "4")
    plan.check_tensor_parallel(2, inspect("demo"))  # 4 KV heads, d_ff 512: 2 copies of 2 ranks
    plan.check_tensor_parallel(4, inspect("demo"))
    plan.check_tensor_parallel(2, None)  # an injected predictor: the world alone is checked
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(plan.PlanError, match="world of 6 ranks is not a multiple of tp=4"):
        plan.check_tensor_parallel(4, None)


# ----------------------------------------------------------------------------- one simulated rank
class OneRank(Dist):
    """This process as rank `rank` of a world whose other ranks agree with it: each collective
    returns this rank's value, which is what it returns when every rank holds the same."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.group_checks = 0

    def barrier(self) -> None:
        pass

    def first_error(self, err):
        return err

    def group_error(self, err):
        self.group_checks += 1
        return err

    def group_min(self, value):
        return value

    def broadcast(self, obj):
        return obj


def test_dist_layout_is_row_major_over_dp_and_tp():
    got = [(d.dp_rank, d.tp_rank, d.dp_size, d.writes_outputs) for d in (Dist(r, 4, tp=2) for r in range(4))]
    assert got == [(0, 0, 2, True), (0, 1, 2, False), (1, 0, 2, True), (1, 1, 2, False)]
    assert (Dist(3, 4).dp_rank, Dist(3, 4).dp_size, Dist(3, 4).writes_outputs) == (3, 4, True)
    with pytest.raises(ValueError, match="world of 3 ranks"):
        Dist(0, 3, tp=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_all(tmp_path_factory.mktemp("data"))


def _selected(name: str, root: Path) -> list:
    from tasks.loaders import load_dataset

    spec = fixtures.spec(name)
    return engine.select(load_dataset(spec, root), spec)


def _sim_run(names: list[str], root: Path, out: Path, dist: Dist) -> tuple[dict, fixtures.EchoPredictor]:
    pred = fixtures.EchoPredictor()
    opts = engine.RunOptions(out=out, data_root=root, batch_size=2, progress=False)
    return engine.run([fixtures.spec(n) for n in names], pred, opts, dist), pred


def test_a_tp_peer_runs_its_groups_shard_and_writes_nothing(root, tmp_path):
    peer = OneRank(3, 4, tp=2)  # rank 3 of 4 with tp 2: the second rank of data-parallel group 1 of 2
    results, pred = _sim_run(["vqav2", "magicbrush-edit"], root, tmp_path / "run", peer)
    assert results == {}  # only global rank 0 scores
    want = [s.id for name in ("vqav2", "magicbrush-edit") for s in _selected(name, root) if s.index % 2 == 1]
    assert pred.calls == want  # group 1's shard of each task, in order
    for task in ("vqav2", "magicbrush-edit"):
        assert not [p for p in (tmp_path / "run" / task).rglob("*") if p.is_file() and p.name != "config.json"]
    # checked in with its group after every predict() call and after every batch
    assert peer.group_checks == 2 * len(pred.batch_sizes) > 0


def test_the_writing_rank_of_a_group_names_its_file_by_dp_rank(root, tmp_path):
    task_dir = tmp_path / "run" / "magicbrush-edit"
    (task_dir / "images").mkdir(parents=True)  # what global rank 0 prepares before any rank predicts
    _results, pred = _sim_run(["magicbrush-edit"], root, tmp_path / "run", OneRank(2, 4, tp=2))  # tp_rank 0, group 1
    assert [p.name for p in (task_dir / "samples").glob("*.jsonl")] == ["rank-00001.jsonl"]
    lines = [json.loads(x) for x in (task_dir / "samples" / "rank-00001.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == pred.calls and {r["index"] % 2 for r in lines} == {1}
    assert all((task_dir / rel).is_file() for r in lines for rel in r["images"].values())  # its PNGs


def test_an_error_of_a_tp_peer_stops_its_group_after_the_batch(root, tmp_path):
    class PeerFailed(OneRank):
        def group_error(self, err):  # 1st call: after predict() (fine); 2nd: after the batch was written
            self.group_checks += 1
            return err or (("rank 1: the peer's disk is full", 2) if self.group_checks == 2 else None)

    with pytest.raises(engine.RunError, match="^(vqav2: )?rank 1: the peer's disk is full$") as e:
        _sim_run(["vqav2"], root, tmp_path / "run", PeerFailed(0, 2, tp=2))
    assert e.value.exit_code == 2
    assert len(_selected("vqav2", root)) > 2  # there was more than one batch to run
    assert (tmp_path / "run" / "vqav2" / "samples" / "rank-00000.jsonl").read_text().count("\n") == 2


class PeerFailsFirstPredict(OneRank):
    """The other rank of the copy saw the first predict() raise outside the model (e.g. decoding)."""

    fatal = False

    def group_error(self, err):
        self.group_checks += 1
        if self.group_checks == 1:
            return err or ("rank 1: RuntimeError: decoding failed", self.fatal, 2)
        return err


def test_a_batch_that_failed_on_a_peer_is_retried_one_by_one_here_too(root, tmp_path):
    ref, _ = _sim_run(["vqav2"], root, tmp_path / "ref", OneRank(0, 1))
    _results, pred = _sim_run(["vqav2"], root, tmp_path / "run", PeerFailsFirstPredict(0, 2, tp=2))
    assert pred.batch_sizes[:3] == [2, 1, 1]  # its own batch succeeded, yet it retries with the group
    assert _results["vqav2"].metrics == ref["vqav2"].metrics  # the retries gave the same predictions
    strip = lambda rs: [{k: r[k] for k in ("id", "index", "prediction", "failure")} for r in rs]  # noqa: E731
    assert strip(_lines(tmp_path / "run" / "vqav2")) == strip(_lines(tmp_path / "ref" / "vqav2"))


def test_a_fatal_error_on_a_peer_stops_this_rank_too(root, tmp_path):
    class Fatal(PeerFailsFirstPredict):
        fatal = True

    with pytest.raises(engine.RunError, match="^(vqav2: )?rank 1: RuntimeError: decoding failed$"):
        _sim_run(["vqav2"], root, tmp_path / "run", Fatal(0, 2, tp=2))
    assert not (tmp_path / "run" / "vqav2" / "samples" / "rank-00000.jsonl").read_text()  # nothing written
