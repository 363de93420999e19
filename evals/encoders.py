"""One resolver for the dual encoders that retrieval, reranking and the CLIP-space metrics use.

An encoder is named by a string:
- "model": the evaluated checkpoint's own dual encoder (`ModelBundle.encoder`);
- "demo": the demo checkpoint's encoder (cm3leon/zoo/shapes-demo/encoder.safetensors; the
  bundle's own when the demo model is the one being evaluated, so it is not loaded twice);
- "open_clip:ARCH:PATH", "hf-clip:FOLDER", "native:PATH": `cm3leon.encoder.load_encoder`;
- a bare folder holding a transformers CLIP (`config.json` inside): the same as "hf-clip:FOLDER";
- a named default (`tasks.weights.NAMED_ENCODERS`): `clip-vit-b-32`, open_clip ViT-B-32 (the CM3leon
  paper's frozen retriever and reranker), and `clip-vit-l-14-336` (CMMD's CLIP), each file found by
  the one weights finder ($CM3EVAL_CLIP_WEIGHTS / ..., `<cache>/weights/<file>`, the torch hub
  cache): what the registry's defaults can name on any checkpoint, since no Chameleon/Anole folder
  carries an encoder.
Nothing downloads: a missing file is a one-line `EncoderUnavailable` naming it and how to get it.

`required_encoder_files(name)` lists the files a name needs, for the plan phase (no loading).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cm3leon.errors import Cm3evalError
from tasks.weights import NAMED_ENCODERS, WEIGHTS, WeightsFile

KINDS = "model, demo, clip-vit-b-32, clip-vit-l-14-336, open_clip:ARCH:PATH, hf-clip:FOLDER (or an HF CLIP folder), native:PATH"
DEMO_ENCODER_FILE = "encoder.safetensors"


class EncoderUnavailable(Cm3evalError):
    """The named encoder cannot be had here (missing file, a checkpoint without one, a bad name).

    `reason` is the cause without the encoder's name, for callers that word the message themselves."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


@dataclass(frozen=True)
class NamedEncoder:
    """A default encoder known by name: an open_clip architecture whose weights file is found by the
    one weights finder (`tasks.weights`: the variable, the cache, the torch hub cache; never downloaded)."""

    file: WeightsFile

    @property
    def name(self) -> str:
        return self.file.key

    @property
    def arch(self) -> str:
        return str(self.file.encoder)

    @property
    def env(self) -> str:
        return self.file.env

    def places(self) -> list[tuple[str, Path]]:
        """(how, path) in the finder's search order."""
        return self.file.search_paths()

    def find(self) -> Path | None:
        return self.file.find_or_none()

    def spec(self) -> str:
        """The `open_clip:ARCH:PATH` it stands for; EncoderUnavailable when no place holds the file."""
        found = self.find()
        if found is None:
            raise EncoderUnavailable(self.missing())
        return f"open_clip:{self.arch}:{found}"

    def missing(self, option: str | None = None) -> str:
        """One line: where it looked, the variable, the open_clip:ARCH:PATH form, how to get the file."""
        looked = " and ".join(f"{how} ({p})" if how.startswith("$") else str(p) for how, p in self.places())
        unset = "" if os.environ.get(self.env) else f" (${self.env} is unset)"
        direct = f"--set {option}=open_clip:{self.arch}:PATH" if option else f"open_clip:{self.arch}:PATH"
        return (f"encoder {self.name}: no open_clip {self.arch} weights file at {looked}{unset}; set "
                f"${self.env}=FILE, save it as {self.places()[-2][1]}, or name the file with {direct}; "
                f"get it on a connected machine: {self.file.url}")


NAMED: dict[str, NamedEncoder] = {key: NamedEncoder(WEIGHTS[key]) for key in NAMED_ENCODERS}


def _demo_dir() -> Path:
    from cm3leon.checkpoint import ALIASES

    return Path(ALIASES["demo"])


def _is_demo_bundle(bundle: Any) -> bool:
    path = getattr(bundle, "path", None)
    return path is not None and Path(path).resolve() == _demo_dir().resolve()


def canonical_spec(name: str) -> str:
    """The `load_encoder` spec of a name other than model/demo (a bare CLIP folder -> hf-clip:FOLDER,
    a named default -> open_clip:ARCH:FOUND_PATH, or EncoderUnavailable when its file is missing)."""
    if name in NAMED:
        return NAMED[name].spec()
    if ":" not in name and Path(name).expanduser().is_dir():
        return f"hf-clip:{Path(name).expanduser()}"
    return name


