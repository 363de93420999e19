"""The engine: runs tasks against a predictor into a run folder, resumably, on one or N ranks.

It selects the samples, runs the predict loop, merges the ranks' sample files and scores; the
run folder itself (layout, writer, reader, metrics.json, the lock) is evals/runs.py, the
predictor protocol evals/protocol.py, provenance evals/provenance.py, torch.distributed
evals/dist.py. Reports are rendered by the CLI after a run, never here.

Results never depend on batch size or on the number of processes: each sample's seed comes
from (task seed, sample index), samples are sharded by index % dp_size over the data-parallel
groups (evals/dist.py: with --tp N each group of N ranks holds one split copy of the model, runs
the same batches in lockstep, and only its tp_rank 0 writes), and the config hash leaves out
batch size, --out, process count and --tp. Re-running the same command resumes: finished
samples (by id) are skipped. A resume refuses what it must not mix, naming it: a different config,
model files or input images whose bytes changed. A finished sample whose output is damaged (a PNG
whose bytes changed since it was written, a prediction that is not text) is regenerated.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from cm3leon.errors import Cm3evalError
from evals import runs
from evals.dist import Dist, init_distributed  # noqa: F401 (re-exported for the CLI)
from evals.progress import progress as make_progress, resolve_mode
from evals.decoding import decoding_entry, plain_decoding_hash
from evals.protocol import Batch, Item, Predictor, PredictorProtocolError, check_output, is_fatal
from evals.records import failure_record, input_files, metric_json, missing_metrics, output_record
from evals.provenance import (PACKAGE, config_hash, diff_keys, folder_digests, git_hash, package_version,
                              versions)
from tasks.images import open_image
from tasks.selection import derive_seed, selection_order
from tasks.loaders import DataError, Dataset, Sample, load_dataset, resolve_data_root
from tasks.spec import COSMETIC_FIELDS, TaskSpec

log = logging.getLogger("cm3eval")

__all__ = ["Batch", "Item", "Predictor", "Dist", "Engine", "RunError", "RunOptions", "TaskResult", "run", "select",
           "attach_shots", "derive_seed", "exit_status", "init_distributed"]


class RunError(Cm3evalError, RuntimeError):
    """A run cannot proceed (config mismatch, changed inputs, incomplete shards ...); one line."""


class GroupError(RunError):
    """Another rank of this tensor-parallel group failed (its message names it); this one stops too."""


class SystematicFailure(RunError):
    """The predictor fails on every sample: a broken setup, not bad samples."""

    exit_code = 1


# ----------------------------------------------------------------------------- options and results
@dataclass
class RunOptions:
    out: Path
    data_root: Path | None = None
    batch_size: int = 8  # prompts per predict() call, one sampler step (the plan's prompts per step)
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool | str | None = None  # None/"auto": rich on a terminal, plain lines otherwise; False: off
    model_name: str = ""
    model_path: Path | None = None  # the checkpoint folder, hashed in full (default: the predictor's)
    overrides: dict[str, Any] = field(default_factory=dict)  # for config.json (already applied to the spec)
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    max_systematic_failures: int = 8  # abort when this many predictor failures come before any success
    label: str = ""  # the sweep point ("generation.cfg_scale=3"), named in the progress lines


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, Any]
    failures: list[dict[str, str]]
    config_hash: str
    n_samples: int
    task_dir: Path
    entry: dict[str, Any]
    n_failed: int = 0  # samples without a prediction (data or predictor failures)
    first_failure: dict[str, str] | None = None  # {"id", "error"} of the lowest-index failed sample
    missing_metrics: dict[str, str] = field(default_factory=dict)  # requested metric key -> why not computed


def exit_status(results: Iterable[TaskResult], max_failures: float = 0.01) -> tuple[int, list[str]]:
    """The exit-code contract for `cm3eval run`: 1 when a task's failed fraction is over max_failures
    (every sample failed always counts), else 3 when a requested metric could not be computed,
    else 0; with one line per reason."""
    code, reasons = 0, []
    for r in results:
        if r.n_samples and (r.n_failed == r.n_samples or r.n_failed / r.n_samples > max_failures):
            first = f"; first: {r.first_failure['id']}: {r.first_failure['error']}" if r.first_failure else ""
            reasons.append(f"{r.name}: {r.n_failed} of {r.n_samples} samples failed "
                           f"(allowed: {max_failures:.1%}){first}")
            code = 1
    for r in results:
        for key, why in r.missing_metrics.items():
            reasons.append(f"{r.name}: metric {key} not computed: {why}")
            code = code or 3
    return code, reasons


# ----------------------------------------------------------------------------- selection and shots
def select(dataset: Dataset, spec: TaskSpec) -> list[Sample]:
    """The evaluated samples: canonical order (or a seeded permutation), then the first `limit`.
    Indices are positions in that order, so a smaller limit is a prefix of a larger one. The
    rule is tasks.selection's, which the FID-30K manifest records too."""
    samples = selection_order(dataset.samples, shuffle=spec.dataset.shuffle, seed=spec.seed, limit=spec.limit)
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


