"""Test fixtures in the official layouts, and a deterministic predictor for engine tests.

Writers (real COCO val2017 images and captions, vendored under tests/data/coco-mini):
  write_mini_coco(root)       annotations/captions_val2014.json, annotations/dataset_coco.json
                              (Karpathy), val2014/<file>.jpg, train2014/ (k-shot support)
  write_mini_vqav2(root)      annotations/v2_OpenEnded_mscoco_{val,train}2014_questions.json,
                              annotations/v2_mscoco_{val,train}2014_annotations.json,
                              {val,train}2014/COCO_<subtype>_<id:012d>.jpg
  write_mini_vizwiz(root), write_mini_textvqa(root), write_mini_magicbrush(root)
  corrupt(path)               truncate an image file so that decoding fails

EchoPredictor: the engine-test predictor. Its outputs are a pure function of (sample id, seed),
never of batch composition, so any batch size or rank count gives identical results, exactly
the property the real sampler has. It can be slowed down ($CM3EVAL_TEST_DELAY seconds per
batch), held until a file exists ($CM3EVAL_TEST_WAIT_FOR), log every predicted sample id
($CM3EVAL_TEST_LOG), and fail on chosen ids
($CM3EVAL_TEST_FAIL_IDS) — the hooks the kill -9 / resume tests need. The CLI takes it as an
injected factory: `evals.cli.main(argv, predictor_factory=make_echo)`; subprocess tests run
ECHO_MAIN (`python -c ECHO_MAIN run ...`, tests/ on sys.path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from real_data import COCO_MINI  # noqa: E402  (the vendored real COCO val2017 images and captions)
TESTS = Path(__file__).resolve().parent
# `python -c ECHO_MAIN run ...`: the CLI with the echo predictor injected, in a fresh process
ECHO_MAIN = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from evals.cli import main; "
             "from fixtures import make_echo; sys.exit(main(sys.argv[1:], predictor_factory=make_echo))")


# ----------------------------------------------------------------------------- real images
def coco_mini_items(n: int) -> list[tuple[int, Path | None, list[str]]]:
    """(image id, real image file or None, its real captions) for the first n coco-mini images."""
    ann_file = COCO_MINI / "annotations" / "captions_val2017.json"
    if ann_file.is_file():
        data = json.loads(ann_file.read_text())
        caps: dict[int, list[str]] = {}
        for a in sorted(data["annotations"], key=lambda a: a["id"]):
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        imgs = sorted(data["images"], key=lambda im: im["id"])[:n]
        return [(im["id"], COCO_MINI / "val2017" / im["file_name"], caps[im["id"]]) for im in imgs]
    # no shared data: synthetic stand-ins (the layouts are what these fixtures test)
    return [(1000 + i, None, [f"a picture number {i}", f"an image of thing {i}"]) for i in range(n)]


def _put_image(src: Path | None, dst: Path, seed: int, size: int = 64) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src is not None and src.is_file():
        with Image.open(src) as im:  # downscaled copies keep the tests fast
            im = im.convert("RGB")
            im.thumbnail((96, 96))
            im.save(dst, format="JPEG" if dst.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=90)
        return
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(dst)


def corrupt(path: Path) -> None:
    """Keep only the first bytes: the header parses, decoding fails."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: max(20, len(data) // 10)])


# ----------------------------------------------------------------------------- COCO
def write_mini_coco(root: Path, n: int = 6, n_train: int = 3) -> Path:
    """COCO captions (val2014 names) + a Karpathy split file: first n images test, next n_train train."""
    root = Path(root)
    items = coco_mini_items(n + n_train)
    images, anns, karpathy = [], [], []
    for k, (image_id, src, caps) in enumerate(items):
        split = "test" if k < n else "train"
        folder = "val2014" if split == "test" else "train2014"
        name = f"COCO_{folder}_{image_id:012d}.jpg"
        _put_image(src, root / folder / name, image_id)
        if split == "test":
            images.append({"id": image_id, "file_name": name, "height": 96, "width": 96, "license": 1})
            for j, c in enumerate(caps):
                anns.append({"id": image_id * 10 + j, "image_id": image_id, "caption": c})
        karpathy.append({"filepath": folder, "filename": name, "imgid": k, "split": split, "cocoid": image_id,
                         "sentids": [image_id * 10 + j for j in range(len(caps))],
                         "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k,
                                        "sentid": image_id * 10 + j} for j, c in enumerate(caps)]})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": anns}))
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": karpathy}))
    return root


# ----------------------------------------------------------------------------- VQA family
_QUESTIONS = [
    ("what is in the picture?", "what is", "other"),
    ("is there a person?", "is there a", "yes/no"),
    ("how many animals are there?", "how many", "number"),
]


