"""Scoring: a task's `metrics:` block -> calls into evals/metrics, one adapter per metric key.

Each adapter takes the finished (non-failed) sample records of a task and the metric's options
and returns MetricResults keyed by the names metrics.json uses ("FID", "CIDEr", "accuracy",
"L1", ...). Options are checked against each adapter's OPTIONS (unknown -> one-line error).

Metrics that need weights this machine does not have (Inception, DINO, a CLIP checkpoint) are
left out with a note in metrics.json and a warning, never replaced by another number; the
finished samples stay, so scoring again after providing the weights is cheap.

Encoders for CLIP-style metrics are named by a string: "model" (the evaluated checkpoint's own
dual encoder), "demo" (the demo checkpoint's encoder, cm3leon/zoo/shapes-demo), or a
cm3leon.encoder.load_encoder spec ("open_clip:ViT-B-32:/path/weights", "hf-clip:DIR", "native:PATH").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from evals.metrics.result import MetricResult
from tasks.spec import TaskSpec

log = logging.getLogger("cm3eval")


class MetricUnavailable(RuntimeError):
    """The metric cannot run here (missing weights); reported as a note, not a number."""


@dataclass
class Context:
    spec: TaskSpec
    records: list[dict[str, Any]]
    task_dir: Path
    data_root: Path
    predictor: Any
    device: str
    seed: int
    _encoders: dict[str, Any] = field(default_factory=dict)

    # --- inputs
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.records]

    def output_images(self) -> list[Image.Image]:
        return [_open(self.task_dir / r["images"]["output"]) for r in self.records]

    def data_images(self, role: str) -> list[Path]:
        return [self.data_root / r["input"][role] for r in self.records]

    def encoder(self, name: str | None):
        if not name:
            raise MetricUnavailable("no encoder configured (set the metric's `encoder` option: model, demo or "
                                    "open_clip:ARCH:PATH / hf-clip:DIR / native:PATH)")
        if name not in self._encoders:
            self._encoders[name] = _load_encoder(name, self.predictor, self.device)
        return self._encoders[name]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _load_encoder(name: str, predictor: Any, device: str):
    if name == "model":
        enc = getattr(predictor, "encoder", None)
        if enc is None:
            raise MetricUnavailable("the evaluated model has no dual encoder (encoder: model)")
        return enc
    if name == "demo":
        enc = getattr(predictor, "demo_encoder", None)  # the demo model evaluating itself
        if enc is not None:
            return enc
        from cm3leon.checkpoint import ALIASES

        path = ALIASES["demo"] / "encoder.safetensors"
        if not path.is_file():
            raise MetricUnavailable(f"the demo encoder is missing ({path}); build the demo with `cm3eval train demo`")
        from cm3leon.encoder import NativeDualEncoder

        return NativeDualEncoder.load(path, device=device).eval()
    from cm3leon.encoder import load_encoder

    try:
        return load_encoder(name, device=device)
    except FileNotFoundError as e:
        raise MetricUnavailable(str(e)) from None


# ----------------------------------------------------------------------------- adapters
Adapter = Callable[[Context, dict[str, Any]], dict[str, MetricResult]]


def _fid(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """FID (Inception, pytorch-fid protocol by default) or FD-<encoder> in an encoder's space."""
    from evals.metrics import fid as fid_lib

    gen = ctx.output_images()
    space = opts["feature_space"]
    if space == "inception":
        try:
            ext = fid_lib.inception_extractor(opts["weights"], ctx.device)
        except FileNotFoundError as e:
            raise MetricUnavailable(f"FID needs the Inception weights: {e}") from None
        if opts["reference_stats"]:
            ref: Any = ctx.data_root / opts["reference_stats"] if not Path(opts["reference_stats"]).is_absolute() \
                else Path(opts["reference_stats"])
        else:
            ref = fid_lib.reference_stats(ctx.data_images("image"), opts["cache_dir"], protocol=opts["protocol"],
                                          resolution=opts["resolution"], feature_extractor=ext,
                                          device=ctx.device, batch_size=opts["batch_size"])
        res = fid_lib.compute_fid(gen, ref, protocol=opts["protocol"], feature_extractor=ext, device=ctx.device,
                                  batch_size=opts["batch_size"], resolution=opts["resolution"],
                                  bootstrap=opts["bootstrap"], seed=ctx.seed)
    else:  # FD in a dual encoder's space: features from the encoder, then the same Fréchet distance
        enc = ctx.encoder(space)
        refs = [_open(p) for p in ctx.data_images("image")]
        if opts["resolution"]:
            gen, refs = [_square(g, opts["resolution"]) for g in gen], [_square(r, opts["resolution"]) for r in refs]
        g = enc.encode_image(gen).double().numpy()
        r = enc.encode_image(refs).double().numpy()
        label = "demo" if space == "demo" else str(getattr(enc, "name", "encoder"))
        res = fid_lib.compute_fid(g, r, extractor_name=label, bootstrap=opts["bootstrap"], seed=ctx.seed)
        res.extra["encoder"] = str(enc.fingerprint()) if hasattr(enc, "fingerprint") else space
    res.extra.setdefault("resolution", opts["resolution"])
    return {res.name: res}


