"""Scoring: a task's `metrics:` block -> calls into evals/metrics, one adapter per metric key.

`METRICS` is the metric table: for each key its adapter, the task kinds it applies to, its options
(with defaults), the result names it produces and their direction (`higher_is_better`, which
metrics.json records and reports / compare read). Each adapter takes the finished (non-failed)
sample records of a task and the metric's options and returns MetricResults keyed by the names
metrics.json uses ("FID", "CIDEr", "accuracy", "L1", ...). Options are checked against the table
(unknown -> one-line error).

Metrics that need what this machine does not have (Inception / DINO weights, a CLIP checkpoint)
raise `MetricUnavailable`: left out with a note in metrics.json, never replaced by another number;
the finished samples stay, so scoring again after providing the weights is cheap. The plan phase
calls `check_metrics` (names and options; also what `cm3eval show` runs) and `required_files`
(which first runs `check_inputs`: an encoder left unset, a texts file not given, Java or SPICE jars
absent are `MetricInputMissing`, exit 2) so a run is refused before the model loads, not after it
generated everything.

Encoders for CLIP-style metrics are named by a string and resolved by `evals.encoders` ("model",
"demo", "clip-vit-b-32" (the named default), "open_clip:ARCH:PATH", "hf-clip:DIR" or an HF CLIP
folder, "native:PATH"). `cm3eval score
edit` goes through `score_metrics` with the same edit adapters as a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evals import image_scoring, runs, task_scoring
from evals import scoring_inputs as inputs
from evals.metrics.captioning import METRIC_NAMES as _CAPTION_NAMES
from evals.metrics.errors import MetricInputMissing, MetricUnavailable
from evals.metrics.result import MetricResult
from evals.scoring_inputs import Context

__all__ = ["METRICS", "MetricDef", "MetricInputMissing", "MetricUnavailable", "RequiredFile", "Scored", "check_inputs",
           "check_metrics", "higher_is_better", "prepare", "required_files", "score_metrics", "score_task"]

log = logging.getLogger("cm3eval")

Adapter = Callable[[Context, dict[str, Any]], dict[str, MetricResult]]


# ----------------------------------------------------------------------------- adapters
def _fid(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """FID (Inception, pytorch-fid protocol by default) or FD-<encoder> in an encoder's space."""
    from evals.metrics import fid as fid_lib

    space = opts["feature_space"]
    if space != "inception":  # features from the encoder, then the same Fréchet distance
        enc = ctx.encoder(space, "fid", "feature_space")
        g, r = ctx.fd_features(space, enc, opts["resolution"])
        label = "demo" if space == "demo" else str(getattr(enc, "name", "encoder"))
        res = fid_lib.compute_fid(g, r, extractor_name=label, bootstrap=opts["bootstrap"], seed=ctx.seed,
                                  keep_features=True)
        res.extra["encoder"] = str(enc.fingerprint()) if hasattr(enc, "fingerprint") else space
        res.extra.setdefault("resolution", opts["resolution"])
        return {res.name: res}
    try:
        ext = fid_lib.inception_extractor(opts["weights"], ctx.device, opts["protocol"])  # looked up on fid: tests stand one in
    except FileNotFoundError as e:
        raise MetricUnavailable(f"FID needs the Inception weights: {e}") from None
    if opts["reference_stats"]:
        ref: Any = ctx.data_path(opts["reference_stats"])
    else:
        ref = fid_lib.reference_stats(ctx.data_images("image"), opts["cache_dir"], protocol=opts["protocol"],
                                      resolution=opts["resolution"], feature_extractor=ext,
                                      device=ctx.device, batch_size=opts["batch_size"])
    res = fid_lib.compute_fid(ctx.output_paths(), ref, protocol=opts["protocol"], feature_extractor=ext,
                              device=ctx.device, batch_size=opts["batch_size"], resolution=opts["resolution"],
                              bootstrap=opts["bootstrap"], seed=ctx.seed, keep_features=True)
    res.extra.setdefault("resolution", opts["resolution"])
    return {res.name: res}


def _named(res: MetricResult, opts: dict[str, Any]) -> dict[str, MetricResult]:
    if opts.get("name"):
        res.name = str(opts["name"])
    return {res.name: res}


