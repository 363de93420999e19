"""Fréchet distance speed: ours (two symmetric eigendecompositions) beside pytorch-fid (scipy sqrtm).

Both run on the same mean/covariance pair, built from synthetic Inception-like features
(non-negative, correlated, more samples than dimensions so the covariances have full rank).
`evals.bench.metrics` calls `run_fid_bench()`; `python -m evals.bench.fid` prints it alone.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
# numpy and the metric are imported inside the functions: the bench command is mounted at start-up.


def synthetic_stats(dim: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two feature sets like pooled ReLU activations: a shared low-rank structure plus noise, shifted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim // 8, dim)) / np.sqrt(dim // 8)
    out = []
    for shift in (0.0, 0.1):
        z = rng.standard_normal((n, dim // 8)) @ mix + 0.5 * rng.standard_normal((n, dim)) + shift
        f = np.maximum(z, 0.0)
        out += [f.mean(axis=0), np.cov(f, rowvar=False)]
    return out[0], out[1], out[2], out[3]


def run_fid_bench(dim: int = 2048, n: int | None = None, seed: int = 0, repeats: int = 1) -> dict[str, Any]:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from evals.metrics.fid_stats import frechet_distance

    n = n or 2 * dim
    mu1, s1, mu2, s2 = synthetic_stats(dim, n, seed)
    ours_t, ref_t = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's `disp` argument, used by pytorch-fid
        small = synthetic_stats(16, 64, seed)
        frechet_distance(*small), calculate_frechet_distance(*small)  # warm up BLAS/LAPACK threads for both
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = frechet_distance(mu1, s1, mu2, s2)
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = float(calculate_frechet_distance(mu1, s1, mu2, s2))
            ref_t.append(time.perf_counter() - t0)
    ours_s, ref_s = min(ours_t), min(ref_t)
    return {"dim": dim, "n": n, "fd_ours": ours, "fd_pytorch_fid": ref, "rel_diff": abs(ours - ref) / abs(ref),
            "ours_s": ours_s, "pytorch_fid_s": ref_s, "speedup": ref_s / ours_s, "repeats": repeats}


if __name__ == "__main__":
    print(json.dumps(run_fid_bench()))
