"""Prompt-layout cases for the shipped demo model, and the generator of their golden streams.

The golden file (tests/golden_demo_prompts.json) holds the token streams that the predictor
BEFORE the families refactor (evals/predict.py of the first-edition layout) built for these
cases on the shipped demo tokenizer; tests/test_prompts.py checks the new code builds the same.
Regenerate from a checkout of the old code (it must be first on sys.path):

    PYTHONPATH=/path/to/old/checkout python tests/demo_prompt_cases.py > tests/golden_demo_prompts.json

Images are given as VQ codes, so the streams depend on the tokenizer only (its hash is recorded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

CASES: list[dict[str, Any]] = [
    {"task": "shapes-fid", "text": "a red circle above a blue square", "k_shot": 1, "retrieved": 2},
    {"task": "shapes-fid", "text": "two green triangles", "generation": {"cfg_scale": 1.0}},
    {"task": "shapes-caption", "k_shot": 1, "retrieved": 1},
    {"task": "shapes-caption", "prompt": {"template": "A photo of"}, "k_shot": 2},
    {"task": "shapes-vqa", "text": "What color is the circle?", "k_shot": 1, "retrieved": 1},
    {"task": "shapes-vqa", "text": "How many shapes are there?", "prompt": {"shot_template": None}, "k_shot": 2},
    {"task": "shapes-edit", "text": "make the circle green", "retrieved": 1},
    {"task": "shapes-edit", "text": "remove the square", "generation": {"image_cfg_scale": None}},
]
SHOT_TEXTS = ["a blue circle", "What shape is red?", "a yellow square"]
SHOT_REFS = [["a blue circle on the left", "blue circle"], ["circle", "circle", "square"], ["a yellow square"]]


def codes(seed: int, n: int, k: int) -> list[int]:
    """Deterministic pseudo-random codes (no torch RNG: the same on every platform)."""
    x, out = seed * 2654435761 % 2**32 or 1, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out.append(x % k)
    return out


def spec_for(case: dict[str, Any]):
    import tasks

    spec = tasks.get(case["task"])
    prompt = dataclasses.replace(spec.prompt, **case.get("prompt", {}), k_shot=case.get("k_shot", 0))
    gen = dataclasses.replace(spec.generation, **case.get("generation", {}))
    return dataclasses.replace(spec, prompt=prompt, generation=gen)


def inputs(case: dict[str, Any], i: int, cfg) -> dict[str, Any]:
    """The case's sample, shots, images (as codes) and retrieved documents, as plain data."""
    n, k = cfg.image_seq_len, cfg.image_codebook_size
    kind = spec_for(case).kind
    shots = [{"text": SHOT_TEXTS[j], "references": SHOT_REFS[j], "codes": codes(100 * i + j + 1, n, k)}
             for j in range(case.get("k_shot", 0))]
    retrieved = [{"text": f"retrieved document {j}", "codes": codes(1000 * i + j + 7, n, k)}
                 for j in range(case.get("retrieved", 0))]
    return {"text": case.get("text", ""), "seed": 17 + i, "shots": shots, "retrieved": retrieved,
            "image": None if kind == "t2i" else codes(i + 3, n, k)}


def retrieved_docs(kind: str, retrieved: list[dict[str, Any]]):
    """Retrieved documents as the old predictor laid them out (caption first for t2i/edit)."""
    import torch

    from cm3leon.document import Document

    docs = []
    for d in retrieved:
        img = torch.tensor(d["codes"])
        docs.append(Document([d["text"], img] if kind in ("t2i", "edit") else [img, d["text"]]))
    return docs


def sample_and_images(case: dict[str, Any], data: dict[str, Any]):
    import torch

    from tasks.loaders import Sample

    kind = spec_for(case).kind
    shots = [Sample(id=f"shot{j}", kind=kind, text=s["text"] if kind == "vqa" else
                    (s["text"] if kind == "t2i" else ""), references=s["references"])
             for j, s in enumerate(data["shots"])]
    sample = Sample(id="q", kind=kind, text=data["text"], seed=data["seed"], shots=shots)
    images = {f"shot:{j}": torch.tensor(s["codes"]) for j, s in enumerate(data["shots"])}
    if data["image"] is not None:
        images["image"] = torch.tensor(data["image"])
    return sample, images


def tokenizer_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Build the golden streams with the OLD predictor (first on sys.path)."""
    from cm3leon import checkpoint
    from evals.protocol import Item
    from evals.predict import ModelPredictor, sampling_config

    bundle = checkpoint.load("demo")
    pred = ModelPredictor(bundle)
    out = {"tokenizer_sha256": tokenizer_hash(Path(bundle.path) / "tokenizer.json"), "cases": []}
    for i, case in enumerate(CASES):
        spec = spec_for(case)
        data = inputs(case, i, bundle.config)
        sample, images = sample_and_images(case, data)
        req, text, _ = pred._request(spec, Item(sample=sample, images=images), sampling_config(spec),
                                     (retrieved_docs(spec.kind, data["retrieved"]), []))
        out["cases"].append({"case": case, "inputs": data, "text": text, "prompt": req.prompt,
                             "uncond": req.uncond_prompt, "image_cond": req.image_cond_prompt})
    json.dump(out, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
