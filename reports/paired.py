"""Paired statistics of set metrics (FD/FID): their value from saved features, and the CI of the
delta between two runs measured on the same prompts.

A set metric has no per-sample scores, so a paired bootstrap would recompute it for both runs on
each resample of the shared prompts: for FID a 2048x2048 covariance and a matrix square root per
resample and run. Instead each run's metric is linearised around its full-sample statistics (the
delta method): FD of a resample = FD + mean of the resampled samples' influence values, where
for FD(mu, S) = |mu - mu_r|^2 + tr S + tr S_r - 2 tr (C S C)^(1/2), C = S_r^(1/2):

    IF(x) = 2 (mu - mu_r)·(x - mu) + (x - mu)^T A (x - mu) - <its mean>,   A = I - C (C S C)^(-1/2) C

(the gradient of FD in mu and S, applied to one sample's change of the moments). A paired
resample of the delta is then the resampled mean of IF_new(i) - IF_base(i) over shared prompts:
one d x d eigendecomposition pair and one n x d x d product per run, then O(n) per resample.
The reference is held fixed (the same set in both runs). tests/test_compare_paired.py checks the
CI against the plain bootstrap; the README gives its cost at 5k and 30k prompts.

`SET_METRICS` is the table: a metric name pattern -> its value-and-influence function. A new set
metric (KID, CMMD) is one row with its influence function.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

import numpy as np

from evals.metrics.fid_stats import frechet_distance
from evals.metrics.result import bootstrap_ci


def _sym_sqrt(m: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The PSD square root (or the pseudo-inverse square root) of a symmetric matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    w = np.clip(w, 0.0, None)
    if inverse:
        keep = w > 1e-10 * max(float(w.max(initial=0.0)), 1e-300)
        w = np.where(keep, 1.0 / np.sqrt(np.where(keep, w, 1.0)), 0.0)
    else:
        w = np.sqrt(w)
    return (v * w) @ v.T


def fd_influence(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> tuple[float, np.ndarray]:
    """(FD of the features to the reference moments, each row's influence value on it)."""
    x = np.asarray(features, np.float64)
    mu, ref_mu, ref_sigma = x.mean(axis=0), np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    xc = x - mu
    sigma = xc.T @ xc / (len(x) - 1)
    value = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    c = _sym_sqrt(ref_sigma)
    a = np.eye(len(mu)) - c @ _sym_sqrt(c @ sigma @ c, inverse=True) @ c
    quad = np.einsum("ij,ij->i", xc @ a, xc)
    return value, 2.0 * xc @ (mu - ref_mu) + quad - quad.mean()


SET_METRICS: list[tuple[str, Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray]]]] = [
    ("FID", fd_influence),
    ("FD-*", fd_influence),
]


def set_metric(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray]] | None:
    return next((fn for pattern, fn in SET_METRICS if fnmatchcase(name, pattern)), None)


@dataclass
class PairedDelta:
    base: float       # the metric of each run over the shared samples only
    new: float
    delta: float      # new - base
    ci: tuple[float, float]
    n: int            # shared samples


def paired_set_delta(metric: str, base: dict[str, np.ndarray], new: dict[str, np.ndarray], *,
                     n_resamples: int = 2000, seed: int = 0) -> PairedDelta | str:
    """The delta of a set metric between two runs' saved features (evals.runs.read_features), with
    its 95 % CI from the linearised paired bootstrap; a string saying why not when they cannot pair."""
    fn = set_metric(metric)
    if fn is None:
        return f"no influence function for {metric}"
    if base["ref_mu"].shape != new["ref_mu"].shape or not (
            np.allclose(base["ref_mu"], new["ref_mu"], rtol=1e-9, atol=0)
            and np.allclose(base["ref_sigma"], new["ref_sigma"], rtol=1e-9, atol=0)):
        return "the runs measured against different reference statistics"
    bi = {str(i): k for k, i in enumerate(base["ids"])}
    ni = {str(i): k for k, i in enumerate(new["ids"])}
    shared = sorted(bi.keys() & ni.keys())
    if len(shared) < 3:
        return f"{len(shared)} samples shared by id (need 3)"
    vb, ib = fn(base["features"][[bi[i] for i in shared]], base["ref_mu"], base["ref_sigma"])
    vn, inn = fn(new["features"][[ni[i] for i in shared]], new["ref_mu"], new["ref_sigma"])
    lo, hi = bootstrap_ci(inn - ib, n_resamples=n_resamples, seed=seed)
    delta = vn - vb
    return PairedDelta(vb, vn, delta, (delta + lo, delta + hi), len(shared))


def set_value(metric: str, saved: dict[str, np.ndarray]) -> float | None:
    """The set metric recomputed from a run's saved features (None: no function for it)."""
    fn = set_metric(metric)
    if fn is None:
        return None
    return fn(saved["features"], saved["ref_mu"], saved["ref_sigma"])[0]
