"""Task specs: the YAML schema as dataclasses, validation with file+field errors, and `--set` overrides.

A spec is plain data. `load_spec(path)` reads a YAML file with yaml.safe_load (aliases bounded:
tasks/yamlio.py) and checks every field against the dataclasses below; every error names the
file and the dotted field, e.g.

    tasks/specs/vqav2.yaml: generation.top_p: expected a number in (0, 1], got 'high'

`apply_overrides(spec, {"generation.cfg_scale": "3"})` returns a new spec with each value typed
by the field it replaces (int, float, bool, str, optional, dict); an unknown key is one error that
lists the closest known keys.

The sampler's settings are not copied here: `GenerationSpec` extends
`cm3leon.sampling.SamplingConfig`, and whether a combination of them is acceptable is decided by
`SamplingConfig.validate()` alone (its table of bounds, `cm3leon.sampling_config.BOUNDS`; the spec
only types the values and words the message from that table), so a spec, a `--set` and the
sampler accept the same values.
"""

from __future__ import annotations

import copy
import difflib
import re
import string
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from cm3leon.errors import Cm3evalError
from cm3leon.families import ROLE_PLACEHOLDERS
from cm3leon.sampling_config import BOUNDS as SAMPLING_BOUNDS
from cm3leon.sampling_config import SamplingConfig
from tasks.weights import NAMED_ENCODERS  # the named default encoders (evals.encoders resolves them)

from .published import PUBLISHED
from .yamlio import YAMLLimitError, safe_load

KINDS = ("t2i", "caption", "vqa", "edit", "dialog", "control")

# Which `{placeholders}` a prompt template may use, per kind. `answer` is the target text of an
# in-context example (caption / answer); a zero-shot template must not use it.
TEMPLATE_FIELDS = {
    "t2i": {"caption"},
    "caption": set(),
    "vqa": {"question"},
    "edit": {"instruction"},
    "dialog": {"caption", "history", "question"},  # visual dialog: the image's caption, the rounds so far
    "control": {"caption"},  # structure-guided generation: the caption of the image to draw
}

# Reranker: "lm" (the decoder itself: log p(caption | candidate image), CM3's self-contained
# reranking), or a CLIP-style one: "model" (the checkpoint's own dual encoder), "demo", or a
# cm3leon.encoder.load_encoder spec: "open_clip:ARCH:PATH", "hf-clip:DIR", "native:PATH".
SCORER_PREFIXES = ("open_clip:", "hf-clip:", "native:")


class SpecError(Cm3evalError, ValueError):
    """A task spec is malformed; the message is one line naming the file and the field."""


# ----------------------------------------------------------------------------- schema
@dataclass
class SupportSpec:
    """Where k-shot in-context examples come from; unset fields inherit from the dataset."""

    split: str | None = None
    files: dict[str, str] | None = None
    images: str | None = None


@dataclass
class DatasetSpec:
    loader: str = ""  # a name in tasks.loaders.LOADERS
    split: str = ""
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to the data root
    images: str = ""  # image folder relative to the data root
    # VQA layouts that name images by id: a format string over {subtype} and {image_id}
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg"
    # Selection: with shuffle, the samples are a seeded permutation and --limit takes a prefix of
    # it, so `--limit 100` is the first 100 samples of `--limit 1000` (resumable, same ids).
    shuffle: bool = False
    one_per_image: bool = False  # t2i from captions: one caption per image (FID's reference set)
    builtin: str | None = None  # "shapes": the demo world, built on demand when no --data-root is given
    support: SupportSpec | None = None
    # A saved protocol manifest (JSON from `cm3eval protocol write`; a path on this machine, not
    # under the data root): the samples are its prompts, in its order (tasks/manifest.py).
    manifest: str | None = None


@dataclass
class PromptSpec:
    template: str = ""  # the query's text part, e.g. "Question: {question} Answer:"
    shot_template: str | None = None  # one in-context example; default: template + " {answer}"
    k_shot: int = 0
    # Text outputs: cut the generation at the first of these strings (after decoding).
    stop: list[str] = field(default_factory=lambda: ["\n"])


@dataclass
class GenerationSpec(SamplingConfig):
    """The sampler's settings (inherited from SamplingConfig, never copied) plus the ones the
    predictor decides around the sampler: the text budget and the reranker."""

    max_new_tokens: int = 32
    # Candidates (n_candidates, inherited) and reranking apply to image outputs only (text tasks
    # decode one answer), so a suite-wide --candidates 8 changes the t2i tasks and leaves the text
    # tasks as they are.
    rerank: bool = False
    scorer: str = "model"