# ----------------------------------------------------------------------------- one task's plan
@dataclass
class _Tally:
    """Predictions of one shard so far: a run whose first ones all fail is stopped (systematic)."""

    succeeded: int = 0
    predict_failures: list[str] = field(default_factory=list)


@dataclass
class TaskPlan:
    spec: TaskSpec
    root: Path
    task_dir: Path
    samples: list[Sample]
    config: dict[str, Any]
    inputs: dict[str, dict[str, str | None]] = field(default_factory=dict)  # sample id -> input_files()

    @property
    def hash(self) -> str:
        return str(self.config["hash"])

    @property
    def data_fingerprint(self) -> str:
        return str(self.config["hashed"]["data"])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _shared_error(e: BaseException, prefix: str = "") -> tuple[str, int]:
    """(one-line message, exit code) of an error, to send to the other ranks."""
    msg = str(e) if isinstance(e, Cm3evalError) else _one_line(e)
    return prefix + msg, int(getattr(e, "exit_code", RunError.exit_code))


def _raise_shared(err: tuple[str, int] | None, cls: type[RunError] = RunError) -> None:
    """Raise a rank's error on every rank, keeping its exit code."""
    if err:
        e = cls(err[0])
        e.exit_code = err[1]
        raise e


class Engine:
    def __init__(self, predictor: Predictor, options: RunOptions, dist: Dist | None = None,
                 model_files: dict[str, str] | None = None) -> None:
        self.predictor = predictor
        self.opts = options
        self.dist = dist or Dist()
        self.model_files = model_files or {}  # {file: digest} of the checkpoint folder, when known

    # --- configuration
    def hashed_config(self, spec: TaskSpec, data_fp: str, root: Path | None = None) -> dict[str, Any]:
        """Everything that changes a sample's output; NOT batch size, --out, process count, limit.

        Metric options are left out too: scoring is recomputed from the sample lines at the end of
        every run, so e.g. adding the Inception weights later re-scores without regenerating."""
        task = spec.to_dict()
        # limit only picks a prefix of the same samples; metrics only change the scoring
        for k in COSMETIC_FIELDS + ("limit", "metrics"):
            task.pop(k, None)
        plain_decoding_hash(task)
        extra = {}
        if hasattr(self.predictor, "task_fingerprint"):
            # the data root: a bank named data:REL lives under it
            extra = dict(self.predictor.task_fingerprint(spec, data_root=root) or {})
        hashed = {"task": task, "model": str(getattr(self.predictor, "fingerprint", "")), "predictor": extra,
                  "data": data_fp, PACKAGE: package_version(), "dtype": self.opts.dtype,
                  "device": self.opts.device.split(":")[0]}
        if self.model_files:
            hashed["model_files"] = dict(self.model_files)
        return hashed

    def plan(self, spec: TaskSpec) -> TaskPlan:
        """Load the data, select the samples, attach shots, and build config.json."""
        root = resolve_data_root(spec, self.opts.data_root)
        dataset = load_dataset(spec, root)
        data_fp = dataset.fingerprint
        samples = select(dataset, spec)
        if spec.prompt.k_shot:
            support = load_dataset(spec, root, support=True)
            data_fp = hashlib.sha256(f"{data_fp}+{support.fingerprint}".encode()).hexdigest()[:16]
            attach_shots(samples, support.samples, spec)
        hashed = self.hashed_config(spec, data_fp, root)
        config = {"task": spec.to_dict(), "model": self.opts.model_name, "overrides": self.opts.overrides,
                  "hash": config_hash(hashed), "hashed": hashed, "data_root": str(root), "limit": spec.limit,
                  "n_selected": len(samples), "data_files": dataset.files, "created": _now(),
                  "versions": versions()}
        return TaskPlan(spec, root, Path(self.opts.out) / spec.name, samples, config)

    def _prepare_dir(self, plan: TaskPlan) -> None:
        """rank 0: refuse a different config (with --overwrite: discard that task's samples and
        images; the samples of an unchanged config are always kept); write config.json."""
        spec, task_dir = plan.spec, plan.task_dir
        cfg_path = task_dir / runs.CONFIG
        if cfg_path.exists():
            try:
                old = runs.read_json(cfg_path)
                old_hash, old_hashed = old["hash"], old.get("hashed", {})
            except (runs.RunFolderError, KeyError, TypeError):
                old_hash, old_hashed = None, {}
                if not self.opts.overwrite:
                    raise RunError(f"{cfg_path}: unreadable config of an earlier run; use a new --out or --overwrite")
            if old_hash != plan.hash:
                diffs = diff_keys(old_hashed, plan.config["hashed"]) or ["(hash only)"]
                shown = "; ".join(diffs[:6]) + (f"; … {len(diffs) - 6} more" if len(diffs) > 6 else "")
                if not self.opts.overwrite:
                    raise RunError(f"{task_dir} holds a run of {spec.name} with a different config: {shown}. "
                                   f"Use a new --out to keep both, or --overwrite to discard it")
                log.warning("%s: --overwrite: discarding the samples of a different config (%s)", spec.name, shown)
                for sub in (runs.SAMPLES, runs.IMAGES):
                    shutil.rmtree(task_dir / sub, ignore_errors=True)
        runs.write_task_config(task_dir, plan.config)

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0, its error (one line) raised on every rank; returns rank 0's value there."""
        value, err = None, None
        if self.dist.rank == 0:
            try:
                value = fn()
            except Exception as e:
                if not self.dist.enabled:
                    raise
                err = _shared_error(e)
        _raise_shared(self.dist.broadcast(err))
        return value

    # --- one task
    def run_task(self, spec: TaskSpec) -> TaskResult | None:
        """Predict every unfinished sample of this data-parallel group's shard, then (rank 0)
        merge and score. Returns the result on rank 0, None on the other ranks."""
        plan = self.plan(spec)
        self._on_rank0(lambda: self._prepare_dir(plan))
        mine = [s for s in plan.samples if s.index % self.dist.dp_size == self.dist.dp_rank]
        # Every rank reads the run folder before any rank writes to it: the ranks of a
        # tensor-parallel group must compute the same to-do list, and a refusal (changed
        # inputs) stops every rank before compute is spent.
        todo = self._on_every_rank(lambda: self._todo(plan, mine))
        self._on_every_rank(lambda: self._predict_shard(plan, mine, todo))  # doubles as the barrier
        return self._on_rank0(lambda: self._finish(plan))

    def _on_every_rank(self, fn: Callable[[], Any]) -> Any:
        """fn() on every rank; the first rank's error (one line) raised on all of them."""
        value, err = None, None
        try:
            value = fn()
        except (Cm3evalError, OSError) as e:
            if not self.dist.enabled:
                raise
            err = _shared_error(e, "" if isinstance(e, GroupError) else f"rank {self.dist.rank}: ")
        _raise_shared(self.dist.first_error(err))
        return value

    def _predict_shard(self, plan: TaskPlan, mine: list[Sample], todo: list[Sample]) -> None:
        dist, spec = self.dist, plan.spec
        if len(todo) < len(mine) and dist.writes_outputs:
            log.info("%s: resuming, %d of %d samples already done", spec.name, len(mine) - len(todo), len(mine))
        mode = resolve_mode(self.opts.progress) if dist.rank == 0 else "off"
        label = f"{spec.name} [{self.opts.label}]" if self.opts.label else spec.name
        with make_progress(mode, len(mine), len(mine) - len(todo), label) as bar:
            self._predict_all(plan, todo, bar)

    def _todo(self, plan: TaskPlan, mine: list[Sample]) -> list[Sample]:
        """The samples of this shard to (re)compute. Predictor failures are retried (they may be
        transient); data failures are final unless the input files changed since; a finished
        sample whose output is damaged (runs.damaged_output: an image changed since it was written,
        a prediction that is not text) is regenerated; a finished sample whose input images
        changed is refused (its prediction belongs to other pixels), or recomputed with --overwrite."""
        records = runs.read_samples(plan.task_dir)
        todo, changed = [], []
        for s in mine:
            rec = records.get(s.id)
            files = plan.inputs[s.id] = input_files(plan.root, s)
            if rec is None or rec.get("index") != s.index:
                todo.append(s)
                continue
            old = rec.get("input_files")
            same_inputs = old is None or old == files  # a line without input digests counts as unchanged
            if rec.get("failure") is not None:
                if rec.get("failure_stage") != "data" or not same_inputs:
                    todo.append(s)
            elif not same_inputs:  # --overwrite recomputes it; else the run is refused below
                changed += [rel for rel in files if old.get(rel) != files[rel]]
                todo += [s] if self.opts.overwrite else []
            elif why := runs.damaged_output(plan.task_dir, rec, plan.spec.output_modality):
                log.warning("%s: sample %s: %s; regenerating it", plan.spec.name, s.id, why)
                todo.append(s)
        if changed and not self.opts.overwrite:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise RunError(f"{plan.task_dir}: input images changed since their samples were computed: {shown}. "
                           "Use a new --out, or --overwrite to recompute those samples")
        return todo

    def _predict_all(self, plan: TaskPlan, todo: list[Sample], bar: Any) -> None:
        """Batches of `batch_size` in order. Only the group's writing rank (tp_rank 0) opens a
        samples file (named by its data-parallel rank) and saves PNGs; its tensor-parallel peers
        run the same batches for the model's all-reduces and check in after each one, so an
        error on any of them stops the whole group instead of leaving the others blocked."""
        dist = self.dist
        tally = _Tally()
        writer = runs.SampleWriter(plan.task_dir, dist.dp_rank) if dist.writes_outputs else None
        try:
            step = dist.group_min(max(1, self.opts.batch_size))
            for start in range(0, len(todo), step):
                err = None
                try:
                    self._run_batch(plan, todo[start:start + step], writer, bar, tally)
                except Exception as e:
                    if dist.tp == 1:
                        raise
                    err = e
                shared = dist.group_error(_shared_error(err, f"rank {dist.rank}: ") if err else None)
                if err is not None:
                    raise err
                _raise_shared(shared, GroupError)
        finally:
            if writer is not None:
                writer.close()

    def _run_batch(self, plan: TaskPlan, chunk: list[Sample], writer: runs.SampleWriter | None, bar: Any,
                   tally: "_Tally") -> None:
        """One batch: decode its inputs, predict, write a line per sample (writing rank only)."""
        spec = plan.spec
        items = []
        for s in chunk:
            try:
                items.append(Item(s, *self._open_inputs(spec, plan.root, s)))
            except ValueError as e:
                if writer is not None:
                    writer.write(failure_record(spec, s, plan.inputs.get(s.id), str(e), "data"))
                bar.advance()
        for item, out in self._predict_batch(spec, plan.root, items):
            inputs = plan.inputs.get(item.sample.id)
            if out.get("failure") is not None:
                rec = failure_record(spec, item.sample, inputs, str(out["failure"]), "predict")
                tally.predict_failures.append(rec["failure"])
            else:
                tally.succeeded += 1
                # output_record saves the PNGs: only on the rank that writes
                rec = output_record(spec, plan.task_dir, item, inputs, out) if writer is not None else None
            if writer is not None:
                writer.write(rec)
            bar.advance()
        if not tally.succeeded and len(tally.predict_failures) >= self.opts.max_systematic_failures:
            raise SystematicFailure(f"{spec.name}: the first {len(tally.predict_failures)} samples all failed in "
                                    f"the predictor (systematic?); first error: {tally.predict_failures[0]}")

    def _open_inputs(self, spec: TaskSpec, root: Path, s: Sample) -> tuple[dict, dict]:
        """(predictor inputs, report-only images). Every image a sample needs is decoded here, so
        a corrupt file is this sample's recorded failure before any compute is spent on it."""
        images: dict[str, Image.Image] = {}
        report: dict[str, Image.Image] = {}
        if s.image is not None:
            img = open_image(s.image, root=root)  # t2i: the FID reference, verified here, used when scoring
            if spec.kind != "t2i":
                images["image"] = img
            else:  # shown on the report's card beside the candidates
                report["reference"] = img
        if s.target is not None:
            report["target"] = open_image(s.target, root=root)
        for j, shot in enumerate(s.shots):
            if shot.image is not None:
                images[f"shot:{j}"] = open_image(shot.image, root=root)
        return images, report

    def _predict_batch(self, spec: TaskSpec, root: Path, items: list[Item]) -> list[tuple[Item, dict[str, Any]]]:
        """Predictions for a batch; when the batch raises, each item is retried alone so one bad
        sample becomes one recorded failure instead of taking its neighbours down. A fatal error
        (protocol.is_fatal: a missing decoder, missing weights) stops the run: no retry can fix it.
        With tp > 1 the ranks of the group agree on the outcome first (_group_outcome)."""
        if not items:
            return []
        outs, err = None, None
        try:
            outs = self.predictor.predict(Batch(spec, items, root))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if is_fatal(e) and self.dist.tp == 1:
                raise
            err = e
        if self.dist.tp > 1:
            err = self._group_outcome(err)
        if err is not None:
            if is_fatal(err):
                raise err
            if len(items) == 1:
                return [(items[0], {"failure": _one_line(err)})]
            log.warning("%s: a batch of %d failed (%s); retrying its samples one by one", spec.name, len(items), err)
            out = []
            for it in items:
                out += self._predict_batch(spec, root, [it])
            return out
        if not isinstance(outs, list) or len(outs) != len(items):
            raise PredictorProtocolError(f"predictor returned {len(outs) if isinstance(outs, list) else type(outs).__name__}"
                                         f" results for {len(items)} samples")
        return [(it, check_output(spec, o)) for it, o in zip(items, outs)]

    def _group_outcome(self, err: Exception | None) -> Exception | None:
        """A batch failed on one rank of a tensor-parallel group (outside the model's collectives:
        image decoding, a reranker): every rank of the group treats it as failed, so all retry
        the same samples one by one in lockstep; a fatal error on any rank stops all of them."""
        mine = None if err is None else (f"rank {self.dist.rank}: {_one_line(err)}", is_fatal(err),
                                         int(getattr(err, "exit_code", RunError.exit_code)))
        first = self.dist.group_error(mine)
        if err is not None or first is None:
            return err
        peer = GroupError(first[0])
        peer.exit_code = first[2]
        if first[1]:
            raise peer
        return peer

    # --- merge and score (rank 0)
    def _finish(self, plan: TaskPlan) -> TaskResult:
        from evals import scoring

        spec = plan.spec
        records = runs.read_samples(plan.task_dir)
        selected = [records[s.id] for s in plan.samples
                    if s.id in records and records[s.id].get("index") == s.index]
        if len(selected) < len(plan.samples):
            missing = [s.id for s in plan.samples if s.id not in records or records[s.id].get("index") != s.index]
            raise RunError(f"{spec.name}: {len(missing)} samples have no result (e.g. {missing[:3]}); "
                           "a rank stopped early? Run the same command again to resume")
        failed = [r for r in selected if r.get("failure") is not None]
        ok = [r for r in selected if r.get("failure") is None]
        scored = scoring.score_task(spec, ok, task_dir=plan.task_dir, data_root=plan.root,
                                    predictor=self.predictor, device=self.opts.device)
        for r in ok:
            r["per_sample"] = scored.per_sample.get(r["id"], {})
        runs.rewrite_samples(plan.task_dir, {**records, **{r["id"]: r for r in selected}})
        return self._result(plan, scored, selected, failed)

    def _result(self, plan: TaskPlan, scored: Any, selected: list[dict], failed: list[dict]) -> TaskResult:
        spec = plan.spec
        metrics = {name: metric_json(m) for name, m in scored.metrics.items()}
        failures = [{"id": r["id"], "error": r["failure"]} for r in failed] + list(scored.failures)
        missing = missing_metrics(spec, scored, metrics)
        entry = {"metrics": metrics, "failures": failures, "config_hash": plan.hash, "n_samples": len(selected),
                 "n_scored": len(selected) - len(failed), "n_failed": len(failed), "task_version": spec.version,
                 "data_fingerprint": plan.data_fingerprint,
                 "model_fingerprint": str(getattr(self.predictor, "fingerprint", "")), "limit": spec.limit}
        if (decoding := decoding_entry(spec, selected)) is not None:  # not the protocol's plain loop
            entry["decoding"] = decoding
        if missing:
            entry["missing_metrics"] = missing
        if scored.notes:
            entry["notes"] = scored.notes
        first = {"id": failed[0]["id"], "error": failed[0]["failure"]} if failed else None
        return TaskResult(spec.name, metrics, failures, plan.hash, len(selected), plan.task_dir, entry,
                          n_failed=len(failed), first_failure=first, missing_metrics=missing)