def _load_cm3leon(spec: str, device: str) -> Any:
    try:
        from cm3leon.encoder import load_encoder  # through sys.modules, so tests can stand in a module
    except ModuleNotFoundError as e:
        if e.name != "cm3leon.encoder":
            raise
        why = "needs cm3leon.encoder, which this install does not have"
        raise EncoderUnavailable(f"encoder {spec!r} {why}", why) from None
    try:
        return load_encoder(spec, device=device)
    except FileNotFoundError as e:
        raise EncoderUnavailable(str(e)) from None
    except (ValueError, ImportError, OSError) as e:
        raise EncoderUnavailable(f"encoder {spec!r}: {e}", str(e)) from None


def resolve_encoder(name: str | None, *, model_bundle: Any = None, device: str = "cpu",
                    flag: str = "the encoder option") -> Any:
    """The DualEncoder named `name` (see the module docstring).

    `flag` names the setting the user changes to pick another encoder (e.g. "--set
    metrics.clip_score.encoder=..." or "--encoder"); errors cite it.
    """
    if not name:
        raise EncoderUnavailable(f"no encoder named; set {flag} to one of: {KINDS}")
    if name == "model":
        enc = getattr(model_bundle, "encoder", None)
        if enc is None:
            what = "no model was given" if model_bundle is None else "the evaluated checkpoint has no dual encoder"
            raise EncoderUnavailable(f"encoder 'model': {what} ({DEMO_ENCODER_FILE}); set {flag} to another "
                                     f"encoder ({KINDS})")
        return enc
    if name == "demo":
        if _is_demo_bundle(model_bundle) and getattr(model_bundle, "encoder", None) is not None:
            return model_bundle.encoder  # the demo model evaluating itself: the same weights, loaded once
        path = _demo_dir() / DEMO_ENCODER_FILE
        if not path.is_file():
            raise EncoderUnavailable(f"the demo encoder is missing ({path}); build the demo with `cm3eval train demo`")
        from cm3leon.encoder import NativeDualEncoder

        return NativeDualEncoder.load(path, device=device).eval()
    if name in NAMED and NAMED[name].find() is None:
        raise EncoderUnavailable(f"{NAMED[name].missing()}; or pick another encoder with {flag}")
    return _load_cm3leon(canonical_spec(name), device)


@dataclass
class EncoderCache:
    """Resolved encoders by name, so retrieval, reranking and every metric of a run share one copy."""

    model_bundle: Any = None
    device: str = "cpu"
    _loaded: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str | None, *, flag: str = "the encoder option") -> Any:
        key = name or ""
        if key not in self._loaded:
            self._loaded[key] = resolve_encoder(name, model_bundle=self.model_bundle, device=self.device, flag=flag)
        return self._loaded[key]

    def put(self, name: str, encoder: Any) -> None:
        """Register an already-loaded encoder under a name (a command that resolved it itself)."""
        self._loaded[name] = encoder


def required_encoder_files(name: str | None, option: str | None = None) -> list[tuple[Path, str]]:
    """(path, what) of the local files the encoder `name` needs; "model" needs none here (the plan
    checks the checkpoint itself). An unparsable name is an EncoderUnavailable.

    A named default's file is searched: its path is the place that holds it, else the first place
    looked, and `what` then carries the whole search (places, variable, the open_clip:ARCH:PATH
    form naming `option`, how to get the file), so the plan's one line says all of it."""
    if not name or name == "model":
        return []
    if name == "demo":
        return [(_demo_dir() / DEMO_ENCODER_FILE, "the demo dual encoder")]
    if name in NAMED:
        named = NAMED[name]
        found = named.find()
        if found is not None:
            return [(found, f"open_clip {named.arch} weights of encoder {name}")]
        return [(named.places()[0][1], f"the weights of encoder {name} [{named.missing(option)}]")]
    spec = canonical_spec(name)
    kind, _, rest = spec.partition(":")
    if kind == "open_clip":
        arch, _, path = rest.partition(":")
        if arch and path:
            _need_module("open_clip", name, "pip install 'cm3eval[clip]' (or open_clip_torch)")
            return [(Path(path).expanduser(), f"open_clip {arch} weights")]
    elif kind == "hf-clip" and rest:
        _need_module("transformers", name, "pip install transformers")
        return [(Path(rest).expanduser() / "config.json", "a transformers CLIP folder")]
    elif kind == "native" and rest:
        return [(Path(rest).expanduser(), "a native cm3leon dual encoder")]
    raise EncoderUnavailable(f"encoder {name!r}: not a known kind (expected {KINDS})")


def _need_module(module: str, name: str, how: str) -> None:
    """A back-end that is not installed is known before any model loads (else the run fails when
    the first metric or rerank resolves the encoder)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EncoderUnavailable(f"encoder {name!r} needs the {module} package, which is not installed; {how}")
