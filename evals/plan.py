"""The plan phase: task names + `--set` + `--sweep` -> validated run plans, before any model loads.

Everything a run can know to be wrong without generating a token is checked here, in this
order, and reported as ONE line naming the setting (exit 2):

1. the names (tasks, suites, spec files) and --model (required outside the demo suite);
2. each resolved spec (the overrides applied): the schema, the sampler's settings through
   `SamplingConfig.validate()` (the one validation; tasks/spec.py), the loader's file roles,
   the metric names and options (`evals.scoring.check_metrics`);
3. the data root (resolved, existing, holding the annotation files; tasks/loaders.py);
4. local files: metric weights (`evals.scoring.required_files`), retrieval and reranking
   encoders (`evals.encoders.required_encoder_files`), a retrieval bank folder;
5. the checkpoint's capabilities (`cm3leon.checkpoint.inspect`, small files only): a VQ decoder
   for tasks that output images (or --vq), a dual encoder where "model" is named as one, a
   bundled bank where `retrieval.bank=model`, and prompt templates whose special roles
   (`{eot}` ...) the checkpoint's family has (`cm3leon.families.check_template`);
6. a published protocol (coco-fid: FID-30K): its manifest (tasks/protocols.py) is built from the
   annotations, or read from `dataset.manifest`, checked, hashed into the resolved spec
   (`protocol.manifest_hash`, so a resume with another manifest is refused naming that key) and
   summarised in `RunPlan.protocol` for metrics.json;
7. the device (evals/devices.py): --device / --dtype resolved (auto: CUDA when present), a device
   that is not there refused; then each task's prompts per step, sized ONCE here
   (evals/sizing.py over cm3leon/batching.py) from the device's total memory, with the modelled
   GPU time of its run;
8. the disk: the PNGs and sample lines the run will write (evals/disk.py) against the free space
   of --out's filesystem, refused when clearly insufficient unless --force-disk.

Values from typed command-line options (--cfg-scale 3) enter the spec as the float typer already
parsed; `--set` strings are typed once, by the field they set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cm3leon.errors import Cm3evalError
from cm3leon.sampling_config import SamplingConfig
from tasks.loaders import check_data_root, check_spec as check_loader, resolve_data_root
from tasks.spec import SpecError, TaskSpec, apply_overrides, known_keys, parse_assignments

# typed shorthand options of `run` / `show` -> the spec key they set
SHORTHANDS = {"retrieval_k": "retrieval.k", "cfg_scale": "generation.cfg_scale",
              "cdk_alpha": "generation.cdk_alpha", "candidates": "generation.n_candidates", "limit": "limit"}
DEFAULT_MAX_FAILURES = 0.01


class PlanError(Cm3evalError, ValueError):
    """A run cannot start as asked (usage or missing input); one-line message, exit 2."""


@dataclass(frozen=True)
class RunRequest:
    """What the command line asks for, before validation."""

    names: tuple[str, ...]
    sets: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()
    shorthands: dict[str, Any] = field(default_factory=dict)  # typed values, None = not given
    model: str | None = None
    data_root: Path | None = None
    out: Path | None = None
    vq: Path | None = None
    max_failures: str = "1%"
    tp: int = 1  # tensor-parallel ranks per model copy (under torchrun)
    device: str = "auto"  # --device (evals/devices.py)
    dtype: str = "auto"  # --dtype
    batch_size: int | None = None  # --batch-size: prompts per step for every task
    inspect_model: bool = True  # False when a test injects the predictor (no checkpoint behind --model)
    save_candidates: bool = False  # every candidate as a PNG (the disk estimate counts them)
    force_disk: bool = False  # run even when the disk estimate is over the free space
    family: str | None = None  # --family: a cm3leon.families name instead of config.json's detection
    image_size: int | None = None  # --image-size: the side of generated and read images (flexible families)


@dataclass
class TaskPlan:
    spec: TaskSpec
    sampling: SamplingConfig  # what the sampler runs with (validated)
    data_root: Path  # resolved; the demo world's is rendered on first use by the engine
    files: list[Path]  # the local files the task needs, all present
    protocol: dict[str, Any] | None = None  # tasks.protocols.summary(): metrics.json's "protocol"
    n_samples: int | None = None  # samples the run evaluates, where known before loading the model
    skipped_metrics: dict[str, str] = field(default_factory=dict)  # `when_available` metrics left out: why
    sizing: Any = None  # evals.sizing.TaskSizing: prompts per step (the engine's chunk), modelled time

    @property
    def prompts_per_step(self) -> int:
        return self.sizing.prompts_per_step


@dataclass
class RunPlan:
    point: dict[str, str]  # the sweep point ({} without --sweep)
    out: Path  # this point's run folder
    tasks: list[TaskPlan]
    overrides: dict[str, Any]  # key -> the value it resolved to, typed (for config.json)

    @property
    def specs(self) -> list[TaskSpec]:
        return [t.spec for t in self.tasks]

    @property
    def protocol(self) -> dict[str, dict[str, Any]]:
        """task name -> the published protocol it was measured under (tasks that follow one)."""
        return {t.spec.name: t.protocol for t in self.tasks if t.protocol is not None}


@dataclass
class Plan:
    model: str
    runs: list[RunPlan]
    max_failures: float
    checkpoint: Any = None  # cm3leon.checkpoint.CheckpointInfo, when one was inspected
    disk: Any = None  # evals.disk.DiskNeed: printed before the run starts
    device: Any = None  # evals.devices.DeviceChoice: the resolved --device / --dtype


# ----------------------------------------------------------------------------- parsing
def collect_overrides(sets: tuple[str, ...] | list[str], shorthands: dict[str, Any]) -> dict[str, Any]:
    """`--set` strings (typed later by their field) plus the typed shorthand options."""
    overrides: dict[str, Any] = parse_assignments(list(sets))
    for opt, key in SHORTHANDS.items():
        if shorthands.get(opt) is not None:
            overrides[key] = shorthands[opt]
    k = shorthands.get("retrieval_k")
    if k is not None and "retrieval.enabled" not in overrides:
        # --retrieval-k 2 on a task whose spec has retrieval off would otherwise change nothing, silently
        overrides["retrieval.enabled"] = k > 0
    return overrides


def parse_sweep(items: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """`--sweep k=v1,v2 --sweep j=a,b` -> the cartesian product as override dicts."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v != ""]
        if not sep or not key.strip() or not vals:
            raise PlanError(f"--sweep {item}: expected key.path=v1,v2,...")
        axes.append([(key.strip(), v) for v in vals])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def sweep_dir(out: Path, point: dict[str, str]) -> Path:
    if not point:
        return out
    return out / ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