def _answers(image_id: int, q: int) -> list[str]:
    rng = np.random.default_rng(image_id * 7 + q)
    pools = [["food", "dog", "plane", "bus"], ["yes", "no"], ["2", "1", "two", "3"]]
    pool = pools[q % 3]
    main = pool[int(rng.integers(len(pool)))]
    return [main if rng.random() > 0.25 else pool[int(rng.integers(len(pool)))] for _ in range(10)]


def write_mini_vqav2(root: Path, n_images: int = 4, per_image: int = 2, prefix: str = "v2_",
                     questions_name: str = "OpenEnded_mscoco_{s}_questions.json",
                     annotations_name: str = "mscoco_{s}_annotations.json") -> Path:
    """VQAv2 val2014 (n_images x per_image questions) and train2014 (support) in the official layout."""
    root = Path(root)
    items = coco_mini_items(n_images * 2)
    for subtype, chunk in (("val2014", items[:n_images]), ("train2014", items[n_images:])):
        questions, annotations = [], []
        for image_id, src, _ in chunk:
            _put_image(src, root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
            for q in range(per_image):
                text, qtype, atype = _QUESTIONS[q % len(_QUESTIONS)]
                qid = image_id * 1000 + q
                answers = _answers(image_id, q)
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                                    "answer_type": atype, "multiple_choice_answer": max(set(answers), key=answers.count),
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, a in enumerate(answers)]})
        head = {"info": {}, "license": {}, "data_subtype": subtype, "data_type": "mscoco"}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / (prefix + questions_name.format(s=subtype))).write_text(json.dumps(
            {**head, "task_type": "Open-Ended", "questions": questions}))
        (root / "annotations" / (prefix + annotations_name.format(s=subtype))).write_text(json.dumps(
            {**head, "annotations": annotations}))
    return root


def write_mini_okvqa(root: Path, n_images: int = 3) -> Path:
    return write_mini_vqav2(root, n_images, 1, prefix="")


