"""The image-set metrics beside FID: CMMD, FD-DINOv2 and precision/recall/density/coverage.

Each is computed from the run's saved images (`Context.output_paths`) against the task's reference
images (`Context.data_images("image")`), so `cm3eval score images RUN/TASK/images REF` recomputes
it later without generating again. The adapters here are the rows `evals.scoring.METRICS` appends;
`required_files` says which local files each needs (for the plan), and `skip_absent` drops the
metrics a task asks for only `when_available` (coco-fid's CMMD and FD-DINOv2) whose files are not
there, with the one line the plan prints. Networks are loaded once per process and device.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from evals.metrics.errors import MetricUnavailable
from evals.metrics.result import MetricResult
from tasks.weights import WEIGHTS, WeightsNotFound

_NETS: dict[tuple, Any] = {}


def _cached(key: tuple, load: Callable[[], Any]) -> Any:
    if key not in _NETS:
        _NETS[key] = load()
    return _NETS[key]


def dinov2_net(arch: str, weights: Any, device: str) -> Any:
    from evals.metrics import fd_dinov2

    try:
        return _cached(("dinov2", arch, str(weights), str(device)), lambda: fd_dinov2.dinov2_net(arch, weights, device))
    except WeightsNotFound as e:
        raise MetricUnavailable(f"FD-DINOv2 needs its weights: {e}") from None


def clip_net(encoder: Any) -> Any:
    from evals.metrics.cmmd import cmmd_net

    return _cached(("clip", id(encoder)), lambda: cmmd_net(encoder))


# ----------------------------------------------------------------------------- adapters (ctx, opts)
def _sides(ctx: Any) -> tuple[list, list]:
    gen, ref = ctx.output_paths(), ctx.data_images("image")
    if len(gen) < 2 or len(ref) < 2:
        raise MetricUnavailable(f"needs at least 2 generated and 2 reference images, got {len(gen)} and {len(ref)}")
    return gen, ref


def fd_dinov2(ctx: Any, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.fd_dinov2 import compute_fd_dinov2

    gen, ref = _sides(ctx)
    net = dinov2_net(opts["arch"], opts["weights"], ctx.device)
    res = compute_fd_dinov2(gen, ref, net, cache_dir=opts["cache_dir"], resolution=opts["resolution"],
                            batch_size=opts["batch_size"], bootstrap=opts["bootstrap"], seed=ctx.seed)
    res.extra["arch"] = opts["arch"]
    return {res.name: res}


def cmmd(ctx: Any, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.cmmd import compute_cmmd

    gen, ref = _sides(ctx)
    net = clip_net(ctx.encoder(opts["encoder"], "cmmd"))
    res = compute_cmmd(gen, ref, net, batch_size=opts["batch_size"], resolution=opts["resolution"],
                       bootstrap=opts["bootstrap"], seed=ctx.seed)
    return {res.name: res}


def space_features(space: str, images: list, opts: dict[str, Any], device: str, encoder: Callable[[str], Any]
                   ) -> np.ndarray:
    """Features of `images` in a named space: "inception" (FID's network, its protocol), "dinov2"
    (FD-DINOv2's, `arch`), or an encoder name (its CLIP tower on CMMD's preprocessing)."""
    from evals.metrics.image_features import net_features

    if space == "inception":
        from evals.metrics import fid as fid_lib

        try:
            ext = _cached(("inception", str(opts["weights"]), str(device)),
                          lambda: fid_lib.inception_extractor(opts["weights"], device))
        except FileNotFoundError as e:
            raise MetricUnavailable(f"PRDC in Inception space needs its weights: {e}") from None
        return fid_lib.extract_features(images, ext, batch_size=opts["batch_size"], resolution=opts["resolution"])
    if space == "dinov2":
        net = dinov2_net(opts["arch"], opts["weights"], device)
    else:
        net = clip_net(encoder(space))
    return net_features(images, net, batch_size=opts["batch_size"], resolution=opts["resolution"])


def prdc(ctx: Any, opts: dict[str, Any]) -> dict[str, MetricResult]:
    from evals.metrics.prdc import compute_prdc

    gen, ref = _sides(ctx)
    k = int(opts["nearest_k"])
    if min(len(gen), len(ref)) <= k:
        raise MetricUnavailable(f"PRDC with nearest_k={k} needs more than {k} images per set, got "
                                f"{len(gen)} generated and {len(ref)} reference")
    space = opts["feature_space"]
    resolve = lambda name: ctx.encoder(name, "prdc", "feature_space")  # noqa: E731
    feats = [space_features(space, side, opts, ctx.device, resolve) for side in (ref, gen)]
    return compute_prdc(feats[0], feats[1], k, space=space, seed=ctx.seed)


def fid_per_category(ctx: Any, opts: dict[str, Any]) -> dict[str, MetricResult]:
    """FID of each group of samples (`meta[group]`, MJHQ-30K's category) against that group's reference
    images, as "FID/<group>"; features are extracted once for all images."""
    from evals.metrics import fid as fid_lib

    gen, ref = ctx.output_paths(), ctx.data_images("image")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(ctx.records):
        groups.setdefault(str((r.get("meta") or {}).get(opts["group"], "")), []).append(i)
    try:
        ext = fid_lib.inception_extractor(opts["weights"], ctx.device, opts["protocol"])
    except FileNotFoundError as e:
        raise MetricUnavailable(f"per-category FID needs the Inception weights: {e}") from None
    kw = dict(protocol=opts["protocol"], batch_size=opts["batch_size"], resolution=opts["resolution"])
    g, r = fid_lib.extract_features(gen, ext, **kw), fid_lib.extract_features(ref, ext, **kw)
    meta = {"protocol": opts["protocol"], "extractor": ext.id}
    out = {}
    for name, idx in sorted(groups.items()):
        if len(idx) < 2:
            continue  # no covariance from one sample; the category is left out, the others stand
        res = fid_lib.compute_fid(g[idx], fid_lib.FeatureStats.from_features(r[idx], meta=meta), protocol=opts["protocol"],
                                  keep_features=True)
        res.set_inputs["ids"] = [str(ctx.records[i]["id"]) for i in idx]  # the category's rows
        res.name = f"FID/{name}"
        res.extra.update(group=opts["group"], extractor=ext.id)
        out[res.name] = res
    if not out:
        raise MetricUnavailable(f"no {opts['group']} has 2 samples")
    return out


# ----------------------------------------------------------------------------- files, and metrics when available
def weights_files(key: str, opts: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(WeightsFile, explicit path) each of these metrics loads through the weights finder."""
    if key == "fd_dinov2" or (key == "prdc" and opts.get("feature_space") == "dinov2"):
        return [(WEIGHTS[f"dinov2-{opts['arch']}"], opts["weights"])]
    if key == "prdc" and opts.get("feature_space") == "inception":
        return [(WEIGHTS["inception"], opts["weights"])]
    if key == "fid_per_category":
        return [(WEIGHTS["clean-fid-inception" if opts["protocol"] == "clean" else "inception"], opts["weights"])]
    return []


def encoder_names(key: str, opts: dict[str, Any]) -> list[tuple[str, str]]:
    """(encoder name, option) the metric resolves through `evals.encoders`."""
    if key == "cmmd":
        return [(opts["encoder"], "encoder")]
    if key == "prdc" and opts.get("feature_space") not in ("inception", "dinov2"):
        return [(opts["feature_space"], "feature_space")]
    return []


def missing_line(key: str, opts: dict[str, Any]) -> str | None:
    """Why metric `key` cannot run here (its first absent file, one line), or None."""
    from evals.encoders import EncoderUnavailable, required_encoder_files

    if key == "ocr":  # an engine, not a weights file
        from evals.metrics.ocr import INSTALL_HINT, engine_problem

        problem = engine_problem()
        return None if problem is None else f"Tesseract {problem}; {INSTALL_HINT}"
    for wf, explicit in weights_files(key, opts):
        if wf.find_or_none(explicit) is None:
            return wf.missing(explicit)
    for name, option in encoder_names(key, opts):
        try:
            files = required_encoder_files(name, f"metrics.{key}.{option}")
        except EncoderUnavailable as e:
            return str(e)
        for path, what in files:
            if not path.exists():
                return f"{what} not found: {path}"
    return None


def skip_absent(metrics: dict[str, dict[str, Any]], defaults: dict[str, dict[str, Any]]
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(the metrics to run, {key: why skipped}): a `when_available` metric whose files are absent is
    left out (the plan prints why); every other metric stays (a missing file is then a plan error)."""
    keep, skipped = {}, {}
    for key, user in metrics.items():
        opts = {**defaults.get(key, {}), **(user or {})}
        why = missing_line(key, opts) if opts.get("when_available") else None
        if why is None:
            keep[key] = user
        else:
            skipped[key] = f"{why}; --set metrics.{key}.when_available=false to require it"
    return keep, skipped


# ----------------------------------------------------------------------------- two image folders
class FolderContext:
    """The `Context` the adapters read, over two image folders (`cm3eval score images GEN REF`): the
    generated images are the outputs, the reference images the task's data images."""

    def __init__(self, generated: Any, reference: Any, *, device: str = "cpu", seed: int = 0) -> None:
        from evals.encoders import EncoderCache
        from evals.metrics.fid_features import list_images

        self.generated, self.reference = list_images(generated), list_images(reference)
        self.device, self.seed = device, seed
        self.records = [{"id": p.name} for p in self.generated]
        self._encoders = EncoderCache(device=device)

    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def output_paths(self) -> list:
        return self.generated

    def data_images(self, role: str) -> list:
        return self.reference

    def data_path(self, path: str) -> Any:
        from pathlib import Path

        return Path(path)

    def encoder(self, name: str | None, metric: str, option: str = "encoder") -> Any:
        from evals.encoders import EncoderUnavailable

        try:
            return self._encoders.get(name, flag=f"the {metric} {option}")
        except EncoderUnavailable as e:
            raise MetricUnavailable(str(e)) from None
