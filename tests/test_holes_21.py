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
    """The one error line of a command's stderr (besides progress and the disk estimate)."""
    lines = [ln for ln in err.splitlines() if ln.lower().startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
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
           "image_cfg_scale": "-2", "cdk_alpha": "0", "cdk_k": "0", "mix_cdk_fraction": "1.5", "n_candidates": "0",
           "decoding": "'beam'", "jacobi_window": "1"}


@pytest.mark.parametrize("field", sorted(BOUNDS))
def test_every_sampling_bound_is_checked_by_spec_and_sampler(field):
    assert set(OUTSIDE) == set(BOUNDS)  # a new bound needs its case here
    task = "magicbrush-edit" if field == "image_cfg_scale" else "shapes-fid"
    with pytest.raises(SpecError) as e:
        apply_overrides(tasks.get(task), {f"generation.{field}": OUTSIDE[field], "generation.cdk_alpha": "0.5"}
                        if field == "mix_cdk_fraction" else {f"generation.{field}": OUTSIDE[field]})
    msg = str(e.value)
    assert f"generation.{field}" in msg and f"expected {BOUNDS[field][1]}" in msg and "\n" not in msg
    value = {"'yes'": "yes", "'beam'": "beam", "nan": math.nan}.get(OUTSIDE[field], None)
    if value is None:
        value = float(OUTSIDE[field]) if "." in OUTSIDE[field] or field.endswith(("scale", "alpha")) \
            else int(OUTSIDE[field])
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingConfig(**{field: value, **({"cdk_alpha": 0.5} if field == "mix_cdk_fraction" else {})}).validate()


# ----------------------------------------------------------------------------- FID/FD below 2 samples
def test_fid_with_limit_1_is_refused_by_the_plan_in_one_line(tmp_path, capsys):
    code = main(["run", "shapes-fid", "--limit", "1", "--out", str(tmp_path / "r")], predictor_factory=fixtures.make_echo)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "shapes-fid: metrics.fid needs at least 2 samples, but limit is 1" in line
    assert not (tmp_path / "r").exists()


def _ids(task: str, n: int) -> list[str]:
    from evals.engine import select
    from tasks.loaders import load_dataset, resolve_data_root

    spec = apply_overrides(tasks.get(task), {"limit": n})
    return [s.id for s in select(load_dataset(spec, resolve_data_root(spec, None)), spec)]


def test_fid_on_one_successful_sample_is_not_computed_exit_3_and_later_tasks_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CM3EVAL_TEST_FAIL_IDS", _ids("shapes-fid", 2)[1])  # of 2 samples, 1 succeeds
    out = tmp_path / "r"
    code = main(["run", "shapes-fid", "shapes-vqa", "--limit", "2", "--max-failures", "50%", "--out", str(out)],
                predictor_factory=fixtures.make_echo)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "error: shapes-fid: metric fid not computed: needs at least 2 successful samples, got 1" in err
    entries = json.loads((out / "metrics.json").read_text())["tasks"]
    assert "FD-demo" not in entries["shapes-fid"]["metrics"] and "t2i_R@1" not in entries["shapes-fid"]["metrics"]
    assert entries["shapes-fid"]["missing_metrics"]["fid"].startswith("needs at least 2")
    assert entries["shapes-vqa"]["metrics"]["accuracy"]["value"] is not None  # the later task ran


def test_a_task_that_stops_does_not_stop_the_later_tasks(tmp_path):
    from evals import engine

    root = fixtures.write_all(tmp_path / "data")
    out = tmp_path / "run"
    fixtures.run_engine(fixtures.spec("vizwiz"), out, root)
    changed = apply_overrides(fixtures.spec("vizwiz"), {"generation.max_new_tokens": "7"})
    with pytest.raises(engine.RunError) as e:  # vizwiz's folder holds another config: that task stops
        fixtures.run_engine([changed, fixtures.spec("vqav2")], out, root)
    assert "vizwiz" in str(e.value) and "different config" in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2
    assert "vqav2" in json.loads((out / "metrics.json").read_text())["tasks"]  # ... and vqav2 still ran