@dataclass
class RetrievalSpec:
    enabled: bool = False
    bank: str = "model"  # "model": the bank bundled with the checkpoint; else a bank folder
    # The dual encoder that embeds the queries; it must be the one the bank was built with.
    # "model": the checkpoint's own; else an evals.encoders spec (open_clip:ARCH:PATH, hf-clip:DIR,
    # native:PATH), as CM3leon retrieves with a frozen CLIP.
    encoder: str = "model"
    k: int = 2
    max_similarity: float = 0.9
    prefer_multimodal: bool = True


@dataclass
class ProtocolSpec:
    """The published protocol a task reproduces (tasks/protocols.py): its manifest is built and
    checked before the model loads, and recorded with the run's metrics."""

    name: str
    # The manifest's sha256. Null in a spec file: the plan fills it in the resolved spec (so it is
    # part of the run's hashed config); given (--set protocol.manifest_hash=...), it pins the run.
    manifest_hash: str | None = None


@dataclass
class TaskSpec:
    name: str
    kind: str
    dataset: DatasetSpec
    description: str = ""
    version: int = 1  # bump when the task changes in a way that changes its numbers
    prompt: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)
    # metric name -> options; options are free-form here and checked by evals.scoring
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    limit: int | None = None  # default number of samples; None = all
    seed: int = 0
    protocol: ProtocolSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def output_modality(self) -> str:
        return "image" if self.kind in ("t2i", "edit", "control") else "text"

    def sampling_config(self) -> SamplingConfig:
        """The settings the sampler runs with for this task: the generation block as given,
        except that 3-stream guidance exists only for editing and candidates only for images."""
        g = self.generation
        values = {f.name: getattr(g, f.name) for f in fields(SamplingConfig)}
        if self.kind != "edit":
            values["image_cfg_scale"] = None
        if self.output_modality != "image":
            values["n_candidates"] = 1
            values["decoding"] = "ar"  # speculative Jacobi decoding is for image tokens only
        return SamplingConfig(**values)


# Fields that never change results: left out of the config hash.
COSMETIC_FIELDS = ("description",)


# ----------------------------------------------------------------------------- value checks
# dotted path -> (predicate, human description); applied after type checks
CHECKS: dict[str, tuple[Any, str]] = {
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "version": (lambda v: v >= 1, "an integer >= 1"),
    "limit": (lambda v: v >= 1, "a positive integer or null"),
    "prompt.k_shot": (lambda v: v >= 0, "an integer >= 0"),
    "generation.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "generation.scorer": (lambda v: v in ("lm", "model", "demo", *NAMED_ENCODERS) or v.startswith(SCORER_PREFIXES),
                          "lm, model, demo, clip-vit-b-32, open_clip:ARCH:PATH, hf-clip:DIR or native:PATH"),
    "retrieval.k": (lambda v: v >= 0, "an integer >= 0"),
    "retrieval.max_similarity": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "retrieval.encoder": (lambda v: v in ("model", "demo", *NAMED_ENCODERS) or v.startswith(SCORER_PREFIXES),
                          "model, demo, clip-vit-b-32, open_clip:ARCH:PATH, hf-clip:DIR or native:PATH"),
    "dataset.builtin": (lambda v: v in ("shapes",), "null or 'shapes'"),
    "protocol.name": (lambda v: v in PUBLISHED, "a published protocol (tasks/published.py)"),
    "protocol.manifest_hash": (lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
                               "a sha256 (64 hex digits) or null"),
}


# How messages word the sampler's settings: cm3leon.sampling_config.BOUNDS, whose check
# (SamplingConfig.validate(), see _check_sampling) decides what is accepted.
SAMPLING_WORDS: dict[str, str] = {name: words for name, (_, words) in SAMPLING_BOUNDS.items()}
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingConfig))
_FIELD_RE = re.compile(r"\b(" + "|".join(sorted(SAMPLING_FIELDS, key=len, reverse=True)) + r")\b")


def expected(where: str) -> str | None:
    """The wording of what a checked field accepts, or None for a plain typed field."""
    if where in CHECKS:
        return CHECKS[where][1]
    head, _, leaf = where.partition(".")
    return SAMPLING_WORDS.get(leaf) if head == "generation" else None


