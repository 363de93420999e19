"""A real checkpoint end to end, as a new user runs it (issue 13, "Done when", first and third points).

A tiny random HF Chameleon in the REAL vocabulary layout (65,536 ids, IMGIMG* codes, 5 shards,
tokenizer.json, no VQ decoder) plus Meta's vqgan.ckpt/vqgan.yaml, COCO-mini in the official
layouts, and random but correctly shaped weights for open_clip ViT-B-32, the FID Inception and
DINO (tests/real_fixtures.py). Everything goes through the command line (`evals.cli.main`, the
console script's code path, in-process to spare 2 cores the start-up of each command), with the
registry's defaults plus only file-path options: the commands of README's "Evaluating a real
model" section.

- `cm3eval bank build` from COCO train2014 with the saved open_clip encoder;
- `coco-fid` at the paper's settings: retrieval k = 2 from that bank, 8 candidates reranked by
  CLIPScore with the same encoder, FID with the saved Inception weights;
- `coco-caption`, `vqav2`, `magicbrush-edit`: each completes with every metric of its spec; the
  three commands write one run folder, whose metrics.json then holds all four tasks;
- each missing file (decoder, Inception, CLIP, bank) is one line, exit 2, before the model loads;
- a run whose every sample fails exits non-zero and names the first failure.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from evals.cli import main
from fixtures import corrupt
from real_fixtures import INCEPTION_FILE, RealSetup, build_real_setup

N_CODES = 8192  # Chameleon's VQ codebook
FID_PROMPTS = 2  # the fewest prompts FID has a covariance for
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
EDIT_METRICS = ("L1", "L2 (MSE)", "CLIP-I", "CLIP-T", "DINO")


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module", autouse=True)
def hermetic(tmp_path_factory):
    """No weights from this machine's caches or environment (only the files a test names), and a
    cache folder of the module's own (digests, FID statistics), shared with no other process."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("CM3EVAL_INCEPTION_WEIGHTS", "CM3EVAL_DINO_WEIGHTS", "CM3EVAL_CLIP_WEIGHTS", "CM3EVAL_DATA_ROOT",
                    "CM3EVAL_DINOV2_WEIGHTS", "CM3EVAL_CLIP_L14_336_WEIGHTS"):
            mp.delenv(var, raising=False)
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
        mp.setenv("CM3EVAL_CACHE", str(tmp_path_factory.mktemp("cm3eval-cache")))
        yield


@pytest.fixture(scope="module")
def real(hermetic, tmp_path_factory) -> RealSetup:
    return build_real_setup(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def bank(real: RealSetup, tmp_path_factory) -> Path:
    """`cm3eval bank build` over COCO train2014 (official layout) with the saved open_clip ViT-B-32."""
    out = tmp_path_factory.mktemp("bank") / "coco-train2014"
    rc = main(["bank", "build", "--out", str(out), "--encoder", real.clip_spec,
               "--coco-root", str(real.data_root)])
    assert rc == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch) -> list[str]:
    """Replaces the checkpoint loader with a sentinel: a plan error must come before it is reached."""
    from cm3leon import checkpoint

    calls: list[str] = []

    def sentinel(*args, **kwargs):
        calls.append(str(args[0]) if args else "?")
        raise AssertionError(f"the model was loaded ({args[0] if args else ''}) before the plan refused the run")

    monkeypatch.setattr(checkpoint, "load", sentinel)
    monkeypatch.setattr(checkpoint, "build_decoder", sentinel)
    return calls


def cli(capfd, *argv: str | Path) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def fid_args(real: RealSetup, bank: Path, out: Path) -> list[str | Path]:
    """README's coco-fid command: the registry's defaults, every file named by a path option."""
    return ["run", "coco-fid", "--model", real.hf, "--vq", real.vq, "--data-root", real.data_root,
            "--set", f"retrieval.bank={bank}", "--set", f"retrieval.encoder={real.clip_spec}",
            "--set", f"generation.scorer={real.clip_spec}", "--set", f"metrics.fid.weights={real.inception}",
            "--limit", str(FID_PROMPTS), "--out", out]


def edit_args(real: RealSetup, out: Path) -> list[str | Path]:
    return ["run", "magicbrush-edit", "--model", real.hf, "--vq", real.vq, "--data-root", real.data_root,
            "--set", "dataset.files.descriptions=magicbrush/test/global_descriptions.json",
            "--set", f"metrics.clip_i.encoder={real.clip_spec}", "--set", f"metrics.clip_t.encoder={real.clip_spec}",
            "--set", f"metrics.dino.weights={real.dino}", "--limit", "2", "--out", out]


