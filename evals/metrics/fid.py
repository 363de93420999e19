"""FID (and FD in other feature spaces) and KID: the public API.

`compute_fid(generated, reference)` and `reference_stats(images, cache_dir)` are the two entry
points; the pieces live beside this module, each usable alone:
- `fid_stats`: `FeatureStats` (mergeable running moments, .npz files), `frechet_distance`, `kid`,
  the reference-statistics cache;
- `fid_resize`: the preprocessing protocols ("pytorch-fid" default, "torch-fidelity", "clean")
  and `square_resize`, the one short-side resize + center crop;
- `fid_features`: `Extractor`, `inception_extractor` (local weights only), `iter_features`,
  `extract_features`, `image_stats`.
They are re-exported here so callers import one module (`from evals.metrics import fid`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from evals.metrics.fid_features import (  # noqa: F401 - re-exported public API
    IMAGE_EXTENSIONS,
    INCEPTION_NAME,
    Extractor,
    extract_features,
    fid_name,
    get_extractor,
    image_set_fingerprint,
    image_stats,
    inception_extractor,
    iter_features,
    list_images,
    module_fingerprint,
)
from evals.metrics.fid_resize import PROTOCOLS, check_protocol, preprocess, square_resize  # noqa: F401
from evals.metrics.fid_stats import (  # noqa: F401 - re-exported public API
    KID,
    STATS_FORMAT,
    FeatureStats,
    cache_path,
    check_compatible,
    check_moments,
    default_cache_dir,
    frechet_distance,
    kid,
    load_cached,
    load_stats_file,
    low_rank_factor,
    psd_factor,
    trace_sqrt_product,
)
from evals.metrics.errors import MetricUnavailable
from evals.metrics.result import MetricResult


def reference_stats(image_dir_or_files, cache_dir: str | os.PathLike | None = None, *,
                    protocol: str = "pytorch-fid", resolution: int | None = None,
                    feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                    weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 50, keep_features: bool = False) -> FeatureStats:
    """Statistics of a reference image set, from the cache when present, else computed and saved.

    The cache key is (image set fingerprint, resolution, protocol, extractor id). An unreadable
    or mismatching cache file is recomputed with a warning, never trusted. `resolution`: resize
    the short side to it (PIL bicubic) and center-crop square before the protocol's resize.
    """
    check_protocol(protocol)
    if isinstance(image_dir_or_files, (str, os.PathLike)):
        files = list_images(image_dir_or_files)
    else:
        files = [Path(f) for f in image_dir_or_files]
        if not files:
            raise ValueError("reference_stats: no image files given")
    ext = get_extractor(feature_extractor, extractor_name, weights, device, protocol)
    key = {"fingerprint": image_set_fingerprint(files), "resolution": resolution, "protocol": protocol,
           "extractor": ext.id}
    path = cache_path(key, cache_dir)
    cached = load_cached(path, key, len(files), keep_features)
    if cached is not None:
        return cached
    stats = image_stats(files, ext, protocol=protocol, batch_size=batch_size, resolution=resolution,
                        keep_features=keep_features, meta=key)
    stats.save(path)
    return stats


# --------------------------------------------------------------------------------------------
# the metric


def _is_feature_array(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 2
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 2


class _Sides:
    """Turns each side's input into statistics; the network loads only when a side has images."""

    def __init__(self, feature_extractor, extractor_name, weights, device, protocol, batch_size, resolution):
        self._args = (feature_extractor, extractor_name, weights, device)
        self.protocol, self.batch_size, self.resolution = protocol, batch_size, resolution
        self.ext: Extractor | None = None

    def stats(self, obj, keep_features: bool) -> FeatureStats | tuple[np.ndarray, np.ndarray]:
        if isinstance(obj, FeatureStats):
            return obj
        if isinstance(obj, (str, os.PathLike)) and str(obj).endswith(".npz"):
            return load_stats_file(Path(obj))
        if _is_feature_array(obj):
            return FeatureStats.from_features(obj, keep_features=True)
        if self.ext is None:
            self.ext = get_extractor(*self._args, self.protocol)
        return image_stats(obj, self.ext, protocol=self.protocol, batch_size=self.batch_size,
                           resolution=self.resolution, keep_features=keep_features)


def _check_sides(gen, ref, protocol: str) -> dict[str, Any]:
    """Both sides made the same way (protocol, network); returns the reference's meta."""
    if not isinstance(gen, FeatureStats):
        raise ValueError("generated side: need FeatureStats, features or images (a mu/sigma-only file has no n)")
    ref_meta = ref.meta if isinstance(ref, FeatureStats) else {}
    check_compatible(gen.meta, ref_meta, "compute_fid")
    for side_meta, side in ((gen.meta, "generated"), (ref_meta, "reference")):
        if side_meta.get("protocol") not in (None, protocol):
            raise ValueError(f"compute_fid: {side} statistics were made with protocol {side_meta['protocol']!r}, "
                             f"not {protocol!r}")
    return ref_meta