# ----------------------------------------------------------------------------- typed conversion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(value: Any, tp: Any, where: str, src: str) -> Any:
    """Check/convert one YAML value against a type hint; raise SpecError naming src and field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, src)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{src}: {where}: expected a mapping, got {_describe(value)}")
        return _build(tp, value, src, where + ".")
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{src}: {where}: expected {_type_name(tp)}, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{src}: {where}: expected a mapping, got {_describe(value)}")
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SpecError(f"{src}: {where}: keys must be strings, got {k!r}")
            out[k] = _convert(v, val_tp, f"{where}.{k}", src) if val_tp is not Any else v
        return out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{src}: {where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{src}: {where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{src}: {where}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{src}: {where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {where}")  # a bug in this module, not in the YAML


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], src: str, prefix: str = "") -> Any:
    hints = _hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else \
                f" (known: {', '.join(known)})"
            raise SpecError(f"{src}: {prefix}{key}: unknown field{hint}")
    kwargs = {}
    for f in fields(cls):
        where = prefix + f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise SpecError(f"{src}: {where}: required field is missing")
            continue
        check = CHECKS.get(where)
        words = expected(where)
        try:
            value = _convert(data[f.name], hints[f.name], where, src)
        except SpecError:
            if words is None:
                raise
            # a checked field says what it wants in full: "a number in (0, 1]", not just "a number"
            raise SpecError(f"{src}: {where}: expected {words}, got {_describe(data[f.name])}") from None
        if check is not None and value is not None and not check[0](value):
            raise SpecError(f"{src}: {where}: expected {check[1]}, got {_describe(data[f.name])}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_template(template: str, allowed: set[str], where: str, src: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise SpecError(f"{src}: {where}: not a valid template ({e})") from None
    # {eot}, {boi}, ...: special tokens named by role (cm3leon/families.py), encoded to the
    # checkpoint family's ids; the family check (does this family have the role) is the prompt's
    bad = sorted(n for n in names if n not in allowed and n not in ROLE_PLACEHOLDERS)
    if bad:
        ok = ", ".join("{" + a + "}" for a in sorted(allowed)) or "no placeholders"
        raise SpecError(f"{src}: {where}: unknown placeholder {{{bad[0]}}} (allowed here: {ok}, "
                        f"and the special roles {', '.join('{' + r + '}' for r in sorted(ROLE_PLACEHOLDERS))})")


def _check_sampling(gen: GenerationSpec, src: str) -> None:
    """The sampler's own validation, its message pinned to the `generation.` field it names."""
    try:
        SamplingConfig.validate(gen)
    except ValueError as e:
        msg = str(e)
        m = _FIELD_RE.search(msg)
        if m is None:
            raise SpecError(f"{src}: generation: {msg}") from None
        name = m.group(1)
        words = SAMPLING_WORDS.get(name)
        detail = f"expected {words}, got {_describe(getattr(gen, name))}" if words else msg
        raise SpecError(f"{src}: generation.{name}: {detail}") from None


def validate(spec: TaskSpec, src: str) -> TaskSpec:
    """Cross-field checks that the per-field types cannot express."""
    _check_sampling(spec.generation, src)
    if not spec.name or not all(c.isalnum() or c in "-_." for c in spec.name):
        raise SpecError(f"{src}: name: expected letters, digits, '-', '_' or '.', got {spec.name!r}")
    allowed = TEMPLATE_FIELDS[spec.kind]
    _check_template(spec.prompt.template, allowed, "prompt.template", src)
    if spec.prompt.shot_template is not None:
        _check_template(spec.prompt.shot_template, allowed | {"answer"}, "prompt.shot_template", src)
    if not spec.dataset.loader:
        raise SpecError(f"{src}: dataset.loader: required field is missing")
    for role, rel in {**spec.dataset.files, "images": spec.dataset.images}.items():
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise SpecError(f"{src}: dataset.{'files.' + role if role != 'images' else 'images'}: "
                            f"must be a path inside the data root, got {rel!r}")
    if spec.prompt.k_shot and spec.kind in ("edit", "dialog", "control"):
        raise SpecError(f"{src}: prompt.k_shot: in-context examples are not supported for {spec.kind} tasks")
    if spec.prompt.k_shot and spec.dataset.support is None:
        raise SpecError(f"{src}: prompt.k_shot: {spec.prompt.k_shot} examples need dataset.support "
                        "(the split they are drawn from)")
    if spec.dataset.manifest is not None and spec.protocol is None:
        raise SpecError(f"{src}: dataset.manifest: a manifest pins a published protocol; the task names none "
                        "(protocol.name)")
    if not spec.metrics:
        raise SpecError(f"{src}: metrics: at least one metric is required")
    for name, opts in spec.metrics.items():
        if not isinstance(opts, dict):
            raise SpecError(f"{src}: metrics.{name}: expected a mapping of options (or {{}}), got {_describe(opts)}")
    return spec


def spec_from_dict(data: Any, src: str) -> TaskSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{src}: expected a mapping at the top level, got {_describe(data)}")
    # `metrics: {fid: null}` reads naturally in YAML; treat null options as {}
    if isinstance(data.get("metrics"), dict):
        data = {**data, "metrics": {k: ({} if v is None else v) for k, v in data["metrics"].items()}}
    return validate(_build(TaskSpec, data, src), src)


