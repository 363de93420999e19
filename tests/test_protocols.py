"""The FID-30K protocol as a manifest (tasks/protocols.py, tasks/manifest.py): built by the very
selection the engine applies, hashed stably, saved and read back, applied by the loader,
recorded in metrics.json and checked on resume; and the run's disk need (evals/disk.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import fixtures
import tasks
from evals import engine, plan
from evals.cli import main
from evals.plan import PlanError, RunRequest, build_plan
from tasks.errors import DataError
from tasks.loaders import load_dataset
from tasks.manifest import read_manifest, write_manifest
from tasks.protocols import build_manifest, summary
from tasks.selection import derive_seed, selection_order
from tasks.spec import apply_overrides


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_mini_coco(tmp_path_factory.mktemp("coco"), n=6)


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """A stand-in Inception weights file: the plan only hashes it."""
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"not really inception weights")
    monkeypatch.setenv("CM3EVAL_INCEPTION_WEIGHTS", str(path))
    return path


def fid_spec(**over):
    return apply_overrides(tasks.get("coco-fid"), over) if over else tasks.get("coco-fid")


# the echo predictor stands in for the model's own encoder and bank (the registry's defaults name CLIP files)
MODEL_ENCODER = ("retrieval.bank=model", "retrieval.encoder=model", "generation.scorer=model")


def request(out: Path, root: Path, *sets: str, **kw) -> RunRequest:
    return RunRequest(("coco-fid",), (*MODEL_ENCODER, *sets), model="echo", data_root=root, out=out,
                      inspect_model=False, **kw)


# ----------------------------------------------------------------------------- the selection rule
def test_the_manifest_lists_the_prompts_the_engine_evaluates(root):
    spec = fid_spec(limit="4")
    manifest = build_manifest(spec, root, "ab" * 32)
    selected = engine.select(load_dataset(spec, root), spec)
    # the manifest lists the published n (here all 6 images); --limit 4 evaluates its first 4
    assert len(manifest.prompts) == 6
    assert [p.id for p in manifest.prompts[:4]] == [s.id for s in selected]
    assert [p.caption for p in manifest.prompts[:4]] == [s.text for s in selected]
    assert [p.image for p in manifest.prompts[:4]] == [s.image for s in selected]
    assert len({p.image_id for p in manifest.prompts}) == 6  # one caption per image: distinct images
    assert all(p.annotation_id // 10 == p.image_id for p in manifest.prompts)  # the chosen caption's id
    assert engine.derive_seed(3, 7) == derive_seed(3, 7)  # one seed rule for both
    assert selection_order(list(range(10)), shuffle=False, seed=0, limit=3) == [0, 1, 2]


def test_the_hash_is_stable_and_covers_prompts_and_settings(root):
    spec = fid_spec()
    a, b = build_manifest(spec, root, "ab" * 32), build_manifest(spec, root, "ab" * 32)
    assert a.hash == b.hash and len(a.hash) == 64
    assert build_manifest(fid_spec(limit="2"), root, "ab" * 32).hash == a.hash  # a limit takes a prefix
    assert build_manifest(spec, root, "cd" * 32).hash != a.hash  # other Inception weights
    assert build_manifest(fid_spec(**{"metrics.fid.resolution": "299"}), root, "ab" * 32).hash != a.hash
    assert build_manifest(fid_spec(seed="1"), root, "ab" * 32).hash != a.hash  # other prompts
    assert replace(a, prompts=a.prompts[::-1]).hash != a.hash  # the order is part of it


def test_summary_says_whether_the_run_is_the_published_protocol(root):
    m = build_manifest(fid_spec(), root, "ab" * 32)
    s = summary(m, 6)
    assert {k: s[k] for k in ("name", "n", "split", "resolution", "resize", "candidates", "k")} == \
        {"name": "coco-fid-30k", "n": 6, "split": "val2014", "resolution": 256, "resize": "pytorch-fid",
         "candidates": 8, "k": 2}
    assert s["manifest_hash"] == m.hash and s["inception_sha256"] == "ab" * 32
    assert s["matches_published"] is False and s["deviations"] == ["n 6 (published: 30000)"]
    full = summary(replace(m, prompts=m.prompts * 5000), 30_000)
    assert full["matches_published"] is True and full["deviations"] == []


# ----------------------------------------------------------------------------- saved manifests
def test_a_saved_manifest_round_trips_and_an_edited_one_is_refused(root, tmp_path):
    m = build_manifest(fid_spec(), root, "ab" * 32)
    path = write_manifest(m, tmp_path / "fid30k.json")
    back = read_manifest(path)
    assert back.hash == m.hash and back.prompts == m.prompts
    data = json.loads(path.read_text())
    data["prompts"][0]["caption"] = "a different caption"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="edited by hand"):
        read_manifest(path)
    with pytest.raises(DataError, match="no such file.*cm3eval protocol write"):
        read_manifest(tmp_path / "missing.json")


def test_the_loader_uses_a_manifest_in_its_order_and_checks_it(root, tmp_path):
    m = build_manifest(fid_spec(), root, "ab" * 32)
    picked = replace(m, prompts=m.prompts[::-1][:3])
    path = write_manifest(picked, tmp_path / "m.json")
    spec = fid_spec(**{"dataset.manifest": str(path), "dataset.shuffle": "false"})
    ds = load_dataset(spec, root)
    assert [s.id for s in ds.samples] == [p.id for p in picked.prompts]
    assert [s.text for s in ds.samples] == [p.caption for p in picked.prompts]
    assert ds.fingerprint != load_dataset(fid_spec(), root).fingerprint  # the manifest joins the fingerprint
    with pytest.raises(DataError, match="fixes the order"):
        load_dataset(fid_spec(**{"dataset.manifest": str(path)}), root)
    bad = replace(picked, prompts=(replace(picked.prompts[0], caption="a cat on the moon"),))
    spec = fid_spec(**{"dataset.manifest": str(write_manifest(bad, tmp_path / "bad.json")), "dataset.shuffle": "false"})
    with pytest.raises(DataError, match="is not one of image"):
        load_dataset(spec, root)


# ----------------------------------------------------------------------------- the plan
def test_the_plan_carries_the_protocol_and_hashes_the_manifest(root, tmp_path, weights):
    p = build_plan(request(tmp_path / "r", root, "retrieval.k=0", "limit=4"))
    (run,) = p.runs
    proto = run.protocol["coco-fid"]
    (task,) = run.tasks
    assert proto["n"] == 4 and proto["k"] == 0 and proto["inception_sha256"] == \
        __import__("hashlib").sha256(weights.read_bytes()).hexdigest()
    assert task.spec.protocol.manifest_hash == proto["manifest_hash"]  # in the spec the engine hashes
    assert "k 0 (published: 2)" in proto["deviations"] and not proto["matches_published"]
    # a pin that does not match is refused before the model loads
    with pytest.raises(PlanError, match="protocol.manifest_hash: this run's manifest hashes to"):
        build_plan(request(tmp_path / "r", root, "protocol.manifest_hash=" + "0" * 64))
    assert build_plan(request(tmp_path / "r", root, "retrieval.k=0",
                              "protocol.manifest_hash=" + proto["manifest_hash"])).runs[0].protocol


def test_a_saved_manifest_must_describe_the_run(root, tmp_path, weights):
    code = main(["protocol", "write", "coco-fid", "--data-root", str(root), "--out", str(tmp_path / "m.json")])
    assert code == 0
    saved = read_manifest(tmp_path / "m.json")
    p = build_plan(request(tmp_path / "r", root, f"dataset.manifest={tmp_path / 'm.json'}"))
    task = p.runs[0].tasks[0]
    assert task.spec.dataset.shuffle is False and task.protocol["manifest_hash"] == saved.hash
    with pytest.raises(DataError, match=r"resolution is 256 in the manifest but 299 in this run \(metrics.fid.resolution\)"):
        build_plan(request(tmp_path / "r", root, f"dataset.manifest={tmp_path / 'm.json'}",
                           "metrics.fid.resolution=299"))
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    with pytest.raises(DataError, match=r"inception_sha256 .* \(metrics.fid.weights\)"):
        build_plan(request(tmp_path / "r", root, f"dataset.manifest={tmp_path / 'm.json'}",
                           f"metrics.fid.weights={other}"))


def test_protocol_write_needs_the_inception_weights(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("CM3EVAL_INCEPTION_WEIGHTS", raising=False)
    assert main(["protocol", "write", "coco-fid", "--data-root", str(root), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: coco-fid: FID Inception weights") and err.count("\n") == 1
    assert main(["protocol", "write", "vqav2", "--data-root", str(root), "--out", str(tmp_path / "m.json")]) == 2
    assert "follows no published protocol" in capsys.readouterr().err


# ----------------------------------------------------------------------------- metrics.json and resume
@pytest.fixture
def pooled_fid(monkeypatch):
    """A cheap stand-in for the Inception network (as tests/test_engine.py does): FID computes."""
    import torch

    from evals.metrics import fid as fid_lib
    from evals.metrics.inception import FIDInceptionV3

    class PooledPixels(FIDInceptionV3):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    ext = fid_lib.Extractor(PooledPixels().eval(), "inception", 299, "pooled-pixels-for-tests")
    monkeypatch.setattr(fid_lib, "inception_extractor", lambda weights=None, device="cpu", protocol="pytorch-fid": ext)


def test_metrics_json_records_the_protocol_and_a_resume_checks_it(root, tmp_path, weights, pooled_fid, capsys):
    out = tmp_path / "run"
    args = ["run", "coco-fid", "--model", "echo", "--data-root", str(root), "--out", str(out), "--limit", "4",
            "--candidates", "2", "--set", "retrieval.k=0", "--set", f"metrics.fid.cache_dir={tmp_path / 'c'}",
            *[a for kv in MODEL_ENCODER for a in ("--set", kv)]]
    assert main(args, predictor_factory=fixtures.make_echo) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    disk_line = next(line for line in err.splitlines() if line.startswith("disk: "))
    assert err.startswith("device: ") and disk_line.startswith("disk: about ") and " free" in disk_line
    entry = json.loads((out / "metrics.json").read_text())["tasks"]["coco-fid"]
    proto = entry["protocol"]
    assert proto["name"] == "coco-fid-30k" and proto["n"] == 4 and proto["candidates"] == 2
    assert proto["matches_published"] is False and "FID" in entry["metrics"]
    # the same command resumes; a run under another manifest (other weights) is refused naming the key
    assert main(args, predictor_factory=fixtures.make_echo) == 0
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    capsys.readouterr()
    assert main([*args, "--set", f"metrics.fid.weights={other}"], predictor_factory=fixtures.make_echo) == 2
    assert "task.protocol.manifest_hash" in capsys.readouterr().err


# ----------------------------------------------------------------------------- disk need
def test_disk_need_is_estimated_and_refused_when_clearly_insufficient(root, tmp_path, weights, monkeypatch, capsys):
    from evals import disk

    p = build_plan(request(tmp_path / "r", root, "retrieval.k=0"))
    (t,) = p.disk.tasks
    png = int(256 * 256 * disk.PNG_BYTES_PER_PIXEL)
    assert t.samples == 6 and t.images_per_sample == 1 and t.bytes >= 6 * png  # chosen image only
    with_all = build_plan(request(tmp_path / "r", root, "retrieval.k=0", save_candidates=True)).disk.tasks[0]
    assert with_all.images_per_sample == 9 and with_all.bytes - t.bytes >= 6 * 8 * png  # 8 candidates + the chosen
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(PlanError, match="not enough space.*--force-disk"):
        build_plan(request(tmp_path / "r", root, "retrieval.k=0"))
    assert build_plan(request(tmp_path / "r", root, "retrieval.k=0", force_disk=True)).disk.insufficient
    code = main(["run", "coco-fid", "--model", "echo", "--data-root", str(root), "--out", str(tmp_path / "x"),
                 "--set", "retrieval.k=0", *[a for kv in MODEL_ENCODER for a in ("--set", kv)]],
                predictor_factory=fixtures.make_echo)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: disk: about ") and err.count("\n") == 1


def test_the_default_coco_fid_at_512_px_needs_gigabytes_not_a_hundred():
    """The issue's arithmetic: 30,000 prompts x 9 PNGs at 512 px is ~110 GB; the chosen image only, ~13 GB."""
    from evals import disk

    spec = tasks.get("coco-fid")
    _, chosen = disk.sample_bytes(spec, 512, 1024, save_candidates=False)
    _, every = disk.sample_bytes(spec, 512, 1024, save_candidates=True)
    assert 100e9 < every * 30_000 < 125e9
    assert 10e9 < chosen * 30_000 < 16e9


def test_on_the_real_val2017_captions_the_manifest_is_the_engines_selection(tmp_path):
    """25,014 real captions of 5,000 images: one caption per image, distinct images, the engine's
    order; a saved copy applied by the loader gives the same samples back."""
    import real_data

    ann = real_data.shared("coco/annotations/captions_val2017.json")
    root = ann.parents[1]
    over = {"dataset.split": "val2017", "dataset.files.annotations": "annotations/captions_val2017.json",
            "dataset.images": "val2017"}
    spec = fid_spec(**over)
    m = build_manifest(spec, root, "ab" * 32)
    selected = engine.select(load_dataset(spec, root), spec)
    assert len(m.prompts) == len(selected) == 5000 and len({p.image_id for p in m.prompts}) == 5000
    assert [(p.id, p.caption) for p in m.prompts] == [(s.id, s.text) for s in selected]
    path = write_manifest(m, tmp_path / "val2017.json")
    again = load_dataset(fid_spec(**over, **{"dataset.manifest": str(path), "dataset.shuffle": "false"}), root)
    assert [(s.id, s.text, s.image) for s in again.samples] == [(s.id, s.text, s.image) for s in selected]
    assert read_manifest(path).hash == m.hash and path.stat().st_size < 250 * 5000
