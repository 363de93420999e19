"""Precision/recall/density/coverage equal the `prdc` package's values on the same features."""

from __future__ import annotations

import numpy as np
import pytest

from evals.metrics import prdc as P


def _features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)) * (1 + 0.3 * rng.random(dim)) + shift


@pytest.mark.parametrize("n_real,n_fake,dim,k,shift", [(300, 250, 16, 5, 0.3), (1500, 1100, 64, 5, 0.5),
                                                       (200, 180, 8, 3, 1.0)])
def test_matches_the_prdc_package(n_real, n_fake, dim, k, shift):
    from prdc import compute_prdc as reference

    real, fake = _features(n_real, dim, 0), _features(n_fake, dim, 1, shift)
    ref = reference(real, fake, nearest_k=k)
    ours = P.compute_prdc(real, fake, nearest_k=k, space="test", n_resamples=50)
    for name in P.NAMES:
        assert ours[name].value == pytest.approx(float(ref[name]), rel=1e-12, abs=0), name
        lo, hi = ours[name].ci
        assert lo <= ours[name].value <= hi and ours[name].higher_is_better is True
    # the two sets differ, so no value is trivially 0 or 1 (the test can fail)
    assert 0 < ours["precision"].value < 1 and 0 < ours["coverage"].value < 1
    assert ours["precision"].per_sample.shape == (n_fake,) and ours["recall"].per_sample is None


def test_identical_sets_and_errors():
    x = _features(100, 8, 3)
    same = P.compute_prdc(x, x, n_resamples=0)
    assert same["precision"].value == 1.0 and same["coverage"].value == 1.0 and same["precision"].ci is None
    with pytest.raises(ValueError, match="dims differ"):
        P.compute_prdc(x, x[:, :4])
    with pytest.raises(ValueError, match="nearest_k"):
        P.compute_prdc(x[:5], x, nearest_k=5)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        P.compute_prdc(bad, x)