def load_yaml(path: Path, src: str | None = None) -> Any:
    src = src or str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{src}: task spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{src}: cannot read ({e})") from None
    try:
        return safe_load(text)
    except YAMLLimitError as e:
        raise SpecError(f"{src}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{src}: malformed YAML{at}: {problem}") from None


def load_spec(path: str | Path, src: str | None = None) -> TaskSpec:
    """`src`: how errors name the file (default: the path as given)."""
    path = Path(path)
    src = src or str(path)
    return spec_from_dict(load_yaml(path, src), src)


# ----------------------------------------------------------------------------- overrides
def _leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """dotted path -> type hint for every settable field (nested dataclasses expanded)."""
    out: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        base = typing.get_args(tp)[0] if typing.get_origin(tp) in (Union, types.UnionType) else tp
        if is_dataclass(base):
            out.update(_leaf_paths(base, f"{prefix}{name}."))
        out[prefix + name] = tp
    return out


def known_keys(spec: TaskSpec) -> list[str]:
    """Every key `--set` accepts for this spec (metric options come from the spec itself)."""
    keys = [k for k in _leaf_paths(TaskSpec) if k not in ("metrics",)]
    keys += [f"dataset.files.{r}" for r in spec.dataset.files]
    for name, opts in spec.metrics.items():
        keys.append(f"metrics.{name}")
        keys += [f"metrics.{name}.{o}" for o in opts]
    return sorted(set(keys))


_TRUE, _FALSE, _NULL = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"null", "none", "~", ""}


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """A command-line string typed by the field it sets."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if raw.strip().lower() in _NULL:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return parse_value(raw, args[0], key)
    s = raw.strip()
    try:
        if tp is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if tp is str:
            return raw
    except ValueError:
        raise SpecError(f"--set {key}={raw}: expected {_type_name(tp)}") from None
    # lists, mappings and free-form metric options: YAML syntax (`[a, b]`, `{x: 1}`, `3`, `true`)
    try:
        return safe_load(raw)
    except YAMLLimitError as e:
        raise SpecError(f"--set {key}: refused: {e}") from None
    except yaml.YAMLError:
        raise SpecError(f"--set {key}={raw}: not a valid YAML value") from None


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item}: expected key.path=value")
        out[key.strip()] = value
    return out


def _unknown_key(key: str, spec: TaskSpec) -> SpecError:
    keys = known_keys(spec)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # match on the last component too: `cfg_scale` -> generation.cfg_scale
        close = [k for k in keys if k.split(".")[-1] == key.split(".")[-1]][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `cm3eval show TASK` for the keys"
    return SpecError(f"--set {key}: unknown key for task {spec.name}{hint}")


def apply_overrides(spec: TaskSpec, overrides: dict[str, Any], src: str | None = None) -> TaskSpec:
    """A new spec with `overrides` (dotted key -> raw string or typed value) applied and re-validated."""
    if not overrides:
        return spec
    data = copy.deepcopy(spec.to_dict())
    leaf = _leaf_paths(TaskSpec)
    for key, raw in overrides.items():
        parts = key.split(".")
        if key in ("name", "kind"):
            raise SpecError(f"--set {key}: a task's {key} cannot be overridden")
        if parts[0] == "metrics":
            if len(parts) < 2 or parts[1] not in spec.metrics:
                raise _unknown_key(key, spec)
            if len(parts) == 2:  # replace all options: --set metrics.fid={resolution: 299}
                value = parse_value(raw, dict[str, Any], key) if isinstance(raw, str) else raw
                data["metrics"][parts[1]] = value if value is not None else {}
                continue
            if len(parts) != 3 or parts[2] not in spec.metrics[parts[1]]:
                raise _unknown_key(key, spec)
            current = spec.metrics[parts[1]][parts[2]]
            tp = type(current) if isinstance(current, (bool, int, float)) else Any
            if isinstance(current, str):
                tp = str | None
            data["metrics"][parts[1]][parts[2]] = parse_value(raw, tp, key) if isinstance(raw, str) else raw
            continue
        if parts[:2] == ["dataset", "files"] and len(parts) == 3:
            tp: Any = str
        elif key in leaf:
            tp = leaf[key]
        else:
            raise _unknown_key(key, spec)
        try:
            value = parse_value(raw, tp, key) if isinstance(raw, str) else raw
        except SpecError:
            if expected(key) is None:
                raise
            raise SpecError(f"--set {key}={raw}: expected {expected(key)}") from None
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:  # an optional section that is null (dataset.support)
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return spec_from_dict(data, src or f"task {spec.name} with --set overrides")