def parse_max_failures(text: str) -> float:
    """"1%" or a fraction "0.01" -> 0.01."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise PlanError(f"--max-failures {text}: expected a percentage (1%) or a fraction in [0, 1] (0.01)")
    return value


def resolve_model(task_names: list[str], model: str | None) -> str:
    """--model as given; only the demo suite may leave it out (it defaults to the shipped demo model)."""
    if model:
        return model
    import tasks

    demo = set(tasks.suites().get("demo", []))
    outside = [n for n in task_names if n not in demo]
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise PlanError(f"--model is required for {shown}: pass --model PATH (a checkpoint folder: native, "
                        "HF Chameleon/Anole, or Meta's release); only the demo suite defaults to --model demo")
    return "demo"


# ----------------------------------------------------------------------------- specs
def check_spec(spec: TaskSpec, src: str) -> TaskSpec:
    """The checks above the task layer: the loader's roles and the metric table (the schema and
    the sampler's settings were checked when the spec was built)."""
    from evals.scoring import check_metrics

    check_loader(spec, src)
    check_metrics(spec, src)
    return spec


def resolve_specs(names: list[str] | tuple[str, ...], overrides: dict[str, Any], label: str = "--set") -> list[TaskSpec]:
    """Registry specs with the overrides each one knows applied. A key no task knows is an error
    (metric options and dataset files exist only in some tasks of a suite)."""
    import tasks

    specs = [tasks.get(n) for n in tasks.expand(list(names))]
    in_suite = tasks.suite_settings(list(names))  # a suite's own settings of its members; --set wins
    used: set[str] = set()
    out = []
    for spec in specs:
        keys = set(known_keys(spec))
        mine = {k: v for k, v in overrides.items() if k in keys or not k.startswith("metrics.")}
        src = f"task {spec.name} with {label} overrides"
        resolved = apply_overrides(spec, {**in_suite.get(spec.name, {}), **mine}, src)
        used |= set(mine)
        out.append(check_spec(resolved, src))
    unused = [k for k in overrides if k not in used]
    if unused:
        apply_overrides(specs[0], {unused[0]: overrides[unused[0]]})  # raises with the close matches
    return out