def samples(task_dir: Path) -> list[dict]:
    from evals.runs import read_samples

    return list(read_samples(task_dir).values())


def task_metrics(run_dir: Path, task: str) -> dict[str, dict]:
    return json.loads((run_dir / "metrics.json").read_text())["tasks"][task]["metrics"]


def assert_finite(metrics: dict[str, dict], names: tuple[str, ...], n: int) -> None:
    for name in names:
        assert name in metrics, f"{name} missing from metrics.json ({sorted(metrics)})"
        m = metrics[name]
        assert isinstance(m["value"], (int, float)) and math.isfinite(m["value"]), (name, m)
        assert m["n"] == n and isinstance(m["higher_is_better"], bool), (name, m)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- the bank
def test_bank_build_from_coco_train2014(real, bank):
    captions = json.loads((real.data_root / "annotations" / "captions_train2014.json").read_text())
    meta = json.loads((bank / "bank.json").read_text())
    assert (bank / "embeddings.npy").is_file() and (bank / "meta.jsonl").is_file()
    rows = [json.loads(x) for x in (bank / "meta.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == len(captions["annotations"])  # one document per train2014 caption, with its image
    assert all(r["image"].startswith("COCO_train2014_") and r["text"] for r in rows)
    assert "open_clip:ViT-B-32" in json.dumps(meta)


# ----------------------------------------------------------------------------- the four tasks
# README's three commands, into ONE run folder (as a user evaluates one model), each run once per module
@dataclass(frozen=True)
class Ran:
    rc: int
    run_dir: Path
    warnings: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs") / "chameleon"


def _ran(argv: list[str | Path], run_dir: Path) -> Ran:
    """One command from a module fixture. Its stderr is not redirected (the "cm3eval" log handler
    keeps the stream it first sees, for later tests too); pytest shows it with a failing test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([str(a) for a in argv])
    return Ran(rc, run_dir, tuple(str(w.message) for w in caught))


@pytest.fixture(scope="module")
def fid_run(real, bank, run_dir) -> Ran:
    return _ran(fid_args(real, bank, run_dir), run_dir)


@pytest.fixture(scope="module")
def text_run(real, run_dir) -> Ran:
    return _ran(["run", "coco-caption", "vqav2", "--model", real.hf, "--data-root", real.data_root,
                 "--limit", "2", "--out", run_dir], run_dir)


@pytest.fixture(scope="module")
def edit_run(real, run_dir) -> Ran:
    return _ran(edit_args(real, run_dir), run_dir)


def test_coco_fid_at_the_papers_settings(real, fid_run):
    """k = 2 retrieved documents, 8 candidates reranked by CLIPScore, FID on Inception features."""
    assert fid_run.rc == 0, "see the captured stderr of the setup"
    fid = task_metrics(fid_run.run_dir, "coco-fid")
    assert_finite(fid, ("FID",), FID_PROMPTS)
    assert fid["FID"]["higher_is_better"] is False and fid["FID"]["value"] > 0
    val_ids = {im["id"] for im in json.loads((real.data_root / "annotations" / "captions_val2014.json").read_text())["images"]}
    rows = samples(fid_run.run_dir / "coco-fid")
    assert len(rows) == FID_PROMPTS and not any(r["failure"] for r in rows)
    for r in rows:
        # retrieval: 2 train2014 documents from the bank, never the prompt's own val image
        assert len(r["retrieved"]) == 2, r["retrieved"]
        assert all(d["image"].startswith("COCO_train2014_") for d in r["retrieved"])
        assert not {int(Path(d["image"]).stem.rsplit("_", 1)[1]) for d in r["retrieved"]} & val_ids
        # 8 candidates, all their VQ codes kept, the chosen one the best CLIPScore
        assert len(r["scores"]) == 8 and r["best"] == max(range(8), key=lambda i: r["scores"][i])
        codes = r["extra"]["codes"]
        assert len(codes) == 8 and all(len(c) == len(codes[0]) and all(0 <= x < N_CODES for x in c) for c in codes)
        assert (fid_run.run_dir / "coco-fid" / r["images"]["output"]).is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_coco_fid_on_cuda_in_bfloat16(real, bank, tmp_path, capfd):
    """README's GPU form of the same command (the CPU runs above are float32)."""
    rc, out, err = cli(capfd, *fid_args(real, bank, tmp_path / "cuda"), "--device", "cuda", "--dtype", "bfloat16")
    assert rc == 0, err[-3000:]
    assert_finite(task_metrics(tmp_path / "cuda", "coco-fid"), ("FID",), FID_PROMPTS)
    rows = samples(tmp_path / "cuda" / "coco-fid")
    assert len(rows) == FID_PROMPTS and all(len(r["retrieved"]) == 2 and len(r["scores"]) == 8 for r in rows)


def test_coco_caption_and_vqav2(text_run):
    assert text_run.rc == 0, "see the captured stderr of the setup"
    # the converted config.json says bos 1 (<pad>); the tokenizer's <s> is 0: a warning naming both
    assert any("bos_token_id=1" in w and "<s>=0" in w for w in text_run.warnings), text_run.warnings
    assert_finite(task_metrics(text_run.run_dir, "coco-caption"), CAPTION_METRICS, 2)
    assert_finite(task_metrics(text_run.run_dir, "vqav2"), ("accuracy",), 2)
    for task in ("coco-caption", "vqav2"):
        rows = samples(text_run.run_dir / task)
        assert len(rows) == 2 and not any(r["failure"] for r in rows)
        # the family bans every <...> special in text: a random model still writes only words
        assert all(r["prediction"] and "<" not in r["prediction"] for r in rows), [r["prediction"] for r in rows]


def test_magicbrush_edit(edit_run):
    assert edit_run.rc == 0, "see the captured stderr of the setup"
    assert_finite(task_metrics(edit_run.run_dir, "magicbrush-edit"), EDIT_METRICS, 2)
    rows = samples(edit_run.run_dir / "magicbrush-edit")
    assert len(rows) == 2 and all((edit_run.run_dir / "magicbrush-edit" / r["images"]["output"]).is_file()
                                  for r in rows)


def test_one_run_folder_holds_every_task(fid_run, text_run, edit_run, run_dir):
    """The three commands merge into one metrics.json: four tasks, each with its metrics."""
    assert (fid_run.rc, text_run.rc, edit_run.rc) == (0, 0, 0)
    from evals.runs import read_metrics, task_names

    tasks = read_metrics(run_dir)["tasks"]
    assert sorted(tasks) == sorted(task_names(run_dir)) == ["coco-caption", "coco-fid", "magicbrush-edit", "vqav2"]
    assert all(tasks[t]["metrics"] and not tasks[t]["failures"] for t in tasks), tasks


# ----------------------------------------------------------------------------- refused before the model loads
def _missing(real: RealSetup, bank: Path, tmp: Path, what: str) -> tuple[list[str | Path], tuple[str, ...]]:
    """coco-fid's command with one file missing, and what its one error line must name."""
    args = fid_args(real, bank, tmp / "run")
    absent = tmp / "absent"
    if what == "decoder":
        i = args.index("--vq")
        return args[:i] + args[i + 2:], ("--vq", str(real.hf))
    if what == "inception":
        gone = absent / INCEPTION_FILE
        return [str(a).replace(str(real.inception), str(gone)) for a in args], (str(gone), "metrics.fid.weights")
    if what == "clip":
        gone = absent / "open_clip_model.safetensors"
        args = [str(a).replace(f"generation.scorer={real.clip_spec}", f"generation.scorer=open_clip:ViT-B-32:{gone}")
                for a in args]
        return args, (str(gone), "generation.scorer")
    if what == "retrieval-clip":
        gone = absent / "open_clip_model.safetensors"
        args = [str(a).replace(f"retrieval.encoder={real.clip_spec}", f"retrieval.encoder=open_clip:ViT-B-32:{gone}")
                for a in args]
        return args, (str(gone), "retrieval.encoder")
    if what == "bank":
        gone = absent / "bank"
        return [str(a).replace(f"retrieval.bank={bank}", f"retrieval.bank={gone}") for a in args], \
            (str(gone), "cm3eval bank build")
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["decoder", "inception", "clip", "retrieval-clip", "bank"])
def test_a_missing_file_is_one_line_before_the_model_loads(real, bank, tmp_path, capfd, no_model_load, what):
    args, named = _missing(real, bank, tmp_path, what)
    rc, out, err = cli(capfd, *args)
    line = one_error_line(err)
    assert rc == 2, err
    assert all(n in line for n in named), (named, line)
    assert no_model_load == [] and not (tmp_path / "run" / "coco-fid" / "samples").exists()


def test_the_console_script_says_the_same_line(real, bank, tmp_path):
    """The installed `cm3eval` in a fresh process (no pytest capture): exit 2, one error line, no traceback."""
    exe = Path(sys.executable).with_name("cm3eval")
    if not exe.is_file():
        pytest.skip(f"no console script beside {sys.executable} (pip install -e .)")
    args, named = _missing(real, bank, tmp_path, "bank")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and all(n in line for n in named), proc.stderr


@pytest.mark.parametrize("what", ["dino", "clip_i"])
def test_a_missing_editing_weight_is_one_line_before_the_model_loads(real, tmp_path, capfd, no_model_load, what):
    gone = tmp_path / "absent" / ("dino_deitsmall16_pretrain.pth" if what == "dino" else "open_clip_model.safetensors")
    old = str(real.dino) if what == "dino" else f"metrics.clip_i.encoder={real.clip_spec}"
    new = str(gone) if what == "dino" else f"metrics.clip_i.encoder=open_clip:ViT-B-32:{gone}"
    args = [str(a).replace(old, new) for a in edit_args(real, tmp_path / "run")]
    rc, out, err = cli(capfd, *args)
    line = one_error_line(err)
    assert rc == 2 and str(gone) in line and f"metrics.{what}" in line, line
    assert no_model_load == []


@pytest.mark.parametrize("left_out", ["metrics.clip_i.encoder", "dataset.files.descriptions"])
def test_an_editing_metric_without_its_file_is_refused_before_the_model_loads(real, tmp_path, capfd, no_model_load,
                                                                             left_out):
    """The spec's defaults leave CLIP-I's encoder unnamed and CLIP-T's captions file out: a run that
    asks for those metrics must say so before generating anything, not exit 3 after it (issue 13:
    each missing file is one line before the model loads, naming the option)."""
    args = list(map(str, edit_args(real, tmp_path / "run")))
    i = next(j for j, a in enumerate(args) if a.startswith(left_out + "="))
    args = args[:i - 1] + args[i + 1:]
    rc, out, err = cli(capfd, *args)
    line = one_error_line(err)
    assert rc == 2 and left_out in line, line
    assert no_model_load == []


def test_inception_weights_default_search_names_where_it_looked(real, bank, tmp_path, capfd, no_model_load):
    """No weights option, no $CM3EVAL_INCEPTION_WEIGHTS, an empty torch hub cache: the line says how to get it."""
    args = list(map(str, fid_args(real, bank, tmp_path / "run")))
    i = args.index(f"metrics.fid.weights={real.inception}")
    args = args[:i - 1] + args[i + 1:]  # the option and its --set
    rc, out, err = cli(capfd, *args)
    line = one_error_line(err)
    assert rc == 2 and INCEPTION_FILE in line and "CM3EVAL_INCEPTION_WEIGHTS" in line, line
    assert no_model_load == []


def test_registry_defaults_on_a_chameleon_folder_say_which_file_to_give(real, tmp_path, capfd, no_model_load,
                                                                         monkeypatch):
    """`cm3eval run coco-fid --model HF --vq ...` with the Inception weights found through their environment
    variable and nothing else: the spec's defaults name CLIP ViT-B/32 (`clip-vit-b-32`) and a bank under the
    data root, neither of which exists yet. No traceback: one line naming the file and how to get it."""
    monkeypatch.setenv("CM3EVAL_INCEPTION_WEIGHTS", str(real.inception))
    rc, out, err = cli(capfd, "run", "coco-fid", "--model", real.hf, "--vq", real.vq, "--data-root", real.data_root,
                       "--out", tmp_path / "run")
    line = one_error_line(err)
    assert rc == 2 and ("CM3EVAL_CLIP_WEIGHTS" in line or "cm3eval bank build" in line), line
    assert no_model_load == []


def test_coco_fid_on_the_registry_defaults_once_their_files_exist(real, bank, tmp_path, capfd, monkeypatch):
    """The README's short form: the CLIP weights where `clip-vit-b-32` looks ($CM3EVAL_CLIP_WEIGHTS), the
    bank built into the data root's default place, the Inception file through its variable; then
    `cm3eval run coco-fid --model HF --vq VQ --data-root ROOT` needs no other setting."""
    root = tmp_path / "data"
    shutil.copytree(real.data_root, root)
    monkeypatch.setenv("CM3EVAL_CLIP_WEIGHTS", str(real.clip))
    monkeypatch.setenv("CM3EVAL_INCEPTION_WEIGHTS", str(real.inception))
    default_bank = root / "banks" / "coco-train2014-clip-vit-b-32"
    assert main(["bank", "build", "--out", str(default_bank), "--encoder", "clip-vit-b-32",
                 "--coco-root", str(root)]) == 0
    rc, out, err = cli(capfd, "run", "coco-fid", "--model", real.hf, "--vq", real.vq, "--data-root", root,
                       "--limit", "2", "--out", tmp_path / "run")
    assert rc == 0, err
    entry = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]["coco-fid"]
    assert math.isfinite(entry["metrics"]["FID"]["value"]) and entry["n_failed"] == 0
    recs = samples(tmp_path / "run" / "coco-fid")
    assert all(len(r["retrieved"]) == 2 and len(r["scores"]) == 8 for r in recs)