def write_mini_vizwiz(root: Path, n: int = 4) -> Path:
    root = Path(root) / "vizwiz"
    items = coco_mini_items(n)
    anns = []
    for k, (image_id, src, _) in enumerate(items):
        name = f"VizWiz_val_{k:08d}.jpg"
        _put_image(src, root / "val" / name, image_id)
        answers = _answers(image_id, k)
        anns.append({"image": name, "question": "What is this?", "answer_type": "other", "answerable": 1,
                     "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "val.json").write_text(json.dumps(anns))
    return root.parent


def write_mini_textvqa(root: Path, n: int = 3) -> Path:
    root = Path(root) / "textvqa"
    items = coco_mini_items(n)
    data = []
    for k, (image_id, src, _) in enumerate(items):
        hex_id = hashlib.md5(str(image_id).encode()).hexdigest()[:16]
        _put_image(src, root / "train_images" / f"{hex_id}.jpg", image_id)
        data.append({"question": "what does the sign say?", "image_id": hex_id, "image_classes": [],
                     "answers": _answers(image_id, 0), "question_id": 34600 + k, "set_name": "val"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(
        {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    return root.parent


# ----------------------------------------------------------------------------- MagicBrush
def write_mini_magicbrush(root: Path, n_sessions: int = 3, descriptions: bool = True) -> Path:
    """magicbrush/test/edit_sessions.json, global_descriptions.json, images/<sid>/<sid>-*.png; the
    second session has two turns (turn 2 reads output1)."""
    base = Path(root) / "magicbrush" / "test"
    items = coco_mini_items(n_sessions)
    sessions, descs = {}, {}
    for k, (image_id, src, caps) in enumerate(items):
        sid = str(image_id)
        d = base / "images" / sid
        d.mkdir(parents=True, exist_ok=True)
        if src is not None and src.is_file():
            with Image.open(src) as im:
                img = ImageOps.fit(im.convert("RGB"), (64, 64))
        else:
            img = Image.new("RGB", (64, 64), (40 * k, 100, 200))
        img.save(d / f"{sid}-input.png")
        outs = [ImageOps.mirror(img)] + ([ImageOps.invert(img)] if k == 1 else [])
        turns, desc = [], {f"{sid}-input.png": caps[0]}
        for t, out in enumerate(outs, start=1):
            out.save(d / f"{sid}-output{t}.png")
            inp = f"{sid}-input.png" if t == 1 else f"{sid}-output{t - 1}.png"
            turns.append({"input": inp, "mask": f"{sid}-mask{t}.png", "output": f"{sid}-output{t}.png",
                          "instruction": ["mirror the picture", "invert the colours"][t - 1]})
            desc[f"{sid}-output{t}.png"] = f"{caps[0]} (edited {t})"
        sessions[sid], descs[sid] = turns, desc
    (base / "edit_sessions.json").write_text(json.dumps(sessions))
    if descriptions:
        (base / "global_descriptions.json").write_text(json.dumps(descs))
    return Path(root)


def write_all(root: Path) -> Path:
    write_mini_coco(root)
    write_mini_vqav2(root)
    write_mini_okvqa(root)
    write_mini_vizwiz(root)
    write_mini_textvqa(root)
    write_mini_magicbrush(root)
    return Path(root)


# ----------------------------------------------------------------------------- test predictor
def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class HistogramEncoder:
    """A deterministic 'dual encoder' for tests: images -> colour histogram, texts -> hashed words."""

    name = "hist"
    dim = 24

    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        rows = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float64)
            h = np.concatenate([np.histogram(a[..., c], bins=8, range=(0, 256))[0] for c in range(3)])
            rows.append(h + 1e-3)
        return torch.nn.functional.normalize(torch.tensor(np.array(rows), dtype=torch.float32), dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            v = np.full(self.dim, 1e-3)
            for w in t.lower().split():
                v[_h(w) % self.dim] += 1
            rows.append(v)
        return torch.nn.functional.normalize(torch.tensor(np.array(rows), dtype=torch.float32), dim=1)

    def fingerprint(self) -> str:
        return "hist-v1"


class EchoPredictor:
    """Deterministic per sample (see the module docstring)."""

    def __init__(self, fingerprint: str = "echo-v1", model_path: Path | None = None) -> None:
        self.fingerprint = fingerprint
        self.model_path = model_path  # a folder the engine hashes in full (None: no model files)
        self.encoder = HistogramEncoder()
        self.demo_encoder = self.encoder
        self.calls: list[str] = []
        self.batch_sizes: list[int] = []

    def predict(self, batch) -> list[dict[str, Any]]:
        delay = float(os.environ.get("CM3EVAL_TEST_DELAY", "0") or 0)
        fail = set(filter(None, os.environ.get("CM3EVAL_TEST_FAIL_IDS", "").split(",")))
        log_path = os.environ.get("CM3EVAL_TEST_LOG")
        self.batch_sizes.append(len(batch.items))
        if delay:
            time.sleep(delay)
        gate = os.environ.get("CM3EVAL_TEST_WAIT_FOR")
        while gate and not os.path.exists(gate):  # hold here (the lock held) until the test says go
            time.sleep(0.05)
        bad = [it.sample.id for it in batch.items if it.sample.id in fail]
        if bad:
            raise RuntimeError(f"test failure for sample {bad[0]}")
        outs = []
        for it in batch.items:
            s = it.sample
            self.calls.append(s.id)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(f"{s.id}\n")
            outs.append(self._one(batch.task.kind, s, it.images))
        return outs

    @staticmethod
    def _one(kind: str, s, images: dict[str, Image.Image]) -> dict[str, Any]:
        r = _h(s.id, s.seed)
        if kind == "caption":
            pred = s.references[r % len(s.references)] if r % 3 else "a photo of something"
            return {"prediction": pred, "prompt": ""}
        if kind == "vqa":
            pred = s.references[r % len(s.references)] if r % 4 else "banana"
            return {"prediction": pred, "prompt": s.text}
        if kind == "dialog":  # a score per candidate answer; the best one is the prediction
            scores = np.random.default_rng(r % (1 << 32)).normal(size=len(s.meta["options"])).tolist()
            best = int(np.argmax(scores))
            return {"prediction": s.meta["options"][best], "prompt": s.text, "scores": scores, "best": best}
        if kind == "t2i":
            rng = np.random.default_rng(r % (1 << 32))
            img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            cands = [img, ImageOps.invert(img)]
            return {"prompt": s.text, "images": {"output": img}, "candidates": cands, "scores": [1.0, 0.5], "best": 0}
        src = images["image"]
        out = ImageOps.mirror(src) if r % 2 else src.copy()
        return {"prompt": s.text, "images": {"output": out}}


def make_echo(*args: Any, **kwargs: Any) -> EchoPredictor:
    """The predictor factory the CLI is given in tests (whatever it passes: model, device, ...).
    $CM3EVAL_TEST_MODEL_PATH: a folder the engine hashes as the model's files."""
    pred = EchoPredictor(fingerprint=os.environ.get("CM3EVAL_TEST_FINGERPRINT", "echo-v1"))
    if os.environ.get("CM3EVAL_TEST_MODEL_PATH"):
        pred.model_path = Path(os.environ["CM3EVAL_TEST_MODEL_PATH"])
    return pred


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- engine runs
def spec(name: str, **over):
    """A registry task, with `--set`-style overrides applied."""
    import tasks
    from tasks.spec import apply_overrides

    return apply_overrides(tasks.get(name), over) if over else tasks.get(name)


def run_engine(specs, out, root, predictor=None, **kw):
    """The engine in-process on an echo predictor (or the one given): (results, predictor)."""
    from evals import engine

    predictor = predictor or EchoPredictor()
    opts = engine.RunOptions(out=out, data_root=root, progress=False, **kw)
    return engine.run(specs if isinstance(specs, list) else [specs], predictor, opts), predictor
