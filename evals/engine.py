"""The engine: runs one task against a predictor into a run folder, resumably, on one or N ranks.

    RUN/TASK/config.json             resolved spec, overrides, fingerprints, config hash
    RUN/TASK/samples/rank-RRRRR.jsonl one line per finished sample, appended, flushed and fsync'd
    RUN/TASK/images/*.png            written (temp file + rename) before the line naming them
    RUN/metrics.json                 rewritten after every task (finished tasks are never lost)

The predictor is any object with `fingerprint: str` and `predict(batch: Batch) -> list[dict]`
(one dict per item, keys in `_RESULT_KEYS`); evals/predict.py is the real one, built on a
cm3leon checkpoint, and the tests inject a deterministic one. `task_fingerprint(spec) -> dict`
is optional: extra identities that change results (a retrieval bank, a reranker).

Results never depend on batch size or on the number of processes: each sample's seed comes
from (task seed, sample index), samples are sharded by index % world_size, and the config hash
leaves out batch size, --out and process count. Re-running the same command resumes: finished
samples (by id) are skipped; a torn last line left by a kill is ignored and recomputed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
from PIL import Image

from tasks.loaders import DataError, Dataset, Sample, load_dataset
from tasks.spec import COSMETIC_FIELDS, TaskSpec

log = logging.getLogger("cm3eval")

PACKAGE = "cm3eval"
THUMBNAIL = 256  # input/target images are copied into the run as PNG thumbnails for the report
_RESULT_KEYS = {"prediction", "prompt", "images", "candidates", "scores", "best", "retrieved", "failure", "extra"}


class RunError(RuntimeError):
    """A run cannot proceed (hash mismatch, incomplete shards, ...); one-line message."""


# ----------------------------------------------------------------------------- small helpers
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # not installed (a source checkout): read pyproject.toml
        try:
            import tomllib

            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return str(tomllib.loads(pyproject.read_text())["project"]["version"]) + "+src"
        except Exception:
            return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {PACKAGE: package_version(), "python": platform.python_version()}
    for dist_name in ("torch", "numpy", "pillow", "pycocotools", "pycocoevalcap", "scipy", "tokenizers"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            continue
    return out


def git_hash() -> str | None:
    here = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def derive_seed(task_seed: int, index: int) -> int:
    """Per-sample seed from (task seed, sample index): independent of batching and sharding."""
    digest = hashlib.blake2b(f"cm3eval/{task_seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(hashed: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if canonical_json(a.get(k)) != canonical_json(b.get(k)):
            out.append(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})")
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_png(img: Image.Image, path: Path, max_side: int | None = None) -> None:
    """PNG via temp file + rename, so a kill never leaves a half-written image under its name."""
    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def open_image(root: Path, rel: str) -> Image.Image:
    """An RGB image from the data root; raises ValueError with a one-line reason."""
    path = root / rel
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"missing image {rel}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt or unreadable image {rel}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ----------------------------------------------------------------------------- predictor protocol
@dataclass
class Item:
    sample: Sample
    images: dict[str, Image.Image]  # "image": the input image; "shot:J": image of in-context example J
    # ground truth shown in the report (never given to the predictor): "target" of an edit
    report_images: dict[str, Image.Image] = field(default_factory=dict)


@dataclass
class Batch:
    task: TaskSpec
    items: list[Item]
    data_root: Path

    def __len__(self) -> int:
        return len(self.items)


class Predictor(Protocol):
    fingerprint: str

    def predict(self, batch: Batch) -> list[dict[str, Any]]: ...


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def first_error(self, err: str | None) -> str | None:
        """The first rank's error, on every rank (so no rank waits forever at a barrier)."""
        if not self.enabled:
            return err
        import torch.distributed as td

        errs: list[str | None] = [None] * self.world
        td.all_gather_object(errs, err)
        return next((e for e in errs if e), None)

    def broadcast(self, obj: Any) -> Any:
        """rank 0's object on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "cpu") -> Dist:
    """From torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if d.enabled:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(d.local_rank)
            td.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
    return d


# ----------------------------------------------------------------------------- sample files
def _sample_files(task_dir: Path) -> list[Path]:
    return sorted((task_dir / "samples").glob("rank-*.jsonl"))