# ----------------------------------------------------------------------------- damaged sample lines and PNGs
def test_a_nan_prediction_in_a_sample_line_is_regenerated(tmp_path):
    args = ["run", "shapes-vqa", "--limit", "3", "--out", str(tmp_path / "r")]
    assert main(args, predictor_factory=fixtures.make_echo) == 0
    path = tmp_path / "r" / "shapes-vqa" / "samples" / "rank-00000.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    expected = first["prediction"]
    lines[0] = json.dumps({**first, "prediction": float("nan")})  # json writes NaN
    path.write_text("\n".join(lines) + "\n")
    assert main(args, predictor_factory=fixtures.make_echo) == 0
    again = {json.loads(ln)["id"]: json.loads(ln) for ln in path.read_text().splitlines()}
    assert again[first["id"]]["prediction"] == expected


def test_a_png_with_a_flipped_byte_of_the_same_size_is_regenerated(tmp_path):
    root = fixtures.write_all(tmp_path / "data")
    out = tmp_path / "run"
    fixtures.run_engine(fixtures.spec("magicbrush-edit"), out, root)
    victim = next(iter(json.loads(ln) for ln in
                       (out / "magicbrush-edit" / "samples" / "rank-00000.jsonl").read_text().splitlines()))
    png = out / "magicbrush-edit" / victim["images"]["output"]
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0x01
    png.write_bytes(bytes(data))
    results, p = fixtures.run_engine(fixtures.spec("magicbrush-edit"), out, root)
    assert p.calls == [victim["id"]] and results["magicbrush-edit"].failures == []
    fixtures.run_engine(fixtures.spec("magicbrush-edit"), tmp_path / "fresh", root)
    fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())["tasks"]["magicbrush-edit"]["metrics"]
    assert json.loads((out / "metrics.json").read_text())["tasks"]["magicbrush-edit"]["metrics"] == fresh