def typed_value(specs: list[TaskSpec], key: str) -> Any:
    """The value an override resolved to (typed), from the first spec that has the key."""
    for spec in specs:
        node: Any = spec.to_dict()
        try:
            for part in key.split("."):
                node = node[part]
            return node
        except (KeyError, TypeError):
            continue
    return None


def sampling_of(spec: TaskSpec) -> SamplingConfig:
    sampling = spec.sampling_config()
    try:
        sampling.validate()
    except ValueError as e:  # the spec validated its generation block; this is the per-kind view of it
        raise SpecError(f"task {spec.name}: generation: {e}") from None
    return sampling


# ----------------------------------------------------------------------------- the whole plan
def build_plan(req: RunRequest) -> Plan:
    """Validated run plans for every sweep point, or the first problem as a one-line error."""
    import tasks

    names = tasks.expand(list(req.names))
    model = resolve_model(names, req.model)
    max_failures = parse_max_failures(req.max_failures)
    overrides = collect_overrides(req.sets, req.shorthands)
    points = parse_sweep(req.sweeps)
    resolved = []  # the specs first: a usage error answers before torch is imported (< 1 s)
    for point in points:
        ov = {**overrides, **point}
        label = "--set" if not point else "--set/--sweep (" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"
        resolved.append((point, ov, resolve_specs(req.names, ov, label)))
    info = None
    if req.inspect_model:
        from cm3leon.checkpoint import inspect

        info = inspect(model, vq=req.vq, family=req.family, image_size=req.image_size)
    if req.tp > 1:
        check_tensor_parallel(req.tp, info)
    out = req.out or Path("runs") / (Path(model).name if model != "demo" else "demo")
    runs = []
    for point, ov, specs in resolved:
        specs = [family_defaults(spec, info, ov) for spec in specs]
        plans = [plan_task(spec, req.data_root, info) for spec in specs]
        runs.append(RunPlan(point, sweep_dir(Path(out), point), plans, {k: typed_value(specs, k) for k in ov}))
    from evals.devices import resolve as resolve_device

    device = resolve_device(req.device, req.dtype)  # a device that is not there: before the disk line
    for t in (t for r in runs for t in r.tasks):
        t.sizing = size_task(t, info, device, req)
    disk = disk_need(runs, info, Path(out), req.save_candidates)
    if disk.insufficient and not req.force_disk:
        raise PlanError(f"{disk.describe()}: not enough space; free some, write elsewhere (--out), lower "
                        "--limit, or pass --force-disk to run anyway")
    return Plan(model, runs, max_failures, info, disk, device)


def family_defaults(spec: TaskSpec, info: Any, overrides: dict[str, Any]) -> TaskSpec:
    """A text-to-image task samples with the checkpoint family's published defaults (Liquid: cfg 7,
    top-k 4096 ...; cm3leon.families), except for the generation fields the command line sets."""
    if info is None or spec.kind != "t2i":
        return spec
    from cm3leon import families

    family = families.get(info.family)
    defaults = {f"generation.{k}": v for k, v in family.sampling.items() if f"generation.{k}" not in overrides}
    if not family.reads_retrieved_documents and not {"retrieval.k", "retrieval.enabled"} & set(overrides):
        defaults["retrieval.enabled"] = False  # a model never trained on retrieved documents is prompted without
    return apply_overrides(spec, defaults, f"task {spec.name} with the {info.family} family's defaults")