def _clip_score(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_score

    enc = ctx.encoder(opts["encoder"], "clip_score")
    res = clip_score(ctx.image_embeddings(opts["encoder"], enc, "output"),
                     ctx.text_embeddings(opts["encoder"], enc, "prompt"), scale=opts["scale"], seed=ctx.seed)
    return _named(res, opts)


def _rank_accuracy(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import t2i_rank_accuracy

    enc = ctx.encoder(opts["encoder"], "rank_accuracy")
    n = len(ctx.records)
    pool = min(int(opts["pool_size"]), n)
    if pool < 2:
        raise MetricUnavailable(f"rank accuracy needs at least 2 samples, got {n}")
    ks = [k for k in opts["ks"] if k <= pool]
    return t2i_rank_accuracy(ctx.text_embeddings(opts["encoder"], enc, "prompt"),
                             ctx.image_embeddings(opts["encoder"], enc, "output"), pool_size=pool, ks=ks,
                             seed=ctx.seed)


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
    res = vqa_accuracy(preds, anns, seed=ctx.seed, evaluation=opts["evaluation"])
    res.name = "accuracy"  # the name baselines.csv and the papers use
    return {"accuracy": res}


def _pixel(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.editing import distance_results, pixel_distance_pair

    l1, mse = [], []
    for out, target in zip(ctx.output_paths(), ctx.data_images("target")):
        # streamed pair by pair: the whole test set never sits in memory
        a, b = pixel_distance_pair(inputs.open_rgb(out), inputs.open_rgb(target))
        l1.append(a)
        mse.append(b)
    res = distance_results(np.asarray(l1), np.asarray(mse), seed=ctx.seed)
    for v in res.values():
        v.extra["turns"] = "all (each turn edited independently from its ground-truth input)"
    return res


def _clip_i(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_i

    enc = ctx.encoder(opts["encoder"], "clip_i")
    res = clip_i(ctx.image_embeddings(opts["encoder"], enc, "output"),
                 ctx.image_embeddings(opts["encoder"], enc, "target"), name=opts["name"], seed=ctx.seed)
    return {res.name: res}


def _clip_t(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.clip_score import clip_t

    ctx.need_texts("reference", "output caption", "dataset.files.descriptions")
    enc = ctx.encoder(opts["encoder"], "clip_t")
    res = clip_t(ctx.image_embeddings(opts["encoder"], enc, "output"),
                 ctx.text_embeddings(opts["encoder"], enc, "reference"), name=opts["name"], seed=ctx.seed)
    return {res.name: res}


def _clip_dir(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """InstructPix2Pix's directional similarity: needs the source image and both captions."""
    from evals.metrics.editing import clip_directional_similarity

    ctx.need_texts("reference", "output caption", "dataset.files.descriptions")
    ctx.need_texts("input_caption", "input caption", "dataset.files.descriptions")
    enc, name = ctx.encoder(opts["encoder"], "clip_dir"), opts["encoder"]
    res = clip_directional_similarity(ctx.image_embeddings(name, enc, "image"),
                                      ctx.image_embeddings(name, enc, "output"),
                                      ctx.text_embeddings(name, enc, "input_caption"),
                                      ctx.text_embeddings(name, enc, "reference"), seed=ctx.seed)
    return _named(res, opts)


def _clip_img(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """InstructPix2Pix's image similarity cos(E_I(source), E_I(output))."""
    from evals.metrics.editing import clip_image_similarity

    enc, name = ctx.encoder(opts["encoder"], "clip_img"), opts["encoder"]
    res = clip_image_similarity(ctx.image_embeddings(name, enc, "image"), ctx.image_embeddings(name, enc, "output"),
                                seed=ctx.seed)
    return _named(res, opts)


def _dino(ctx: Context, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.editing import dino_similarity

    enc = ctx.dino(opts["weights"])
    key = f"dino:{opts['weights'] or ''}"
    res = dino_similarity(ctx.image_embeddings(key, enc, "output"), ctx.image_embeddings(key, enc, "target"),
                          seed=ctx.seed)
    return {res.name: res}


# ----------------------------------------------------------------------------- the metric table
@dataclass(frozen=True)
class MetricDef:
    fn: Adapter
    kinds: tuple[str, ...]
    options: dict[str, Any]  # option -> default
    # (result-name pattern, higher_is_better) for every name the adapter produces; a metric whose
    # `name` option renames its single result keeps the direction of its one declared output.
    outputs: tuple[tuple[str, bool], ...]
    # What the plan phase can know is missing before any model loads (required_files):
    # (dataset file role, what its texts are) the metric's texts come from, when the loader knows the role
    texts: tuple[tuple[str, str], ...] = ()
    needs_encoder: bool = False  # the `encoder` option must name one (null: refused)
    min_samples: int = 1  # fewer successful samples: not computed (a --limit below it: refused by the plan)

    def higher_is_better(self, result_name: str) -> bool:
        for pattern, hib in self.outputs:
            if fnmatchcase(result_name, pattern):
                return hib
        directions = {hib for _, hib in self.outputs}
        if len(directions) == 1 and "name" in self.options:
            return directions.pop()
        raise KeyError(f"metric table: {result_name!r} is not a declared output ({[p for p, _ in self.outputs]})")


METRICS: dict[str, MetricDef] = {
    "fid": MetricDef(_fid, ("t2i", "control"), {"feature_space": "inception", "protocol": "pytorch-fid", "resolution": 256,
                                     "weights": None, "reference_stats": None, "cache_dir": None,
                                     "batch_size": 50, "bootstrap": 0},
                     (("FID", False), ("FD-*", False)), min_samples=2),  # a covariance needs 2
    "clip_score": MetricDef(_clip_score, ("t2i", "control"), {"encoder": "model", "scale": 2.5, "name": None},
                            (("CLIPScore", True),), needs_encoder=True),
    "rank_accuracy": MetricDef(_rank_accuracy, ("t2i",), {"encoder": "demo", "pool_size": 100, "ks": [1, 5, 10]},
                               (("t2i_R@*", True), ("t2i_rank", False)),  # a mean rank: 1 is best
                               needs_encoder=True, min_samples=2),
    "captioning": MetricDef(_captioning, ("caption",), {"tokenize": "ptb", "spice": False, "report": None},
                            tuple((n, True) for n in _CAPTION_NAMES)),
    "vqa_accuracy": MetricDef(_vqa, ("vqa",), {"evaluation": "current"}, (("accuracy", True),)),
    "pixel_distances": MetricDef(_pixel, ("edit",), {}, (("L1", False), ("L2 (MSE)", False))),
    "clip_i": MetricDef(_clip_i, ("edit",), {"encoder": None, "name": "CLIP-I"}, (("CLIP-I", True),),
                        needs_encoder=True),
    "clip_t": MetricDef(_clip_t, ("edit",), {"encoder": None, "name": "CLIP-T"}, (("CLIP-T", True),),
                        texts=(("descriptions", "the output images' captions"),), needs_encoder=True),
    "clip_dir": MetricDef(_clip_dir, ("edit",), {"encoder": None, "name": "CLIP-dir"}, (("CLIP-dir", True),),
                          texts=(("descriptions", "the input and output images' captions"),), needs_encoder=True),
    # how much of the source survives the edit (InstructPix2Pix's consistency axis): higher = more faithful
    "clip_img": MetricDef(_clip_img, ("edit",), {"encoder": None, "name": "CLIP-img"}, (("CLIP-img", True),),
                          needs_encoder=True),
    "dino": MetricDef(_dino, ("edit",), {"weights": None}, (("DINO", True),)),
    "visdial": MetricDef(task_scoring.visdial, ("dialog",), {}, (("NDCG", True), ("R@*", True), ("MRR", True),
                                                      ("mean_rank", False))),
    "ocr": MetricDef(task_scoring.ocr, ("t2i",), {"when_available": False}, (("OCR_*", True),)),
    "edge_f1": MetricDef(task_scoring.edge_f1, ("control",), {}, (("edge_F1", True),)),
}

# Image-set metrics beside FID, from the saved images (evals/image_scoring.py). `when_available`: a
# task that lists the metric runs it only when its files are present (the plan says which it skips).
METRICS.update({
    "cmmd": MetricDef(image_scoring.cmmd, ("t2i",), {"encoder": "clip-vit-l-14-336", "resolution": 256,
                                                     "batch_size": 32, "bootstrap": 100, "when_available": False},
                      (("CMMD", False),), needs_encoder=True),
    "fd_dinov2": MetricDef(image_scoring.fd_dinov2, ("t2i",), {"arch": "vitl14", "weights": None, "resolution": 256,
                                                               "cache_dir": None, "batch_size": 32, "bootstrap": 0,
                                                               "when_available": False},
                           (("FD-DINOv2", False),)),
    "prdc": MetricDef(image_scoring.prdc, ("t2i",), {"feature_space": "inception", "nearest_k": 5, "arch": "vitl14",
                                                     "weights": None, "resolution": 256, "batch_size": 32,
                                                     "when_available": False},
                      tuple((n, True) for n in ("precision", "recall", "density", "coverage"))),
    # MJHQ-30K's per-category FID (clean-fid protocol, as the papers that report it)
    "fid_per_category": MetricDef(image_scoring.fid_per_category, ("t2i",), {"group": "category", "protocol": "clean",
                                                                             "weights": None, "resolution": None,
                                                                             "batch_size": 50},
                                  (("FID/*", False),)),
})

# The edit metric set `cm3eval score edit` computes, in its output order (the run's adapters).
EDIT_METRICS = ("pixel_distances", "dino", "clip_i", "clip_img", "clip_t", "clip_dir")


def higher_is_better(result_name: str, key: str | None = None) -> bool | None:
    """The direction of a result name: from metric `key`'s definition, or from the first definition
    that declares the name; None when no definition does (then a caller must not guess)."""
    defs = [METRICS[key]] if key is not None else list(METRICS.values())
    for d in defs:
        try:
            return d.higher_is_better(result_name) if key is not None else \
                next(h for p, h in d.outputs if fnmatchcase(result_name, p))
        except (KeyError, StopIteration):
            continue
    return None


# The option values a metric accepts, where they are a closed set (checked in the plan phase).
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("fid", "protocol"): ("pytorch-fid", "torch-fidelity", "clean"),
    ("captioning", "tokenize"): ("ptb", "none"),
    ("vqa_accuracy", "evaluation"): ("current", "legacy-2017"),
    ("fd_dinov2", "arch"): ("vitl14", "vitb14", "vits14"),
    ("prdc", "arch"): ("vitl14", "vitb14", "vits14"),
    ("fid_per_category", "protocol"): ("pytorch-fid", "torch-fidelity", "clean"),
}


def check_metrics(spec: Any, src: str) -> None:
    """Metric names, kinds, option names and closed option values of a spec (one-line errors
    naming src and the field)."""
    from tasks.spec import SpecError

    for name, opts in spec.metrics.items():
        if name not in METRICS:
            raise SpecError(f"{src}: metrics.{name}: unknown metric (known: {', '.join(METRICS)})")
        d = METRICS[name]
        if spec.kind not in d.kinds:
            raise SpecError(f"{src}: metrics.{name}: applies to {'/'.join(d.kinds)} tasks, not {spec.kind}")
        for o, v in (opts or {}).items():
            if o not in d.options:
                known = ", ".join(d.options) or "none"
                raise SpecError(f"{src}: metrics.{name}.{o}: unknown option (known: {known})")
            choices = _CHOICES.get((name, o))
            if choices is not None and v not in choices:
                raise SpecError(f"{src}: metrics.{name}.{o}: {v!r} is not one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- running the table
@dataclass
class Scored:
    metrics: dict[str, MetricResult]
    per_sample: dict[str, dict[str, float]]
    failures: list[dict[str, str]]
    notes: list[str]
    unavailable: dict[str, str] = field(default_factory=dict)  # requested metric key -> why not computed


def prepare(specs: list[Any]) -> None:
    """Called when a run starts: slow metric back-ends start loading while the model generates
    (the METEOR jar spends ~10 s on its paraphrase tables before its first answer)."""
    for spec in specs:
        if "captioning" not in spec.metrics:
            continue
        report = {**METRICS["captioning"].options, **(spec.metrics["captioning"] or {})}["report"]
        if report and "METEOR" not in report:
            continue
        from evals.metrics.captioning import prestart_meteor

        try:
            prestart_meteor()
        except RuntimeError as e:  # no java: scoring reports it where it belongs
            log.debug("METEOR prestart skipped: %s", e)
        return


def _run_one(ctx: Context, key: str, user_opts: dict[str, Any]) -> dict[str, MetricResult]:
    d = METRICS[key]
    results = d.fn(ctx, {**d.options, **(user_opts or {})})
    for name, res in results.items():
        res.higher_is_better = d.higher_is_better(name)
    return results


def score_metrics(metrics: dict[str, dict[str, Any]], ctx: Context, *, label: str = "") -> Scored:
    """Run the metric keys of `metrics` ({key: options}) over the context's records."""
    out: dict[str, MetricResult] = {}
    ids = ctx.ids()
    per_sample: dict[str, dict[str, float]] = {i: {} for i in ids}
    notes: list[str] = []
    unavailable: dict[str, str] = {}
    if not ctx.records:
        notes.append("no sample finished without a failure; nothing to score")
        return Scored(out, per_sample, [], notes, {k: notes[0] for k in metrics})
    for key, user_opts in metrics.items():
        try:
            if len(ctx.records) < METRICS[key].min_samples:
                raise MetricUnavailable(f"needs at least {METRICS[key].min_samples} successful samples, "
                                        f"got {len(ctx.records)}")
            results = _run_one(ctx, key, user_opts)
        except Exception as e:  # noqa: BLE001 - one metric's failure never costs the others (or later tasks)
            why = str(e) if isinstance(e, MetricUnavailable) else f"{type(e).__name__}: {e}"
            notes.append(f"{key}: not computed: {why}")
            unavailable[key] = why
            log.warning("%s: %s", label or "scoring", notes[-1])
            continue
        written: set[str] = set()
        for name, res in results.items():
            out[name] = res
            ps = res.per_sample
            # a run's task folder keeps them for compare's paired CI (a folder-to-folder score has none)
            if res.set_inputs is not None and getattr(ctx, "task_dir", None):
                inputs = dict(res.set_inputs)
                rows, file = [str(i) for i in inputs.pop("ids", ids)], res.extra.get("features_file", name)
                if len(inputs["features"]) == len(rows) and file not in written:
                    runs.write_features(ctx.task_dir, file, rows, **inputs)
                    written.add(file)
            if ps is not None and len(ps) == len(ids):
                for i, v in zip(ids, np.asarray(ps, dtype=np.float64).tolist()):
                    per_sample[i][name] = v
    return Scored(out, per_sample, [], notes, unavailable)


def score_task(spec: Any, records: list[dict[str, Any]], *, task_dir: Path, data_root: Path,
               model_bundle: Any = None, device: str = "cpu", predictor: Any = None,
               encoders: Any = None) -> Scored:
    """Score one task's finished records with its metrics block.

    `model_bundle`: the evaluated checkpoint (for encoder "model" / "demo"). `encoders`: an
    `evals.encoders.EncoderCache` shared with the predictor (so reranking and scoring load one
    copy). `predictor`: a shorthand for both, of which only `.bundle` and `.encoders` are read."""
    check_metrics(spec, f"task {spec.name}")
    if predictor is not None:
        model_bundle = model_bundle if model_bundle is not None else getattr(predictor, "bundle", None)
        encoders = encoders if encoders is not None else getattr(predictor, "encoders", None)
    ctx = Context.build(records, task_dir, data_root, model_bundle=model_bundle, device=device, seed=spec.seed,
                        encoders=encoders)
    return score_metrics(spec.metrics, ctx, label=spec.name)


# ----------------------------------------------------------------------------- what a spec needs on disk
@dataclass(frozen=True)
class RequiredFile:
    """A local file (or folder) a task's metrics need; the plan phase checks it before any model loads."""

    path: Path  # where it was looked for (the first place when none holds it)
    what: str  # e.g. "FID Inception weights (metrics.fid)"
    how_to_get: str  # one line: where to download it and which flag / option names it
    metric: str = ""  # the metric key that needs it
    under_data_root: bool = False  # a relative path to resolve against the task's data root

    @property
    def exists(self) -> bool:
        return self.under_data_root or self.path.exists()


def _weights_file(weights_file: Any, explicit: Any, metric: str) -> RequiredFile:
    places = weights_file.search_paths(explicit)
    found = next((p for _, p in places if p.is_file()), places[0][1])
    looked = "; ".join(f"{how}: {p}" for how, p in places)
    how = (f"download {weights_file.url} on a connected machine and pass it with --set {weights_file.option}=PATH "
           f"(cm3eval run) or {weights_file.flag} (cm3eval score), or set ${weights_file.env} (looked in {looked})")
    return RequiredFile(found, f"{weights_file.what} (metrics.{metric})", how, metric)


def _encoder_files(name: Any, metric: str, option: str) -> list[RequiredFile]:
    from evals.encoders import NAMED, required_encoder_files

    out = []
    for path, what in required_encoder_files(name, f"metrics.{metric}.{option}"):
        if name == "demo":
            how = "build the demo with `cm3eval train demo`"
        elif name in NAMED:  # `what` already says where it looked and how to get the file
            how = f"or name another encoder with --set metrics.{metric}.{option}=..."
        else:
            how = f"put the files there, or name another encoder with --set metrics.{metric}.{option}=..."
        out.append(RequiredFile(path, f"{what} (metrics.{metric}.{option})", how, metric))
    return out


def _encoder_hint() -> str:
    from evals.encoders import NAMED

    named = NAMED["clip-vit-b-32"]
    return (f"{named.name} (open_clip {named.arch}; its weights at ${named.env} or {named.places()[-1][1]}), "
            f"open_clip:{named.arch}:PATH or an HF CLIP folder")


def check_inputs(spec: Any) -> None:
    """What a requested metric needs besides files, known before any model loads (MetricInputMissing,
    exit 2, one line naming the option): an encoder named where the metric needs one, the data file
    its texts come from, the Java (and SPICE jars) its captioning back-end runs on.

    A limit below a metric's `min_samples` (FID/FD and rank accuracy need 2) is refused here too;
    where the count is known only after generating (failed samples), the metric is recorded as not
    computed with its reason (exit 3)."""
    from tasks.loaders import LOADERS

    loader = LOADERS.get(spec.dataset.loader)
    known_roles = set(loader.required + loader.optional) if loader is not None else set()
    for key, user_opts in spec.metrics.items():
        d = METRICS.get(key)
        if d is None:
            continue  # check_metrics reports it
        opts = {**d.options, **(user_opts or {})}
        if spec.limit is not None and spec.limit < d.min_samples:
            raise MetricInputMissing(f"{spec.name}: metrics.{key} needs at least {d.min_samples} samples, but limit is "
                                     f"{spec.limit}; raise --limit to {d.min_samples} or more, or leave {key} out")
        if d.needs_encoder and not opts.get("encoder"):
            raise MetricInputMissing(f"{spec.name}: metrics.{key}.encoder is not set and {key} needs an encoder; "
                                     f"pass --set metrics.{key}.encoder=NAME, e.g. {_encoder_hint()}")
        for role, what in d.texts:
            # only a role the loader reads from a file can be missing (another loader may carry the texts)
            if role in known_roles and not spec.dataset.files.get(role):
                raise MetricInputMissing(
                    f"{spec.name}: metrics.{key} needs {what}, from dataset.files.{role}, which is not set; pass "
                    f"--set dataset.files.{role}=PATH (under the data root; MagicBrush: global_descriptions.json "
                    "beside edit_sessions.json)")
        if key == "fid" and not opts["feature_space"]:
            raise MetricInputMissing(f"{spec.name}: metrics.fid.feature_space is not set; pass --set "
                                     "metrics.fid.feature_space=inception (FID) or an encoder name (FD-<name>), e.g. "
                                     f"{_encoder_hint()}")
        if key == "captioning":
            _check_captioning(spec.name, opts)
        if key == "ocr":
            from evals.metrics.ocr import INSTALL_HINT, engine_problem

            problem = engine_problem()
            if problem is not None:
                raise MetricInputMissing(f"{spec.name}: metrics.ocr reads the images with Tesseract and {problem}; "
                                         f"{INSTALL_HINT}")
        if key == "edge_f1" or spec.kind == "control":
            import importlib.util

            if importlib.util.find_spec("kornia") is None:
                raise MetricInputMissing(f"{spec.name}: the Canny edge maps of {spec.kind} tasks need kornia, which is "
                                         "not installed; pip install kornia")


def _check_captioning(task: str, opts: dict[str, Any]) -> None:
    """The PTB tokenizer, METEOR and SPICE run on Java; SPICE also on jars pycocoevalcap would download."""
    import shutil

    report = opts["report"]
    java_for = [what for what, used in (("the PTB tokenizer (metrics.captioning.tokenize=ptb)", opts["tokenize"] == "ptb"),
                                        ("METEOR", not report or "METEOR" in report),
                                        ("SPICE (metrics.captioning.spice)", bool(opts["spice"])))
                if used]
    if java_for and shutil.which("java") is None:
        raise MetricInputMissing(f"{task}: {' and '.join(java_for)} need Java and no `java` is on PATH; install a "
                                 "JRE (e.g. apt-get install default-jre-headless), or --set metrics.captioning."
                                 "tokenize=none with metrics.captioning.report=[BLEU-4,CIDEr,ROUGE-L]")
    if opts["spice"]:
        from evals.metrics.captioning import spice_status

        available, why = spice_status()
        if not available:
            raise MetricInputMissing(f"{task}: metrics.captioning.spice is on but SPICE is {why}; put the jars "
                                     "there, or --set metrics.captioning.spice=false")


def required_files(spec: Any) -> list[RequiredFile]:
    """The local files the spec's metrics need (weights, encoders, precomputed statistics), after
    `check_inputs` (which raises MetricInputMissing for what is missing but no file).

    An encoder named "model" needs the checkpoint's own encoder: the plan checks that with
    `cm3leon.checkpoint.inspect`, not here. Raises `evals.encoders.EncoderUnavailable` for an
    encoder name of no known kind, or one whose back-end (open_clip, transformers) is not installed."""
    from evals.metrics import dino, inception
    from evals.metrics.weights import WEIGHTS

    check_inputs(spec)
    spec, _ = skip_absent(spec)  # a `when_available` metric without its files is left out, not required
    out: list[RequiredFile] = []
    for key, user_opts in spec.metrics.items():
        if key not in METRICS:
            continue  # check_metrics reports it
        opts = {**METRICS[key].options, **(user_opts or {})}
        if key == "fid" and opts["feature_space"] == "inception":
            clean = opts["protocol"] == "clean"  # clean-fid's own network file
            out.append(_weights_file(WEIGHTS["clean-fid-inception"] if clean else inception.WEIGHTS_FILE,
                                     opts["weights"], key))
            if opts["reference_stats"]:
                rel = not Path(opts["reference_stats"]).is_absolute()
                out.append(RequiredFile(Path(opts["reference_stats"]), "FID reference statistics (metrics.fid)",
                                        "a .npz from `cm3eval score fid --save-ref-stats` or pytorch-fid --save-stats",
                                        key, under_data_root=rel))
        elif key == "fid":
            out += _encoder_files(opts["feature_space"], key, "feature_space")
        elif key == "dino":
            out.append(_weights_file(dino.WEIGHTS_FILE, opts["weights"], key))
        elif key in ("fd_dinov2", "prdc", "fid_per_category"):
            out += [_weights_file(wf, path, key) for wf, path in image_scoring.weights_files(key, opts)]
            for name, option in image_scoring.encoder_names(key, opts):
                out += _encoder_files(name, key, option)
        elif "encoder" in opts:
            out += _encoder_files(opts["encoder"], key, "encoder")
    return out


def skip_absent(spec: Any) -> tuple[Any, dict[str, str]]:
    """(the spec without its `when_available` metrics whose files are absent, {metric: why}) for the plan."""
    from dataclasses import replace

    keep, skipped = image_scoring.skip_absent(spec.metrics, {k: d.options for k, d in METRICS.items()})
    return (replace(spec, metrics=keep) if skipped else spec), skipped