# ----------------------------------------------------------------------------- the retrieval bank
def _flip_middle_keep_stat(path: Path) -> None:
    """Negate 256 bytes in the middle of a file in place; size and mtime kept."""
    import os

    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        chunk = f.read(256)
        f.seek(st.st_size // 2)
        f.write(bytes(255 - b for b in chunk))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _big_bank(dst: Path) -> Path:
    """The demo bank three times over (12,000 rows): embeddings.npy over 2 MiB, so its middle lies
    beyond a fingerprint of the first and last MiB."""
    import shutil

    import numpy as np

    from cm3leon.bank import MemoryBank
    from cm3leon.checkpoint import ALIASES

    demo = MemoryBank.load(ALIASES["demo"] / "bank")
    big = MemoryBank.create(dst, demo.fingerprint, demo.dim, demo.encoder_name)
    records = [demo.record(i) for i in range(len(demo))]
    for copy in range(3):
        big.add_vectors(np.asarray(demo.embeddings, dtype=np.float32), [{**r, "id": f"{r['id']}-{copy}"} for r in records])
    big.flush()
    shutil.copytree(ALIASES["demo"] / "bank" / "images", dst / "images")
    assert (dst / "embeddings.npy").stat().st_size > 2 << 20
    return dst


def test_a_bank_edited_in_the_middle_is_noticed_and_config_records_one_bank_digest(tmp_path, capsys):
    bank = _big_bank(tmp_path / "bank")
    args = ["run", "shapes-fid", "--model", "demo", "--retrieval-k", "2", "--set", f"retrieval.bank={bank}"]
    out = tmp_path / "run"
    assert main([*args, "--limit", "2", "--out", str(out)]) == 0
    config = out / "shapes-fid" / "config.json"
    model_files = json.loads(config.read_text())["hashed"]["model_files"]
    assert "bank/" in model_files and not [k for k in model_files if k.startswith("bank/") and k != "bank/"]
    assert config.stat().st_size < 20_000  # not 4,000 bank files listed
    _flip_middle_keep_stat(bank / "embeddings.npy")
    capsys.readouterr()
    # the resume sees the edit (it mixed samples of two banks) ...
    code = main([*args, "--limit", "4", "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "different config: predictor.bank (" in line
    # ... and a fresh run checks bank.json's content hash against the files
    code = main([*args, "--limit", "2", "--out", str(tmp_path / "fresh")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "content hash" in line and "differs from bank.json" in line


# ----------------------------------------------------------------------------- --overwrite
def test_overwrite_keeps_the_samples_of_an_unchanged_config_and_replaces_only_what_differs(tmp_path):
    import shutil

    root = fixtures.write_all(tmp_path / "data")
    out = tmp_path / "run"
    fixtures.run_engine(fixtures.spec("vizwiz"), out, root)
    lines = (out / "vizwiz" / "samples" / "rank-00000.jsonl").read_bytes()
    _, p = fixtures.run_engine(fixtures.spec("vizwiz"), out, root, overwrite=True)
    assert p.calls == []  # nothing discarded, nothing recomputed
    assert (out / "vizwiz" / "samples" / "rank-00000.jsonl").read_bytes() == lines
    # an input image swapped: --overwrite recomputes that sample only
    ids = [json.loads(ln)["id"] for ln in lines.decode().splitlines()]
    victim = json.loads(lines.decode().splitlines()[0])
    img = root / victim["input"]["image"] if (root / victim["input"]["image"]).exists() else None
    assert img is not None
    other = next(root / json.loads(ln)["input"]["image"] for ln in lines.decode().splitlines()[1:]
                 if json.loads(ln)["input"]["image"] != victim["input"]["image"])
    shutil.copyfile(other, img)
    _, p = fixtures.run_engine(fixtures.spec("vizwiz"), out, root, overwrite=True)
    assert p.calls == [victim["id"]]
    # a changed config: that task's samples are replaced, all of them
    changed = apply_overrides(fixtures.spec("vizwiz"), {"generation.max_new_tokens": "7"})
    _, p = fixtures.run_engine(changed, out, root, overwrite=True)
    assert sorted(p.calls) == sorted(ids)


# ----------------------------------------------------------------------------- a read-only place
def _read_only(monkeypatch, place: Path) -> None:
    """Make `place` behave as a read-only file system: creating, removing or making anything under
    it fails with EROFS (as root, chmod cannot show it)."""
    import errno
    import os

    def guard(fn):
        def wrapped(path, *a, **kw):
            if str(Path(path)).startswith(str(place)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return fn(path, *a, **kw)
        return wrapped

    for name in ("open", "unlink", "mkdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def test_report_and_leaderboard_on_a_read_only_place_say_which_path_in_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["run", "shapes-vqa", "--limit", "2", "--out", str(run)], predictor_factory=fixtures.make_echo) == 0
    capsys.readouterr()
    _read_only(monkeypatch, run)
    _read_only(monkeypatch, tmp_path / "ro")
    assert main(["report", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run / 'report.html'}: cannot write (Read-only file system)" in line
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "ro" / "lb")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'ro' / 'lb'}: cannot write (Read-only file system)" in line


# ----------------------------------------------------------------------------- the disk estimate
def _printed_bytes(err: str) -> float:
    import re

    m = re.search(r"disk: about ([0-9.]+) (B|KB|MB|GB) to write", err)
    assert m, err
    return float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]


def test_the_disk_estimate_is_within_1_5x_of_what_a_demo_run_writes(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "shapes-fid", "--model", "demo", "--limit", "12", "--out", str(out)]) == 0
    estimate = _printed_bytes(capsys.readouterr().err)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"disk estimate {estimate:,.0f} B, written {written:,} B, ratio {estimate / written:.2f}")
    assert written / 1.5 <= estimate <= written * 1.5


# ----------------------------------------------------------------------------- a 63k-token caption
def test_a_63k_token_caption_is_a_sample_failure_and_fd_is_recorded_not_computed(tmp_path, capsys):
    import shutil

    from tasks.loaders import resolve_data_root

    world = resolve_data_root(tasks.get("shapes-fid"), None)  # the demo world, rendered in this test's cache
    root = tmp_path / "data"
    shutil.copytree(world / "annotations", root / "annotations")
    shutil.copytree(world / "images" / "test", root / "images" / "test")
    path = root / "annotations" / "captions_test.json"
    data = json.loads(path.read_text())
    first, second = _ids("shapes-fid", 2)
    for a in data["annotations"]:
        if str(a["image_id"]) in (first, second):
            a["caption"] = " ".join(["red circle"] * 32_000)  # 64k tokens
    path.write_text(json.dumps(data))
    out = tmp_path / "r"
    code = main(["run", "shapes-fid", "--model", "demo", "--limit", "3", "--max-failures", "70%",
                 "--data-root", str(root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err, err
    assert "error: shapes-fid: metric fid not computed: needs at least 2 successful samples, got 1" in err
    entry = json.loads((out / "metrics.json").read_text())["tasks"]["shapes-fid"]
    assert entry["n_failed"] == 2 and all("exceeds the model's max_seq_len" in f["error"] for f in entry["failures"])