class _DistanceToReference:
    """FD of any generated (mu, sigma) to one fixed reference, factoring the reference once.

    tr sqrt(s_g s_r) needs a factor A (A A^T = one covariance). With the features of a set
    smaller than the dimension, its centred features are a thin factor: the eigenproblem shrinks
    from D x D to n x n. Otherwise sigma_r is factored once, for the estimate and every resample.
    """

    def __init__(self, gen: FeatureStats, ref: FeatureStats | tuple[np.ndarray, np.ndarray]) -> None:
        self.mu_r, self.sigma_r = (ref.mu, ref.sigma) if isinstance(ref, FeatureStats) else ref
        if gen.mu.shape != self.mu_r.shape:
            raise ValueError(f"compute_fid: feature dims differ (generated {gen.mu.shape[0]}, "
                             f"reference {self.mu_r.shape[0]})")
        check_moments(self.mu_r, self.sigma_r, "reference")
        self.ref_feats = ref.features if isinstance(ref, FeatureStats) else None
        self.factor_r = low_rank_factor(self.ref_feats) if self.ref_feats is not None else None
        self.gen_features = gen.features
        self.gen_thin = self.factor_r is None and gen.features is not None and gen.n - 1 < gen.dim
        if self.factor_r is None and not self.gen_thin:
            self.factor_r = psd_factor(self.sigma_r)

    def __call__(self, mu: np.ndarray, sigma: np.ndarray, feats: np.ndarray | None = None) -> float:
        check_moments(mu, sigma, "generated")
        d = mu - self.mu_r
        if self.gen_thin:
            tr = trace_sqrt_product(low_rank_factor(self.gen_features if feats is None else feats), self.sigma_r)
        else:
            tr = trace_sqrt_product(self.factor_r, sigma)
        return float(d @ d + np.trace(sigma) + np.trace(self.sigma_r) - 2.0 * tr)


def _bootstrap_ci(fd: _DistanceToReference, feats: np.ndarray | None, n_resamples: int, seed: int
                  ) -> tuple[float, float]:
    """95 % percentile CI over resamples of the generated features (the reference stays fixed)."""
    if feats is None:
        raise ValueError("compute_fid: a bootstrap CI needs the generated features, not only their statistics")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_resamples):
        s = feats[rng.integers(0, feats.shape[0], feats.shape[0])]
        vals.append(fd(s.mean(axis=0), np.cov(s, rowvar=False), s))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def compute_fid(gen_images_or_stats, ref_stats, *, protocol: str = "pytorch-fid",
                feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                batch_size: int = 50, resolution: int | None = None,
                kid_subsets: int | None = None, kid_subset_size: int = 1000, kid_seed: int = 2020,
                bootstrap: int = 0, seed: int = 0, keep_features: bool = False) -> MetricResult:
    """FID (or FD-<name>) of generated images against reference statistics (lower is better).

    gen_images_or_stats: FeatureStats, a float [N,D] feature array, or images (folder, uint8
    [N,3,H,W] tensor, list of paths / PIL images / uint8 tensors). ref_stats: FeatureStats, a
    .npz path (ours or pytorch-fid's), a feature array, or images.
    kid_subsets: also report KID with that many subsets (torch-fidelity uses 100); needs
    features of both sides (reference stats made with keep_features=True).
    bootstrap: number of resamples of the generated features for a 95% percentile CI (default
    0 = off; expensive: one eigendecomposition of a DxD matrix per resample, ~1 s at D=2048).
    keep_features: return the generated features and the reference moments in `set_inputs`.
    """
    check_protocol(protocol)
    sides = _Sides(feature_extractor, extractor_name, weights, device, protocol, batch_size, resolution)
    gen = sides.stats(gen_images_or_stats, keep_features or kid_subsets is not None or bootstrap > 0)
    ref = sides.stats(ref_stats, kid_subsets is not None)
    for side, n in (("generated", gen.n), ("reference", ref.n if isinstance(ref, FeatureStats) else 2)):
        if n < 2:  # a covariance needs two samples: not computed, with the reason (exit 3 in a run)
            raise MetricUnavailable(f"a Fréchet distance needs at least 2 {side} samples, got {n}")
    ref_meta = _check_sides(gen, ref, protocol)
    fd = _DistanceToReference(gen, ref)
    value = fd(gen.mu, gen.sigma)
    ext = sides.ext
    name = (ext.name if ext is not None else None) or gen.meta.get("extractor_name") \
        or ref_meta.get("extractor_name") or extractor_name
    extra: dict[str, Any] = {"protocol": protocol,
                             "extractor": (ext.id if ext is not None else None) or gen.meta.get("extractor")
                             or ref_meta.get("extractor"),
                             "n_ref": ref.n if isinstance(ref, FeatureStats) else None}
    ci = None
    if bootstrap > 0:
        ci = _bootstrap_ci(fd, gen.features, bootstrap, seed)
        extra["bootstrap"] = bootstrap
    if kid_subsets is not None:
        if gen.features is None or fd.ref_feats is None:
            raise ValueError("compute_fid: KID needs the features of both sets; the reference statistics have none "
                             "(compute them with keep_features=True)")
        k = kid(gen.features, fd.ref_feats, subset_size=kid_subset_size, subsets=kid_subsets, seed=kid_seed)
        extra["kid"] = {"mean": k.mean, "std": k.std, "subset_size": k.subset_size, "subsets": k.subsets}
    res = MetricResult(fid_name(name), value, ci, gen.n, None, extra, higher_is_better=False)
    if keep_features and gen.features is not None:
        res.set_inputs = {"features": gen.features, "ref_mu": fd.mu_r, "ref_sigma": fd.sigma_r}
    return res