def check_context_fits(spec: TaskSpec, info: Any) -> None:
    """Refuse, before the model loads, a task whose every prompt is too long for the checkpoint:
    the context documents' and the query's images alone (text counted as nothing) plus what is
    generated must fit max_seq_len (an Emu3 720 px image is about 8,200 tokens of a 9,216 window)."""
    from cm3leon import families
    from evals.sizing import prefix_len

    cfg = info.config
    family = families.get(info.family)
    least = prefix_len(cfg, spec, family, "cond", text_tokens=0)
    generated = cfg.image_seq_len if spec.output_modality == "image" else 1
    if least + generated <= cfg.max_seq_len:
        return
    docs = spec.prompt.k_shot + (spec.retrieval.k if _uses_retrieval(spec) else 0)
    fix = " (--retrieval-k 0 turns retrieval off)" if _uses_retrieval(spec) else ""
    raise PlanError(f"{spec.name}: every prompt needs at least {least:,} tokens ({docs} context document"
                    f"{'s' if docs != 1 else ''} with an image of {cfg.image_seq_len:,} codes each) + {generated:,} "
                    f"to generate, beyond {info.path.name}'s max_seq_len {cfg.max_seq_len:,}{fix}")


def plan_task(spec: TaskSpec, data_root: Path | None, info: Any) -> TaskPlan:
    sampling = sampling_of(spec)
    if info is not None:  # what the checkpoint can read at all, before any file of the task is looked for
        check_family_templates(spec, info)
        check_context_fits(spec, info)
    root = resolve_data_root(spec, data_root, build=False)
    if not (spec.dataset.builtin and data_root is None):  # the demo world is rendered, not provided
        check_data_root(spec, root)
        if spec.prompt.k_shot:
            check_data_root(spec, root, support=True)
    from evals.scoring import skip_absent

    spec, skipped = skip_absent(spec)  # before local_files: an absent optional metric's files are not needed
    files = local_files(spec, root)
    if info is not None:
        check_capabilities(spec, info)
    protocol = None
    if spec.protocol is not None:
        spec, protocol = resolve_protocol(spec, root)
    return TaskPlan(spec, sampling, root, files, protocol, count_samples(spec, root, data_root, protocol), skipped)


def size_task(t: TaskPlan, info: Any, device: Any, req: RunRequest) -> Any:
    """The task's prompts per step and modelled GPU time (evals/sizing.py); the one call per task."""
    from cm3leon import families
    from evals import sizing

    cfg = info.config if info is not None else None
    family = families.get(info.family) if info is not None else None
    return sizing.size_task(t.spec, cfg, family, device, req.tp, t.n_samples, req.batch_size)


def check_tensor_parallel(tp: int, info: Any) -> None:
    """--tp N: the world must be a multiple of N and the model's heads and MLP divisible by it
    (from config.json, before loading). The engine shards samples by data-parallel group, so
    the N ranks of a model copy run the same samples (evals/dist.py)."""
    import os

    from cm3leon.tensor_parallel import check_tp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < tp:
        raise PlanError(f"--tp {tp}: needs {tp} ranks per model copy; run under torchrun --nproc_per_node "
                        f"{tp} (or a multiple), WORLD_SIZE is {world}")
    if info is not None:
        check_tp(info.config, tp, world)
    elif world % tp:  # an injected predictor (tests): no config to check, the world still must split
        raise PlanError(f"--tp {tp}: the world of {world} ranks is not a multiple of tp={tp}")


# ----------------------------------------------------------------------------- files and capabilities
def _uses_retrieval(spec: TaskSpec) -> bool:
    return spec.retrieval.enabled and spec.retrieval.k > 0


def _reranks(spec: TaskSpec) -> bool:
    g = spec.generation
    return spec.output_modality == "image" and g.rerank and g.n_candidates > 1


