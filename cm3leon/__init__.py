"""cm3leon: CM3leon-style multimodal decoders (native CM3leon, Chameleon / Anole) and their sampler.

The public API (everything else is reachable through the submodules):

    import cm3leon
    bundle = cm3leon.load("demo")                       # or a folder: native, HF Chameleon, Meta's release
    info = cm3leon.inspect("/models/anole-7b")          # what a checkpoint can do, without reading weights
    codec = cm3leon.DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config)
    sampler = cm3leon.Sampler(bundle.model, bundle.config)
    out = sampler.generate([cm3leon.GenerationRequest(prompt_ids, "text", seed=0)], cm3leon.SamplingConfig(greedy=True))

Names are imported on first use so `import cm3leon` stays light (no torch until a name needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint", "inspect": "checkpoint", "ModelBundle": "checkpoint",
    "CheckpointInfo": "checkpoint", "ModelConfig": "config", "Sampler": "sampling", "SamplingConfig": "sampling_config",
    "GenerationRequest": "sampling", "DocumentCodec": "document", "Cm3evalError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cm3leon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
