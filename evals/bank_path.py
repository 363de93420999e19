"""Where a `retrieval.bank` value points: the checkpoint's own bank, a folder, or a folder under the
task's data root.

- "model": the checkpoint's `bank/` folder (CM3leon-native checkpoints only);
- "data:REL": REL under the data root (--data-root / $CM3EVAL_DATA_ROOT), so a registry default can
  name a bank that lives beside the data it was built from, on every machine, e.g.
  `data:banks/coco-train2014-clip-vit-b-32`, built by
  `cm3eval bank build --coco-root ROOT --encoder clip-vit-b-32 --out ROOT/banks/coco-train2014-clip-vit-b-32`;
- anything else: a folder path (~ expanded).

The plan phase and the predictor resolve a value through `resolve_bank` only, so they never
disagree on which folder a run reads.
"""

from __future__ import annotations

from pathlib import Path

from cm3leon.errors import Cm3evalError

MODEL = "model"
DATA_PREFIX = "data:"
# The CM3leon paper's retrieval bank: COCO train2014 documents embedded with a frozen CLIP ViT-B/32
COCO_BANK = "banks/coco-train2014-clip-vit-b-32"


class BankPathError(Cm3evalError, ValueError):
    """A bank value that cannot be resolved here (a data-relative bank without a data root)."""


def is_model_bank(value: str) -> bool:
    return value == MODEL


def is_data_relative(value: str) -> bool:
    return value.startswith(DATA_PREFIX)


def resolve_bank(value: str, data_root: Path | None) -> Path | None:
    """The folder a bank value names; None for "model" (the checkpoint's own, known after loading)."""
    if is_model_bank(value):
        return None
    if is_data_relative(value):
        rel = value[len(DATA_PREFIX):].strip("/")
        if not rel:
            raise BankPathError(f"retrieval.bank {value}: expected data:RELATIVE/FOLDER under the data root")
        if data_root is None:
            raise BankPathError(f"retrieval.bank {value} is relative to the data root and none is known; pass "
                                "--data-root DIR (or set $CM3EVAL_DATA_ROOT)")
        return Path(data_root).expanduser() / rel
    return Path(value).expanduser()


def build_command(value: str, path: Path) -> str:
    """The command that builds the bank a value names (what a missing-bank message tells the user)."""
    encoder = "clip-vit-b-32" if path.name.endswith("clip-vit-b-32") else "ENCODER"
    root = Path("COCO_ROOT")
    if is_data_relative(value):  # the data root: the path with the value's relative parts taken off
        depth = len(Path(value[len(DATA_PREFIX):].strip("/")).parts)
        root = path.parents[depth - 1] if depth <= len(path.parents) else root
    return f"cm3eval bank build --coco-root {root} --encoder {encoder} --out {path}"


def missing_bank(task: str, value: str, path: Path) -> str:
    """One line: which folder is missing, how to build it, the option to point elsewhere."""
    return (f"{task}: retrieval.bank {value}: no such folder {path}; build it with `{build_command(value, path)}`, "
            "or pass --set retrieval.bank=DIR (a folder from `cm3eval bank build`), or turn retrieval off with "
            "--retrieval-k 0")