# ----------------------------------------------------------------------------- every sample failed
def test_an_all_failed_run_exits_non_zero(real, tmp_path, capfd):
    """Every val image unreadable: the run finishes its bookkeeping and exits 1 naming the first failure."""
    root = tmp_path / "data"
    shutil.copytree(real.data_root, root)
    for image in (root / "val2014").glob("*.jpg"):
        corrupt(image)
    rc, out, err = cli(capfd, "run", "coco-caption", "--model", real.hf, "--data-root", root, "--limit", "2",
                       "--out", tmp_path / "run")
    assert rc == 1, err[-3000:]  # 1: failures over --max-failures (every sample failed always counts)
    assert "2 of 2 samples failed" in err and "first:" in err, err[-3000:]


# ----------------------------------------------------------------------------- CMMD and FD-DINOv2 in coco-fid
@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> Path:
    from metric_fixtures import save_dinov2

    return save_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth")


def test_coco_fid_reports_cmmd_and_fd_dinov2_when_their_weights_are_given(real, bank, dinov2_file, tmp_path, capfd):
    """The saved random networks named by their options (open_clip ViT-B-32 and DINOv2 ViT-S/14 in the
    official layouts stand in for ViT-L/14@336 and ViT-L/14, which differ only in size)."""
    rc, out, err = cli(capfd, *fid_args(real, bank, tmp_path / "run"), "--set", f"metrics.cmmd.encoder={real.clip_spec}",
                       "--set", "metrics.fd_dinov2.arch=vits14", "--set", f"metrics.fd_dinov2.weights={dinov2_file}")
    assert rc == 0, err
    assert "skipped" not in err
    metrics = task_metrics(tmp_path / "run", "coco-fid")
    assert_finite(metrics, ("FID", "CMMD", "FD-DINOv2"), FID_PROMPTS)
    assert metrics["CMMD"]["higher_is_better"] is False and metrics["FD-DINOv2"]["higher_is_better"] is False
    assert metrics["CMMD"]["value"] > 0 and metrics["CMMD"]["ci"] is not None