def _square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _clip_score(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_score

    enc = ctx.encoder(opts["encoder"])
    res = clip_score(ctx.output_images(), [r["input"]["text"] for r in ctx.records], enc, scale=opts["scale"],
                     seed=ctx.seed)
    return {_named(res, opts).name: res}


def _named(res: MetricResult, opts: dict[str, Any]) -> MetricResult:
    if opts.get("name"):
        res.name = str(opts["name"])
    return res


def _rank_accuracy(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import t2i_rank_accuracy

    enc = ctx.encoder(opts["encoder"])
    n = len(ctx.records)
    pool = min(int(opts["pool_size"]), n)
    if pool < 2:
        raise MetricUnavailable(f"rank accuracy needs at least 2 samples, got {n}")
    ks = [k for k in opts["ks"] if k <= pool]
    out = t2i_rank_accuracy([r["input"]["text"] for r in ctx.records], ctx.output_images(), enc,
                            pool_size=pool, ks=ks, seed=ctx.seed)
    return out


def _captioning(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.captioning import caption_metrics

    preds = {r["id"]: r["prediction"] for r in ctx.records}
    refs = {r["id"]: list(r["references"]) for r in ctx.records}
    res = caption_metrics(preds, refs, tokenize=opts["tokenize"], spice=opts["spice"], seed=ctx.seed)
    keep = opts["report"]
    return {k: v for k, v in res.items() if not keep or k in keep}


def _vqa(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.vqa import vqa_accuracy

    preds = {r["id"]: r["prediction"] for r in ctx.records}
    anns = []
    for r in ctx.records:
        a = {"question_id": r["id"], "answers": [{"answer": x} for x in r["references"]]}
        for key in ("question_type", "answer_type"):
            if (r.get("meta") or {}).get(key) is not None:
                a[key] = r["meta"][key]
        anns.append(a)
    res = vqa_accuracy(preds, anns, seed=ctx.seed)
    res.name = "accuracy"  # the name baselines.csv and the papers use
    return {"accuracy": res}


def _pixel(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.editing import distance_results, pixel_distance_pair

    l1, mse = [], []
    for r in ctx.records:  # streamed pair by pair: the whole test set never sits in memory
        a, b = pixel_distance_pair(_open(ctx.task_dir / r["images"]["output"]), _open(ctx.data_root / r["input"]["target"]))
        l1.append(a)
        mse.append(b)
    out = distance_results(np.asarray(l1), np.asarray(mse), seed=ctx.seed)
    for v in out.values():
        v.extra["turns"] = "all (each turn edited independently from its ground-truth input)"
    return out


def _clip_i(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_i

    enc = ctx.encoder(opts["encoder"])
    targets = [_open(p) for p in ctx.data_images("target")]
    res = clip_i(ctx.output_images(), targets, enc, name=opts["name"], seed=ctx.seed)
    return {res.name: res}


def _clip_t(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_t

    missing = [r["id"] for r in ctx.records if not r["references"]]
    if missing:
        raise MetricUnavailable(f"{len(missing)} samples have no output caption (e.g. {missing[:3]}); give the "
                                "descriptions file with --set dataset.files.descriptions=PATH")
    enc = ctx.encoder(opts["encoder"])
    res = clip_t(ctx.output_images(), [r["references"][0] for r in ctx.records], enc, name=opts["name"],
                 seed=ctx.seed)
    return {res.name: res}


def _dino(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.dino import DinoEncoder
    from evals.metrics.editing import dino_similarity

    try:
        enc = DinoEncoder.load(opts["weights"], ctx.device)
    except FileNotFoundError as e:
        raise MetricUnavailable(f"DINO needs its weights: {e}") from None
    targets = [_open(p) for p in ctx.data_images("target")]
    res = dino_similarity(ctx.output_images(), targets, enc, seed=ctx.seed)
    return {res.name: res}


@dataclass(frozen=True)
class MetricDef:
    fn: Adapter
    kinds: tuple[str, ...]
    options: dict[str, Any]  # option -> default


METRICS: dict[str, MetricDef] = {
    "fid": MetricDef(_fid, ("t2i",), {"feature_space": "inception", "protocol": "pytorch-fid", "resolution": 256,
                                     "weights": None, "reference_stats": None, "cache_dir": None,
                                     "batch_size": 50, "bootstrap": 0}),
    "clip_score": MetricDef(_clip_score, ("t2i",), {"encoder": "model", "scale": 2.5, "name": None}),
    "rank_accuracy": MetricDef(_rank_accuracy, ("t2i",), {"encoder": "demo", "pool_size": 100, "ks": [1, 5, 10]}),
    "captioning": MetricDef(_captioning, ("caption",), {"tokenize": "ptb", "spice": False, "report": None}),
    "vqa_accuracy": MetricDef(_vqa, ("vqa",), {}),
    "pixel_distances": MetricDef(_pixel, ("edit",), {}),
    "clip_i": MetricDef(_clip_i, ("edit",), {"encoder": None, "name": "CLIP-I"}),
    "clip_t": MetricDef(_clip_t, ("edit",), {"encoder": None, "name": "CLIP-T"}),
    "dino": MetricDef(_dino, ("edit",), {"weights": None}),
}


def check_metrics(spec: TaskSpec, src: str) -> None:
    """Metric names, kinds and option names of a spec (one-line errors naming src and the field)."""
    from tasks.spec import SpecError

    for name, opts in spec.metrics.items():
        if name not in METRICS:
            raise SpecError(f"{src}: metrics.{name}: unknown metric (known: {', '.join(METRICS)})")
        d = METRICS[name]
        if spec.kind not in d.kinds:
            raise SpecError(f"{src}: metrics.{name}: applies to {'/'.join(d.kinds)} tasks, not {spec.kind}")
        for o in opts:
            if o not in d.options:
                known = ", ".join(d.options) or "none"
                raise SpecError(f"{src}: metrics.{name}.{o}: unknown option (known: {known})")


@dataclass
class Scored:
    metrics: dict[str, MetricResult]
    per_sample: dict[str, dict[str, float]]
    failures: list[dict[str, str]]
    notes: list[str]


def prepare(specs: list[TaskSpec]) -> None:
    """Called when a run starts: slow metric back-ends start loading while the model generates
    (the METEOR jar spends ~10 s on its paraphrase tables before its first answer)."""
    for spec in specs:
        if "captioning" not in spec.metrics:
            continue
        report = {**METRICS["captioning"].options, **spec.metrics["captioning"]}["report"]
        if report and "METEOR" not in report:
            continue
        from evals.metrics.captioning import prestart_meteor

        try:
            prestart_meteor()
        except RuntimeError as e:  # no java: scoring reports it where it belongs
            log.debug("METEOR prestart skipped: %s", e)
        return


def score_task(spec: TaskSpec, records: list[dict[str, Any]], *, task_dir: Path, data_root: Path,
               predictor: Any = None, device: str = "cpu") -> Scored:
    check_metrics(spec, f"task {spec.name}")
    ctx = Context(spec, records, Path(task_dir), Path(data_root), predictor, device, spec.seed)
    metrics: dict[str, MetricResult] = {}
    per_sample: dict[str, dict[str, float]] = {str(r["id"]): {} for r in records}
    notes: list[str] = []
    if not records:
        notes.append("no sample finished without a failure; nothing to score")
        return Scored(metrics, per_sample, [], notes)
    ids = ctx.ids()
    for key, user_opts in spec.metrics.items():
        d = METRICS[key]
        opts = {**d.options, **user_opts}
        try:
            results = d.fn(ctx, opts)
        except MetricUnavailable as e:
            msg = f"{key}: not computed: {e}"
            log.warning("%s: %s", spec.name, msg)
            notes.append(msg)
            continue
        for name, res in results.items():
            metrics[name] = res
            ps = res.per_sample
            if ps is not None and len(ps) == len(ids):
                for i, v in zip(ids, np.asarray(ps, dtype=np.float64).tolist()):
                    per_sample[i][name] = v
    return Scored(metrics, per_sample, [], notes)
