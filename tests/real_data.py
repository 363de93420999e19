"""Where the tests find real public data: the copies vendored under tests/data/.

The vendored set is small (see tests/data/LICENSES.md) and is what every test uses, so a plain
clone and CI (which also has ../shared/data beside the clone) run the same cases. A test that
needs more than the vendored files asks `shared(...)`, which skips with the reason when the
steering repo's data folder is not beside the clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VENDORED = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("CM3EVAL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

COCO_MINI = VENDORED / "coco-mini"                 # val2017/*.jpg + annotations/captions_val2017.json
COCO_MINI_IMAGES = COCO_MINI / "val2017"
COCO_MINI_CAPTIONS = COCO_MINI / "annotations" / "captions_val2017.json"
COCO_CAPTIONS_VAL2017 = VENDORED / "coco" / "annotations" / "captions_val2017.json"
COCO_FAKECAP_RESULTS = VENDORED / "coco" / "results" / "captions_val2014_fakecap_results.json"
NLG_EVAL = VENDORED / "nlg-eval"


def shared(rel: str) -> Path:
    """A path under ../shared/data that the vendored copies do not cover; skips when absent."""
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"needs {rel} from the steering repo's shared/data (looked in {SHARED}; "
                    "set CM3EVAL_SHARED_DATA to its folder)")
    return path