def _wanted_files(spec: TaskSpec, root: Path) -> list[tuple[Path, str, str]]:
    """(path, what, how to get it) of every local file the task will open besides the model."""
    from evals.encoders import required_encoder_files
    from evals.scoring import required_files

    wanted = [(root / f.path if f.under_data_root else Path(f.path), f.what, f.how_to_get)
              for f in required_files(spec)]
    encoders = []
    if _uses_retrieval(spec):
        encoders.append((spec.retrieval.encoder, "retrieval.encoder", "--set retrieval.encoder=NAME"))
    if _reranks(spec) and spec.generation.scorer != "lm":
        encoders.append((spec.generation.scorer, "generation.scorer", "--set generation.scorer=NAME (or lm)"))
    for name, option, flag in encoders:
        for path, what in required_encoder_files(name, option):
            wanted.append((path, what, f"give the file in {flag}"))
    return wanted


def local_files(spec: TaskSpec, root: Path) -> list[Path]:
    """The files the task needs, all present; else a PlanError naming the first missing one."""
    present = []
    for path, what, how in _wanted_files(spec, root):
        if path is None:  # a file the metric needs that no option names yet
            raise PlanError(f"{spec.name}: {what} not given; {how}")
        if not Path(path).exists():
            raise PlanError(f"{spec.name}: {what} not found: {path}; {how}")
        present.append(Path(path))
    bank = spec.retrieval.bank
    if _uses_retrieval(spec) and bank != "model":
        from evals.bank_path import BankPathError, missing_bank, resolve_bank

        try:
            folder = resolve_bank(bank, root)  # a path, or data:REL under the task's data root
        except BankPathError as e:
            raise PlanError(f"{spec.name}: {e}") from None
        if not folder.is_dir():
            raise PlanError(missing_bank(spec.name, bank, folder))
    return present


def check_capabilities(spec: TaskSpec, info: Any) -> None:
    """What the task needs from the checkpoint, from `cm3leon.checkpoint.inspect` (no weights read)."""
    if spec.output_modality == "image":
        info.require_vq_decoder(f"task {spec.name} decodes images")
    no_encoder = f"{info.path} has no dual encoder (Chameleon/Anole folders have none)"
    if _uses_retrieval(spec):
        if spec.retrieval.bank == "model" and not info.has_bank:
            raise PlanError(f"{spec.name}: retrieval.bank=model but {info.path} ships no bank/; build one with "
                            "`cm3eval bank build` and pass --set retrieval.bank=DIR, or turn retrieval off "
                            "with --retrieval-k 0")
        if spec.retrieval.encoder == "model" and not info.has_encoder:
            raise PlanError(f"{spec.name}: retrieval.encoder=model but {no_encoder}; pass --set "
                            "retrieval.encoder=open_clip:ARCH:PATH (the encoder the bank was built with)")
    if _reranks(spec) and spec.generation.scorer == "model" and not info.has_encoder:
        raise PlanError(f"{spec.name}: generation.scorer=model but {no_encoder}; pass --set "
                        "generation.scorer=open_clip:ViT-B-32:PATH, or generation.scorer=lm")
    for metric, opts in spec.metrics.items():
        for option in ("encoder", "feature_space"):  # fid's feature_space names an encoder too (FD-<name>)
            if (opts or {}).get(option) == "model" and not info.has_encoder:
                raise PlanError(f"{spec.name}: metrics.{metric}.{option}=model but {no_encoder}; pass --set "
                                f"metrics.{metric}.{option}=clip-vit-b-32 or open_clip:ARCH:PATH")


def check_family_templates(spec: TaskSpec, info: Any) -> None:
    """Templates may name special tokens by role ({eot}, {boi}); the checkpoint's family must have them."""
    from cm3leon import families

    family = families.get(info.family)
    if spec.kind not in family.kinds:  # e.g. editing: the open one-stream models publish no layout for it
        raise PlanError(f"{spec.name}: the {family.name} family has no {spec.kind} prompt layout "
                        f"(it has {', '.join(family.kinds)})")
    for where in ("template", "shot_template"):
        template = getattr(spec.prompt, where)
        if template is None:
            continue
        try:
            families.check_template(template, family)
        except ValueError as e:
            raise PlanError(f"{spec.name}: prompt.{where}: {e}") from None


