"""FID statistics: running moments, the Fréchet distance, KID, and the on-disk statistics cache.

- `FeatureStats`: running float64 sum, sum of outer products and count; `merge` adds shards
  exactly (torchrun ranks), `save`/`load` as .npz (the file also holds `mu`/`sigma`, so
  pytorch-fid can read it).
- `frechet_distance(mu1, sigma1, mu2, sigma2)` (and the factor helpers `compute_fid` reuses for
  its bootstrap) and `kid(features1, features2)`.
- The reference-statistics cache: `default_cache_dir`, `cache_path(key)`, `load_cached(...)`,
  and `load_stats_file` for our .npz or a pytorch-fid `--save-stats` file.
Pure numpy (torch only to accept tensors): usable without any network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATS_FORMAT = "cm3eval-feature-stats-v1"


# --------------------------------------------------------------------------------------------
# streaming statistics


@dataclass(eq=False)  # arrays inside: the generated __eq__ would be ambiguous
class FeatureStats:
    """Running moments of a feature set; mean and covariance come out of them exactly."""

    dim: int
    n: int = 0
    sum: np.ndarray | None = None  # [dim] float64
    sum_outer: np.ndarray | None = None  # [dim, dim] float64, sum of x x^T
    meta: dict[str, Any] = field(default_factory=dict)  # protocol, extractor id, ... (compatibility checks)
    keep_features: bool = False  # also keep the raw features (needed by KID and the bootstrap CI)
    _chunks: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"FeatureStats: dim must be >= 1, got {self.dim}")
        if self.sum is None:
            self.sum = np.zeros(self.dim, np.float64)
        if self.sum_outer is None:
            self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def from_features(cls, features, *, keep_features: bool = False, meta: dict | None = None) -> FeatureStats:
        x = as_feature_matrix(features)
        stats = cls(x.shape[1], keep_features=keep_features, meta=dict(meta or {}))
        return stats.update(x)

    def update(self, features) -> FeatureStats:
        x = as_feature_matrix(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: features have dim {x.shape[1]}, the statistics have dim {self.dim}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        if self.keep_features:
            self._chunks.append(x)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sample sets (a new object; sums add exactly)."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims differ ({self.dim} vs {other.dim})")
        check_compatible(self.meta, other.meta, "FeatureStats.merge")
        keep = self.keep_features and other.keep_features
        out = FeatureStats(self.dim, self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer,
                           {**other.meta, **self.meta}, keep)
        if keep:
            out._chunks = [*self._chunks, *other._chunks]
        return out

    @property
    def features(self) -> np.ndarray | None:
        if not self.keep_features:
            return None
        if len(self._chunks) != 1:  # consolidate once so repeated access is cheap
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim))]
        return self._chunks[0]

    @property
    def mu(self) -> np.ndarray:
        self._need_samples(1)
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by n-1), as numpy.cov(rowvar=False) / pytorch-fid.

        From raw float64 moments; the cancellation error, ~1e-16 * (mean/std)^2 relative, is
        negligible for pooled activations (mean and spread of the same order)."""
        self._need_samples(2)
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry; rounding in the outer products may break it

    def _need_samples(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"FeatureStats: need at least {k} samples, have {self.n}")

    def save(self, path: str | os.PathLike) -> None:
        """Atomic .npz write (a killed job leaves no half-written cache file)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATS_FORMAT), "n": np.array(self.n, np.int64), "sum": self.sum,
            "sum_outer": self.sum_outer, "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.n >= 2:  # pytorch-fid reads only these two
            arrays["mu"], arrays["sigma"] = self.mu, self.sigma
        feats = self.features
        if feats is not None:
            # float32 halves the file and is lossless for network outputs (which are float32).
            as32 = feats.astype(np.float32)
            arrays["features"] = as32 if np.array_equal(as32, feats) else feats
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != STATS_FORMAT:
                    raise ValueError(f"not a {STATS_FORMAT} file (keys: {sorted(z.files)})")
                n = int(z["n"])
                s = np.asarray(z["sum"], np.float64)
                so = np.asarray(z["sum_outer"], np.float64)
                meta = json.loads(str(z["meta"]))
                feats = np.asarray(z["features"], np.float64) if "features" in z.files else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read feature statistics: {e}") from e
        d = s.shape[0] if s.ndim == 1 else -1
        if d < 1 or so.shape != (d, d) or n < 0 or not isinstance(meta, dict):
            raise ValueError(f"{path}: inconsistent feature statistics (sum {s.shape}, sum_outer {so.shape}, n {n})")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(so))):
            raise ValueError(f"{path}: feature statistics contain NaN or inf")
        if feats is not None and feats.shape != (n, d):
            raise ValueError(f"{path}: stored features have shape {feats.shape}, expected {(n, d)}")
        stats = cls(d, n, s, so, meta, keep_features=feats is not None)
        if feats is not None:
            stats._chunks = [feats]
        return stats


def as_feature_matrix(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"features contain NaN or inf ({bad} of {x.shape[0]} rows)")
    return x


def check_compatible(a: dict, b: dict, where: str) -> None:
    """Statistics from different protocols or networks must never be compared or merged."""
    for key in ("protocol", "extractor"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ValueError(f"{where}: {key} differs ({a[key]!r} vs {b[key]!r}); recompute one side")


# --------------------------------------------------------------------------------------------
# distances


def check_moments(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"frechet_distance: {which} has mu {mu.shape} and sigma {sigma.shape}; need [D] and [D,D]")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"frechet_distance: {which} statistics contain NaN or inf")


def _psd_eigenvalues(w: np.ndarray, what: str) -> np.ndarray:
    """Clamp the rounding-level negative eigenvalues of a PSD matrix; a real negative one is an error."""
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -1e-6 * scale:
        raise ValueError(f"frechet_distance: {what} is not positive semi-definite (eigenvalue {w.min():.3g})")
    return np.clip(w, 0.0, None)


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A with A A^T = sigma: Cholesky when sigma is positive definite (cheap), else the PSD square root."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:  # singular, e.g. fewer samples than dimensions
        w, v = np.linalg.eigh(sigma)
        w = _psd_eigenvalues(w, "sigma1")
        return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(factor1: np.ndarray, sigma2: np.ndarray) -> float:
    # With sigma1 = A A^T, sigma1 sigma2 is similar to A^T sigma2 A, a symmetric PSD matrix: same
    # eigenvalues, but `eigvalsh` finds them faster and exactly real (scipy's sqrtm and the
    # general `eigvals` of the product are both slower and return complex rounding noise).
    m = factor1.T @ sigma2 @ factor1
    w = _psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2), "sigma1 sigma2")
    return float(np.sqrt(w).sum())


def low_rank_factor(features: np.ndarray) -> np.ndarray | None:
    """Centred features / sqrt(n-1): a D x n factor of their covariance, when n-1 < D (else None)."""
    n, dim = features.shape
    if n - 1 >= dim:
        return None
    return (features - features.mean(axis=0)).T / np.sqrt(n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2), in float64.

    tr sqrt(s1 s2) = sum of square roots of the eigenvalues of s1 s2 (tiny negative rounding
    eigenvalues clamped to 0). Agrees with pytorch-fid's scipy `sqrtm` version.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    check_moments(mu1, sigma1, "first")
    check_moments(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: feature dims differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(psd_factor(sigma1), sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


@dataclass
class KID:
    mean: float
    std: float
    subset_size: int
    subsets: int


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, gamma: float, coef0: float, degree: int) -> float:
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    # Unbiased within-set terms drop the diagonal; the cross term keeps all m*m pairs.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(features1, features2, *, subset_size: int = 1000, subsets: int = 100, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> KID:
    """Kernel Inception Distance: unbiased MMD^2, polynomial kernel (x.y/D + 1)^3, over random subsets.

    Subsets as torch-fidelity draws them (`RandomState(seed).choice` without replacement, first
    set then second, per subset; its default seed is 2020); the subset size is clipped to the
    smaller set. Reports mean and (population) std over subsets. Computed in float64.
    """
    x, y = as_feature_matrix(features1), as_feature_matrix(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"kid: need at least 2 samples per set, have {x.shape[0]} and {y.shape[0]}")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        xi = x[rng.choice(x.shape[0], m, replace=False)]
        yi = y[rng.choice(y.shape[0], m, replace=False)]
        mmds[i] = _mmd2_unbiased(xi, yi, g, coef0, degree)
    return KID(float(mmds.mean()), float(mmds.std()), m, subsets)



# --------------------------------------------------------------------------------------------
# statistics files and the reference cache


def load_stats_file(path: Path) -> FeatureStats | tuple[np.ndarray, np.ndarray]:
    """Our .npz, or a pytorch-fid `--save-stats` file (mu and sigma only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files:
                if "mu" not in z.files or "sigma" not in z.files:
                    raise ValueError(f"neither cm3eval feature statistics nor a pytorch-fid stats file "
                                     f"(keys: {sorted(z.files)})")
                return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read statistics: {e}") from e
    return FeatureStats.load(path)



def default_cache_dir() -> Path:
    """Where reference statistics are cached: <the package cache>/fid-stats (tasks.cache: $CM3EVAL_CACHE,
    else $XDG_CACHE_HOME/cm3eval, else ~/.cache/cm3eval)."""
    from tasks.cache import cache_dir

    return cache_dir("fid-stats")


def cache_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of one key (image set fingerprint, resolution, protocol, extractor id)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"ref-{digest}.npz"


def load_cached(path: Path, key: dict[str, Any], n_files: int, keep_features: bool) -> FeatureStats | None:
    """The cached statistics at `path` when they match `key` (else None, with a warning if the
    file exists but is unreadable or stale: a cache is never trusted blindly)."""
    if not path.exists():
        return None
    try:
        stats = FeatureStats.load(path)
        if any(stats.meta.get(k) != v for k, v in key.items()) or stats.n != n_files:
            raise ValueError("its key does not match this image set / protocol / network")
    except ValueError as e:
        warnings.warn(f"ignoring FID reference cache {path}: {e}; recomputing", stacklevel=3)
        return None
    if keep_features and stats.features is None:
        return None  # made without features; KID / the bootstrap need them: recompute
    return stats
