"""The predictor protocol: what the engine hands a predictor and what it expects back.

The predictor is any object with `fingerprint: str` and `predict(batch: Batch) -> list[dict]`
(one dict per item, keys in RESULT_KEYS). evals/predictor.py is the real one, built on a
cm3leon checkpoint; the tests inject a deterministic one (tests/fixtures.py). Optional:
`task_fingerprint(spec) -> dict` (extra identities that change results: a retrieval bank, a
reranker) and `model_path` (the checkpoint folder, whose files the engine hashes in full).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from cm3leon.errors import Cm3evalError
from tasks.loaders import Sample
from tasks.spec import TaskSpec

# candidates: images saved as full PNGs (--save-candidates); candidate_images: the ones decoded anyway
# (for a CLIP reranker), of which the report's first samples keep small thumbnails (evals/records.py)
RESULT_KEYS = frozenset({"prediction", "prompt", "images", "candidates", "candidate_images", "scores", "best",
                         "retrieved", "failure", "extra"})


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


class FatalPredictorError(Cm3evalError):
    """Raised by a predictor when no retry can help (no VQ decoder, missing weights, a bank that
    is not there): the run stops with this one line instead of failing every sample alike."""


class PredictorProtocolError(FatalPredictorError):
    """The predictor broke the protocol (unknown keys, wrong result count): a bug, never retried."""


def is_fatal(e: BaseException) -> bool:
    """Whether a predict() error stops the run. A FatalPredictorError does; so does any other
    Cm3evalError that is not also a ValueError / RuntimeError (a setup error). Everything else
    (a bad sample: DataError, a too-long prompt, non-finite logits, a CUDA OOM) is retried alone
    and then recorded as that sample's failure."""
    if isinstance(e, FatalPredictorError):
        return True
    return isinstance(e, Cm3evalError) and not isinstance(e, (ValueError, RuntimeError))


def check_output(spec: TaskSpec, out: Any) -> dict[str, Any]:
    """One predictor result, checked: a dict with known keys and the output the task needs
    (an "output" image, or a text prediction). A missing output is this sample's failure."""
    if not isinstance(out, dict):
        return {"failure": f"predictor returned {type(out).__name__}, expected a dict"}
    unknown = set(out) - RESULT_KEYS
    if unknown:
        raise PredictorProtocolError(f"predictor returned unknown keys {sorted(unknown)} "
                                     f"(allowed: {sorted(RESULT_KEYS)})")
    if out.get("failure") is not None:
        return out
    if spec.output_modality == "image":
        if not isinstance((out.get("images") or {}).get("output"), Image.Image):
            return {"failure": "predictor returned no output image"}
    elif not isinstance(out.get("prediction"), str):
        return {"failure": "predictor returned no text prediction"}
    return out
