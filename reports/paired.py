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
from typing import Any, Callable

import numpy as np

from evals.metrics.result import bootstrap_ci


def _eigh_psd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return np.clip(w, 0.0, None), v


@dataclass
class FDReference:
    mu: np.ndarray
    sigma: np.ndarray
    sqrt: np.ndarray  # C = sigma^(1/2), shared by both runs of a comparison


def fd_reference(ref_mu: np.ndarray, ref_sigma: np.ndarray) -> FDReference:
    w, v = _eigh_psd(np.asarray(ref_sigma, np.float64))
    return FDReference(np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64), (v * np.sqrt(w)) @ v.T)


def fd_influence(features: np.ndarray, ref: FDReference) -> tuple[float, np.ndarray]:
    """(FD of the features to the reference, each row's influence value on it).

    With K = C S C = U diag(l) U^T: tr (C S C)^(1/2) = sum sqrt(l), and C K^(-1/2) C = W W^T with
    W = C U diag(l^(-1/4)) (zero eigenvalues left out), so (x-mu)^T A (x-mu) = |x-mu|^2 - |(x-mu) W|^2:
    two d x d products, one eigendecomposition and one n x d x d product per run."""
    x = np.asarray(features, np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (len(x) - 1)
    lam, u = _eigh_psd(ref.sqrt @ sigma @ ref.sqrt)
    d = mu - ref.mu
    value = float(d @ d + np.trace(sigma) + np.trace(ref.sigma) - 2.0 * np.sqrt(lam).sum())
    keep = lam > 1e-10 * max(float(lam.max(initial=0.0)), 1e-300)
    w = (ref.sqrt @ u[:, keep]) * lam[keep] ** -0.25
    quad = (xc * xc).sum(axis=1) - np.square(xc @ w).sum(axis=1)
    return value, 2.0 * xc @ d + quad - quad.mean()


@dataclass(frozen=True)
class SetMetric:
    """How to pair a set metric: the reference prepared once, then (value, influence) per run."""
    reference: Callable[[np.ndarray, np.ndarray], Any]
    influence: Callable[[np.ndarray, Any], tuple[float, np.ndarray]]


SET_METRICS: list[tuple[str, SetMetric]] = [
    ("FID", SetMetric(fd_reference, fd_influence)),
    ("FID/*", SetMetric(fd_reference, fd_influence)),  # one category's FID (mjhq-fid)
    ("FD-*", SetMetric(fd_reference, fd_influence)),
]


def set_metric(name: str) -> SetMetric | None:
    return next((m for pattern, m in SET_METRICS if fnmatchcase(name, pattern)), None)


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
    sm = set_metric(metric)
    if sm is None:
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
    ref = sm.reference(base["ref_mu"], base["ref_sigma"])
    vb, ib = sm.influence(base["features"][[bi[i] for i in shared]], ref)
    vn, inn = sm.influence(new["features"][[ni[i] for i in shared]], ref)
    lo, hi = bootstrap_ci(inn - ib, n_resamples=n_resamples, seed=seed)
    delta = vn - vb
    return PairedDelta(vb, vn, delta, (delta + lo, delta + hi), len(shared))


def run_ci(metric: str, saved: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """One run's own 95 % CI of a set metric from its influence values (normal approximation)."""
    sm = set_metric(metric)
    if sm is None or len(saved["features"]) < 3:
        return None
    value, infl = sm.influence(saved["features"], sm.reference(saved["ref_mu"], saved["ref_sigma"]))
    half = 1.959963984540054 * float(np.std(infl, ddof=1)) / np.sqrt(len(infl))
    return value - half, value + half


def set_value(metric: str, saved: dict[str, np.ndarray]) -> float | None:
    """The set metric recomputed from a run's saved features (None: not a set metric)."""
    sm = set_metric(metric)
    if sm is None:
        return None
    return sm.influence(saved["features"], sm.reference(saved["ref_mu"], saved["ref_sigma"]))[0]
