"""Cost of compare's paired FD CI (reports/paired.py) against the plain paired bootstrap, on random
2048-d features: `PYTHONPATH=. python scripts/bench_paired_fd.py [n ...]` (default 5000 30000).

The linearised CI is timed whole (2,000 resamples); the plain bootstrap, which recomputes a
covariance and a matrix square root per resample and run, is timed for one resample of one run
and multiplied by 2,000 x 2. Both in the same process, one after the other."""

from __future__ import annotations

import sys
import time

import numpy as np

from evals.metrics.fid_stats import frechet_distance
from reports.paired import paired_set_delta


def main(sizes: list[int], d: int = 2048, n_resamples: int = 2000) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4096, d))
    ref_mu, ref_sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for n in sizes:
        base = rng.normal(size=(n, d)).astype(np.float32)
        new = (base + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
        ids = np.array([str(i) for i in range(n)])
        saved = [{"ids": ids, "features": x, "ref_mu": ref_mu, "ref_sigma": ref_sigma} for x in (base, new)]
        t = time.perf_counter()
        paired_set_delta("FID", *saved, n_resamples=n_resamples)
        linearised = time.perf_counter() - t
        t = time.perf_counter()
        s = base[rng.integers(0, n, n)].astype(np.float64)
        frechet_distance(s.mean(0), np.cov(s, rowvar=False), ref_mu, ref_sigma)
        plain = (time.perf_counter() - t) * n_resamples * 2
        print(f"n={n} d={d}: linearised paired CI {linearised:.1f} s; plain paired bootstrap ~{plain:.0f} s "
              f"({plain / linearised:.0f}x)", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [5000, 30000])