# ----------------------------------------------------------------------------- protocol and disk
def _inception_sha256(spec: TaskSpec, root: Path) -> str | None:
    """sha256 of the Inception weights the FID metric will load (present: local_files checked it)."""
    from evals.metrics.inception import WEIGHTS_FILE
    from evals.provenance import digest_cache
    from evals.scoring import required_files

    for f in required_files(spec):
        if f.metric == "fid" and f.what.startswith(WEIGHTS_FILE.what):
            path = root / f.path if f.under_data_root else Path(f.path)
            if not path.is_file():
                raise PlanError(f"{spec.name}: {f.what} not found: {path}; {f.how_to_get}")
            return digest_cache().digest(path)
    return None


def task_manifest(spec: TaskSpec, root: Path) -> tuple[TaskSpec, Any]:
    """(the spec as the manifest is applied to it, the manifest) of a task that follows a protocol."""
    from tasks.protocols import resolve_manifest

    if spec.dataset.manifest is not None and spec.dataset.shuffle:
        # the manifest's order is final; a shuffle on top would evaluate other prompts than its first N
        spec = replace(spec, dataset=replace(spec.dataset, shuffle=False))
    return spec, resolve_manifest(spec, root, _inception_sha256(spec, root))


def resolve_protocol(spec: TaskSpec, root: Path) -> tuple[TaskSpec, dict[str, Any]]:
    """The task's manifest, built or read and checked; the spec with its hash filled in (the
    engine hashes the spec, so the manifest is part of the run's config) and the summary."""
    from tasks.protocols import summary

    spec, manifest = task_manifest(spec, root)
    pin = spec.protocol.manifest_hash
    if pin is not None and pin != manifest.hash:
        raise PlanError(f"{spec.name}: protocol.manifest_hash: this run's manifest hashes to {manifest.hash}, "
                        f"not {pin} (other data, weights or settings); `cm3eval protocol write` shows it")
    spec = replace(spec, protocol=replace(spec.protocol, manifest_hash=manifest.hash))
    n = len(manifest.prompts) if spec.limit is None else min(spec.limit, len(manifest.prompts))
    out = summary(manifest, n)
    if spec.generation.decoding != "ar":  # the published protocols decode one token per forward
        out["deviations"].append(f"generation.decoding {spec.generation.decoding!r} "
                                 f"(window {spec.generation.jacobi_window}; published: 'ar')")
        out["matches_published"] = False
    return spec, out


def count_samples(spec: TaskSpec, root: Path, data_root: Path | None, protocol: dict[str, Any] | None) -> int | None:
    """The samples the run evaluates, for the disk estimate: the protocol's n, the limit, or (image
    tasks only, whose PNGs dominate) the loaded dataset's size; None when unknown."""
    if protocol is not None:
        return int(protocol["n"])
    if spec.limit is not None:
        return spec.limit
    if spec.output_modality != "image":
        return None
    from tasks.loaders import load_dataset

    if spec.dataset.builtin and data_root is None:  # the demo world: countable once rendered (cached)
        try:
            return len(load_dataset(spec, check_data_root(spec, root)).samples)
        except Cm3evalError:
            return None
    return len(load_dataset(spec, root).samples)


def disk_need(runs: list[RunPlan], info: Any, out: Path, save_candidates: bool) -> Any:
    """What the runs will write (evals/disk.py) and the free space under --out."""
    from evals import disk

    need = disk.DiskNeed(out, free=disk.free_bytes(out), runs=len(runs))
    for run_plan in runs:
        for t in run_plan.tasks:
            fid_res = (t.spec.metrics.get("fid") or {}).get("resolution")
            res = int(info.image_resolution) if info is not None else int(fid_res or 256)
            codes = int(info.config.image_seq_len) if info is not None else (res // 16) ** 2
            need.tasks.append(disk.task_disk(t.spec, t.n_samples, res, codes, save_candidates,
                                             run_plan.out / t.spec.name))
    return need