# ----------------------------------------------------------------------------- a whole run
def _model_files(predictor: Predictor, options: RunOptions) -> dict[str, str]:
    """Full-content digests of the checkpoint folder (cached by size, mtime, ctime, inode)."""
    path = options.model_path or getattr(predictor, "model_path", None) \
        or getattr(getattr(predictor, "bundle", None), "path", None)
    if path is None or not Path(path).is_dir():
        return {}
    return folder_digests(Path(path))


def _run_meta(predictor: Predictor, options: RunOptions, dist: Dist) -> dict[str, Any]:
    return {"created": _now(), "versions": versions(), "git_hash": git_hash(), "model": options.model_name,
            "model_fingerprint": str(getattr(predictor, "fingerprint", "")), "argv": options.argv,
            "world_size": dist.world, "tp": dist.tp, "device": options.device, "dtype": options.dtype}


def run(specs: list[TaskSpec], predictor: Predictor, options: RunOptions, dist: Dist | None = None,
        on_task: Callable[[TaskResult], None] | None = None) -> dict[str, TaskResult]:
    """Run tasks in order, holding the run folder's lock; metrics.json is merged after each task."""
    dist = dist or Dist()
    out = Path(options.out)
    lock = runs.RunLock(out)
    engine = Engine(predictor, options, dist)

    def start() -> dict[str, str]:
        lock.acquire()  # rank 0 holds it for every rank of this run
        runs.clean_temp_files(out)
        from evals import scoring

        scoring.prepare(specs)
        return _model_files(predictor, options)

    try:
        engine.model_files = dist.broadcast(engine._on_rank0(start))
        run_meta = _run_meta(predictor, options, dist)
        results: dict[str, TaskResult] = {}
        stopped: list[tuple[str, Cm3evalError]] = []
        for i, spec in enumerate(specs):
            t0 = time.time()
            try:
                result = engine.run_task(spec)
            except Cm3evalError as e:
                if not _task_local(e):
                    raise
                if i + 1 < len(specs):  # the error itself is raised (one line) once every task ran
                    log.error("%s: stopped: %s; the run goes on with the next task", spec.name, e)
                stopped.append((spec.name, e))  # every rank raised the same shared error: all go on
                continue
            if result is not None:
                result.entry["seconds"] = round(time.time() - t0, 3)
                results[spec.name] = result
                runs.merge_task_metrics(out, run_meta, {spec.name: result.entry})
                if on_task is not None:
                    on_task(result)
        dist.barrier()
        if stopped:
            err = RunError("; ".join(f"{name}: {e}" for name, e in stopped)
                           + (f" (finished: {', '.join(results)}, in {out / runs.METRICS})" if results else ""))
            err.exit_code = stopped[0][1].exit_code
            err.results = results  # type: ignore[attr-defined]
            raise err
        return results
    finally:
        lock.release()


def _task_local(e: Cm3evalError) -> bool:
    """An error of one task (its config, data, inputs), after which the later tasks still run; a
    full disk, the lock, a broken predictor stop the run."""
    return not isinstance(e, (SystematicFailure, runs.DiskFullError, runs.RunLockedError)) and not is_fatal(e)