def test_coco_fid_skips_them_with_a_plan_line_when_not(real, bank, fid_run, tmp_path):
    from evals.cli.run import skipped_lines
    from evals.plan import RunRequest, build_plan

    args = fid_args(real, bank, tmp_path / "run")
    sets = tuple(str(args[i + 1]) for i, a in enumerate(args) if a == "--set")
    plan = build_plan(RunRequest(("coco-fid",), sets, model=str(real.hf), vq=real.vq, data_root=real.data_root,
                                 out=tmp_path / "run"))
    lines = skipped_lines(plan)
    assert len(lines) == 2, lines
    assert "metric cmmd skipped" in lines[0] and "open_clip_vit_l14_336.safetensors" in lines[0]
    assert "metric fd_dinov2 skipped" in lines[1] and "dinov2_vitl14_pretrain.pth" in lines[1]
    assert all("when_available=false" in ln and "\n" not in ln for ln in lines)
    # the run without them: FID only, nothing reported missing, exit 0
    entry = json.loads((fid_run.run_dir / "metrics.json").read_text())["tasks"]["coco-fid"]
    assert fid_run.rc == 0 and "FID" in entry["metrics"] and "CMMD" not in entry["metrics"]
    assert "missing_metrics" not in entry


def test_a_metric_asked_for_explicitly_without_its_file_is_refused(real, bank, tmp_path, capfd, no_model_load):
    rc, out, err = cli(capfd, *fid_args(real, bank, tmp_path / "run"), "--set", "metrics.fd_dinov2.when_available=false")
    line = one_error_line(err)
    assert rc == 2 and "dinov2_vitl14_pretrain.pth" in line and "CM3EVAL_DINOV2_WEIGHTS" in line, line
    assert no_model_load == []