def read_records(task_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished sample lines by id. A torn or malformed line is ignored (it is recomputed);
    where one id has several lines (a retried failure) a success wins over a failure."""
    out: dict[str, dict[str, Any]] = {}
    for path in _sample_files(task_dir):
        with open(path, "rb") as f:
            data = f.read()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # the last line of a killed write
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("index"), int):
                continue
            old = out.get(str(rec["id"]))
            if old is None or old.get("failure") is not None:
                out[str(rec["id"])] = rec
    return out


def _done(rec: dict[str, Any] | None, s: Sample) -> bool:
    # predictor failures are retried on the next run (they may be transient: OOM, a bug since
    # fixed); data failures (a corrupt image) are final: the data will not change under the hash.
    if rec is None or rec.get("index") != s.index:
        return False
    return rec.get("failure") is None or rec.get("failure_stage") == "data"


class SampleWriter:
    """Appends lines to samples/rank-RRRRR.jsonl; each line is flushed and fsync'd at once."""

    def __init__(self, task_dir: Path, rank: int) -> None:
        self.path = task_dir / "samples" / f"rank-{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.f = open(self.path, "ab")

    def _repair(self) -> None:
        """Cut a torn last line (a kill mid-write) so the next append starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            log.warning("%s: dropped a torn last line (a previous run was killed mid-write); it is recomputed",
                        self.path)

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n"
        self.f.write(line.encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------- options and results
@dataclass
class RunOptions:
    out: Path
    data_root: Path | None = None
    batch_size: int = 8
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool | None = None  # None: when stderr is a TTY
    model_name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # for config.json (already applied to the spec)
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    max_systematic_failures: int = 8  # abort when this many predictor failures come before any success


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, Any]
    failures: list[dict[str, str]]
    config_hash: str
    n_samples: int
    task_dir: Path
    entry: dict[str, Any]


def resolve_data_root(spec: TaskSpec, data_root: Path | None) -> Path:
    if data_root is not None:
        return Path(data_root).expanduser()
    env = os.environ.get("CM3EVAL_DATA_ROOT")
    if spec.dataset.builtin == "shapes":
        return _shapes_root()
    if env:
        return Path(env).expanduser()
    raise DataError(f"{spec.name}: no data root; pass --data-root DIR (or set CM3EVAL_DATA_ROOT)")


def cache_dir() -> Path:
    return Path(os.environ.get("CM3EVAL_CACHE") or Path.home() / ".cache" / "cm3eval").expanduser()


def _shapes_root() -> Path:
    from tasks import shapes_world  # the demo world generator (built on first use, then cached)

    root = cache_dir() / "shapes"
    shapes_world.ensure_world(root, shapes_world.EVAL_WORLD)
    return root


# ----------------------------------------------------------------------------- selection and shots
def select(dataset: Dataset, spec: TaskSpec) -> list[Sample]:
    """The evaluated samples: canonical order (or a seeded permutation), then the first `limit`.
    Indices are positions in that order, so a smaller limit is a prefix of a larger one."""
    samples = list(dataset.samples)
    if spec.dataset.shuffle:
        order = np.random.default_rng(derive_seed(spec.seed, -1)).permutation(len(samples))
        samples = [samples[i] for i in order]
    if spec.limit is not None:
        samples = samples[: spec.limit]
    out = []
    for i, s in enumerate(samples):
        s = Sample(**{**s.__dict__})
        s.index, s.seed = i, derive_seed(spec.seed, i)
        out.append(s)
    return out


def attach_shots(samples: list[Sample], support: list[Sample], spec: TaskSpec) -> None:
    """k in-context examples per sample, drawn by (seed, index) from the support split; never the
    sample itself nor another question on its image. Rejection sampling: O(k) per sample, not
    O(len(support)) (VQAv2's support split has 443k questions)."""
    k = spec.prompt.k_shot
    if not k:
        return
    if len(support) < k + 1:
        raise DataError(f"{spec.name}: prompt.k_shot={k} but the support split has only {len(support)} examples")
    for s in samples:
        rng = np.random.default_rng(derive_seed(s.seed, 1))
        picked: list[int] = []
        for _ in range(100 * k):
            j = int(rng.integers(len(support)))
            x = support[j]
            if j in picked or x.id == s.id or (x.image is not None and x.image == s.image):
                continue
            picked.append(j)
            if len(picked) == k:
                break
        if len(picked) < k:
            raise DataError(f"{spec.name}: could not find {k} in-context examples for sample {s.id} in the support split")
        s.shots = [support[j] for j in picked]


# ----------------------------------------------------------------------------- the engine
def _progress(enabled: bool, total: int, done: int, label: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class _Rate(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # samples/s over this run only (resumed samples excluded)
            from rich.text import Text

            elapsed = task.elapsed or 0.0
            rate = (task.completed - task.fields.get("resumed", 0)) / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:.2f} samples/s")

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TextColumn("ETA"), TimeRemainingColumn(), transient=False)

    class _Ctx:
        def __enter__(self):
            prog.__enter__()
            self.tid = prog.add_task(label, total=total, completed=done, resumed=done)
            return self

        def advance(self, n: int = 1) -> None:
            prog.advance(self.tid, n)

        def __exit__(self, *exc):
            return prog.__exit__(*exc)

    return _Ctx()


class Engine:
    def __init__(self, predictor: Predictor, options: RunOptions, dist: Dist | None = None) -> None:
        self.predictor = predictor
        self.opts = options
        self.dist = dist or Dist()

    # --- configuration
    def hashed_config(self, spec: TaskSpec, data_fp: str) -> dict[str, Any]:
        """Everything that changes a sample's output; NOT batch size, --out, process count, limit.

        Metric options are left out too: scoring is recomputed from the sample lines at the end of
        every run, so e.g. adding the Inception weights later re-scores without regenerating."""
        task = spec.to_dict()
        # limit only picks a prefix of the same samples; metrics only change the scoring
        for k in COSMETIC_FIELDS + ("limit", "metrics"):
            task.pop(k, None)
        extra = {}
        if hasattr(self.predictor, "task_fingerprint"):
            extra = dict(self.predictor.task_fingerprint(spec) or {})
        return {"task": task, "model": str(getattr(self.predictor, "fingerprint", "")), "predictor": extra,
                "data": data_fp, PACKAGE: package_version(), "dtype": self.opts.dtype,
                "device": self.opts.device.split(":")[0]}

    def _prepare_dir(self, spec: TaskSpec, task_dir: Path, config: dict[str, Any]) -> None:
        """rank 0: refuse a different config, or clear it with --overwrite; write config.json."""
        cfg_path = task_dir / "config.json"
        if cfg_path.exists() and not self.opts.overwrite:
            try:
                old = json.loads(cfg_path.read_text())
                old_hash, old_hashed = old["hash"], old.get("hashed", {})
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                raise RunError(f"{cfg_path}: unreadable config of an earlier run; use a new --out or --overwrite")
            if old_hash != config["hash"]:
                diffs = diff_keys(old_hashed, config["hashed"]) or ["(hash only)"]
                shown = "; ".join(diffs[:6]) + (f"; … {len(diffs) - 6} more" if len(diffs) > 6 else "")
                raise RunError(f"{task_dir} holds a run of {spec.name} with a different config: {shown}. "
                               f"Use a new --out to keep both, or --overwrite to discard it")
        elif self.opts.overwrite and task_dir.exists():
            for sub in ("samples", "images"):
                shutil.rmtree(task_dir / sub, ignore_errors=True)
            cfg_path.unlink(missing_ok=True)
        (task_dir / "samples").mkdir(parents=True, exist_ok=True)
        (task_dir / "images").mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_path, config)

    # --- one task
    def run_task(self, spec: TaskSpec) -> TaskResult | None:
        """Predict every unfinished sample of this rank's shard, then (rank 0) merge and score.
        Returns the result on rank 0, None on the other ranks."""
        opts, dist = self.opts, self.dist
        root = resolve_data_root(spec, opts.data_root)
        dataset = load_dataset(spec, root)
        data_fp = dataset.fingerprint
        samples = select(dataset, spec)
        if spec.prompt.k_shot:
            support = load_dataset(spec, root, support=True)
            data_fp = hashlib.sha256(f"{data_fp}+{support.fingerprint}".encode()).hexdigest()[:16]
            attach_shots(samples, support.samples, spec)
        hashed = self.hashed_config(spec, data_fp)
        h = config_hash(hashed)
        task_dir = Path(opts.out) / spec.name
        config = {"task": spec.to_dict(), "model": opts.model_name, "overrides": opts.overrides, "hash": h,
                  "hashed": hashed, "data_root": str(root), "limit": spec.limit, "n_selected": len(samples),
                  "data_files": dataset.files, "created": _now(), "versions": versions()}
        err = None
        if dist.rank == 0:
            try:
                self._prepare_dir(spec, task_dir, config)
            except (RunError, OSError) as e:
                err = str(e)
        err = dist.broadcast(err)
        if err:
            raise RunError(err)

        records = read_records(task_dir)
        mine = [s for s in samples if s.index % dist.world == dist.rank]
        todo = [s for s in mine if not _done(records.get(s.id), s)]
        if len(todo) < len(mine):
            log.info("%s: resuming, %d of %d samples already done", spec.name, len(mine) - len(todo), len(mine))
        show = opts.progress if opts.progress is not None else sys.stderr.isatty()
        err = None
        try:
            with _progress(bool(show) and dist.rank == 0, len(mine), len(mine) - len(todo), spec.name) as bar:
                self._predict_all(spec, root, task_dir, todo, bar)
        except (RunError, OSError) as e:
            if not dist.enabled:
                raise
            err = f"rank {dist.rank}: {e}"
        err = dist.first_error(err)  # doubles as the barrier: every rank has finished its shard
        if err:
            raise RunError(err)
        result, err = None, None
        if dist.rank == 0:
            try:
                result = self._finish(spec, root, task_dir, samples, h, data_fp)
            except Exception as e:
                if not dist.enabled:
                    raise
                err = f"{type(e).__name__}: {e}"
        err = dist.broadcast(err)
        if err:
            raise RunError(err)
        return result

    def _predict_all(self, spec: TaskSpec, root: Path, task_dir: Path, todo: list[Sample], bar) -> None:
        writer = SampleWriter(task_dir, self.dist.rank)
        succeeded, predict_failures = 0, []
        try:
            for start in range(0, len(todo), max(1, self.opts.batch_size)):
                chunk = todo[start:start + self.opts.batch_size]
                items = []
                for s in chunk:
                    try:
                        items.append(Item(s, *self._open_inputs(spec, root, s)))
                    except ValueError as e:
                        writer.write(self._failure_record(spec, s, str(e), "data"))
                        if bar is not None:
                            bar.advance()
                for item, out in self._predict_batch(spec, root, items):
                    if out.get("failure") is not None:
                        rec = self._failure_record(spec, item.sample, str(out["failure"]), out.get("_stage", "predict"))
                        predict_failures.append(rec["failure"])
                    else:
                        rec = self._record(spec, task_dir, item, out)
                        succeeded += 1
                    writer.write(rec)
                    if bar is not None:
                        bar.advance()
                if not succeeded and len(predict_failures) >= self.opts.max_systematic_failures:
                    raise RunError(f"{spec.name}: the first {len(predict_failures)} samples all failed in the "
                                   f"predictor (systematic?); first error: {predict_failures[0]}")
        finally:
            writer.close()

    def _open_inputs(self, spec: TaskSpec, root: Path, s: Sample) -> tuple[dict, dict]:
        """(predictor inputs, report-only images). Every image a sample needs is decoded here, so
        a corrupt file is this sample's recorded failure before any compute is spent on it."""
        images: dict[str, Image.Image] = {}
        report: dict[str, Image.Image] = {}
        if s.image is not None:
            img = open_image(root, s.image)  # t2i: the FID reference, verified here, used when scoring
            if spec.kind != "t2i":
                images["image"] = img
        if s.target is not None:
            report["target"] = open_image(root, s.target)
        for j, shot in enumerate(s.shots):
            if shot.image is not None:
                images[f"shot:{j}"] = open_image(root, shot.image)
        return images, report

    def _predict_batch(self, spec: TaskSpec, root: Path, items: list[Item]) -> list[tuple[Item, dict[str, Any]]]:
        """Predictions for a batch; when the batch raises, each item is retried alone so one bad
        sample becomes one recorded failure instead of taking its neighbours down."""
        if not items:
            return []
        try:
            outs = self.predictor.predict(Batch(spec, items, root))
            if not isinstance(outs, list) or len(outs) != len(items):
                raise RunError(f"predictor returned {len(outs) if isinstance(outs, list) else type(outs).__name__} "
                               f"results for {len(items)} samples")
            return [(it, self._check_output(spec, o)) for it, o in zip(items, outs)]
        except (KeyboardInterrupt, SystemExit, RunError):
            raise
        except Exception as e:
            if len(items) == 1:
                return [(items[0], {"failure": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})]
            log.warning("%s: a batch of %d failed (%s); retrying its samples one by one", spec.name, len(items), e)
            out = []
            for it in items:
                out += self._predict_batch(spec, root, [it])
            return out

    @staticmethod
    def _check_output(spec: TaskSpec, out: Any) -> dict[str, Any]:
        if not isinstance(out, dict):
            return {"failure": f"predictor returned {type(out).__name__}, expected a dict"}
        unknown = set(out) - _RESULT_KEYS
        if unknown:
            raise RunError(f"predictor returned unknown keys {sorted(unknown)} (allowed: {sorted(_RESULT_KEYS)})")
        if out.get("failure") is not None:
            return out
        if spec.output_modality == "image":
            if not isinstance((out.get("images") or {}).get("output"), Image.Image):
                return {"failure": "predictor returned no output image"}
        elif not isinstance(out.get("prediction"), str):
            return {"failure": "predictor returned no text prediction"}
        return out

    # --- records
    def _base_record(self, spec: TaskSpec, s: Sample) -> dict[str, Any]:
        return {"id": s.id, "index": s.index, "seed": s.seed, "kind": spec.kind, "prompt": s.text,
                "prediction": None, "references": s.references, "images": {}, "candidates": [], "scores": None,
                "best": 0, "failure": None, "retrieved": [], "per_sample": {},
                "input": {"text": s.text, "image": s.image, "target": s.target}, "meta": s.meta,
                "shots": [x.id for x in s.shots]}

    def _failure_record(self, spec: TaskSpec, s: Sample, error: str, stage: str) -> dict[str, Any]:
        rec = self._base_record(spec, s)
        rec["failure"], rec["failure_stage"] = error, stage
        return rec

    def _record(self, spec: TaskSpec, task_dir: Path, item: Item, out: dict[str, Any]) -> dict[str, Any]:
        s = item.sample
        rec = self._base_record(spec, s)
        stem = f"{s.index:07d}-{re.sub(r'[^A-Za-z0-9._-]', '_', s.id)[:60]}"
        img_dir = task_dir / "images"
        paths: dict[str, str] = {}
        for role, img in (out.get("images") or {}).items():
            name = f"{stem}-{re.sub(r'[^A-Za-z0-9_-]', '_', role)}.png"
            save_png(img, img_dir / name)
            paths[role] = f"images/{name}"
        # thumbnails of the input and the ground truth, for the report (source → edited → target)
        for role, img in (("input", item.images.get("image")), ("target", item.report_images.get("target"))):
            if img is not None:
                save_png(img, img_dir / f"{stem}-{role}.png", THUMBNAIL)
                paths[role] = f"images/{stem}-{role}.png"
        cands = []
        for j, img in enumerate(out.get("candidates") or []):
            name = f"{stem}-cand{j:02d}.png"
            save_png(img, img_dir / name)
            cands.append(f"images/{name}")
        rec.update(prompt=out.get("prompt", s.text), prediction=out.get("prediction"), images=paths,
                   candidates=cands, scores=out.get("scores"), best=int(out.get("best") or 0),
                   retrieved=out.get("retrieved") or [])
        if out.get("extra"):
            rec["extra"] = out["extra"]
        return rec

    # --- merge and score (rank 0)
    def _finish(self, spec: TaskSpec, root: Path, task_dir: Path, samples: list[Sample], h: str,
                data_fp: str) -> TaskResult:
        from evals import scoring

        records = read_records(task_dir)
        selected = []
        missing = []
        for s in samples:
            rec = records.get(s.id)
            if rec is None or rec.get("index") != s.index:
                missing.append(s.id)
            else:
                selected.append(rec)
        if missing:
            raise RunError(f"{spec.name}: {len(missing)} samples have no result (e.g. {missing[:3]}); "
                           "a rank stopped early? Run the same command again to resume")
        failures = [{"id": r["id"], "error": r["failure"]} for r in selected if r.get("failure") is not None]
        ok = [r for r in selected if r.get("failure") is None]
        scored = scoring.score_task(spec, ok, task_dir=task_dir, data_root=root, predictor=self.predictor,
                                    device=self.opts.device)
        for r in ok:
            r["per_sample"] = scored.per_sample.get(r["id"], {})
        self._rewrite_merged(task_dir, records, {r["id"]: r for r in selected})
        metrics = {name: m.to_json() for name, m in scored.metrics.items()}
        failures += scored.failures
        entry = {"metrics": metrics, "failures": failures, "config_hash": h, "n_samples": len(selected),
                 "n_scored": len(ok), "task_version": spec.version, "data_fingerprint": data_fp,
                 "model_fingerprint": str(getattr(self.predictor, "fingerprint", "")), "limit": spec.limit}
        if scored.notes:
            entry["notes"] = scored.notes
        return TaskResult(spec.name, metrics, failures, h, len(selected), task_dir, entry)

    @staticmethod
    def _rewrite_merged(task_dir: Path, records: dict[str, dict], updated: dict[str, dict]) -> None:
        """All samples into rank-00000.jsonl sorted by index (with per-sample scores), other rank
        files removed. The rename is atomic; a crash before the removals leaves duplicate lines,
        which read_records merges by id."""
        merged = {**records, **updated}
        lines = [json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
                 for r in sorted(merged.values(), key=lambda r: (r["index"], str(r["id"])))]
        target = task_dir / "samples" / "rank-00000.jsonl"
        atomic_write_bytes(target, "".join(lines).encode())
        for p in _sample_files(task_dir):
            if p != target:
                p.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- a whole run
def write_metrics(out: Path, results: Iterable[TaskResult], run_meta: dict[str, Any]) -> Path:
    """RUN/metrics.json: this run's tasks merged into what the folder already holds."""
    path = Path(out) / "metrics.json"
    data: dict[str, Any] = {"run": {}, "tasks": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and isinstance(old.get("tasks"), dict):
                data["tasks"] = old["tasks"]
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable; rewriting it with this run's tasks only", path)
    data["run"] = run_meta
    for r in results:
        data["tasks"][r.name] = r.entry
    atomic_write_json(path, data)
    return path


def write_report(out: Path) -> Path | None:
    """RUN/report.html through reports.html when that part is installed; never fails the run."""
    try:
        from reports import html as report_html
    except ImportError:
        return None
    fn = getattr(report_html, "write_run_report", None)
    if fn is None:
        return None
    try:
        return fn(Path(out))
    except Exception as e:  # a broken report must not lose a finished evaluation
        log.warning("report.html not written: %s: %s", type(e).__name__, e)
        return None


def run(specs: list[TaskSpec], predictor: Predictor, options: RunOptions, dist: Dist | None = None,
        on_task: Callable[[TaskResult], None] | None = None) -> dict[str, TaskResult]:
    """Run tasks in order; metrics.json is rewritten after each task, report.html at the end."""
    dist = dist or Dist()
    engine = Engine(predictor, options, dist)
    out = Path(options.out)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    results: dict[str, TaskResult] = {}
    run_meta = {"created": _now(), "versions": versions(), "git_hash": git_hash(), "model": options.model_name,
                "model_fingerprint": str(getattr(predictor, "fingerprint", "")), "argv": options.argv,
                "world_size": dist.world, "device": options.device, "dtype": options.dtype}
    if dist.rank == 0:
        from evals import scoring

        scoring.prepare(specs)
    for spec in specs:
        t0 = time.time()
        result = engine.run_task(spec)
        if result is not None:
            result.entry["seconds"] = round(time.time() - t0, 3)
            results[spec.name] = result
            write_metrics(out, [result], run_meta)
            if on_task is not None:
                on_task(result)
    if dist.rank == 0 and results:
        write_report(out)
    dist.barrier()
    return results
