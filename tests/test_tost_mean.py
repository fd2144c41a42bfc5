"""TOST on the raw mean with a document-clustered standard error: against statsmodels and scipy, and calibrated by
simulation with documents as the unit (inside the bounds, on a bound, far outside)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import tost_mean


def _clustered(rng, n_docs: int, shift: float = 0.0, doc_sd: float = 0.3):
    """Positions in documents of 3..15 positions: a shared document effect plus skewed position noise (both mean
    zero), plus ``shift``."""
    sizes = rng.integers(3, 16, size=n_docs)
    docs = np.repeat(np.arange(n_docs), sizes)
    return rng.normal(0, doc_sd, n_docs)[docs] + rng.exponential(1.0, docs.size) - 1.0 + shift, docs


def test_matches_statsmodels_cluster_robust_t():
    import statsmodels.api as sm

    d, docs = _clustered(np.random.default_rng(1), 17, shift=0.05)
    fit = sm.OLS(d, np.ones((d.size, 1))).fit(cov_type="cluster", cov_kwds={"groups": docs})
    mean, se, df = fit.params[0], fit.bse[0], 16
    r = tost_mean(d, docs, sesoi=0.3)
    assert r.se == pytest.approx(se, rel=1e-10) and r.df == df
    assert r.p_lower == pytest.approx(sps.t.sf((mean + 0.3) / se, df), rel=1e-9)
    assert r.p_upper == pytest.approx(sps.t.cdf((mean - 0.3) / se, df), rel=1e-9)
    assert r.p == max(r.p_lower, r.p_upper)


def _rate(shift: float, sesoi: float, n_sims: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sims):
        d, docs = _clustered(rng, 30, shift=shift)
        hits += tost_mean(d, docs, sesoi=sesoi).p < 0.05
    return hits / n_sims


def test_equivalence_only_inside_the_bounds():
    """Equivalent data and a bound wide enough: nearly always; on the bound: at most about alpha (binomial sd
    1.3% at 300 simulations); far outside: never."""
    assert _rate(0.0, 0.6, 200, 31) > 0.8
    assert _rate(0.6, 0.6, 300, 32) <= 0.085
    assert _rate(-0.6, 0.6, 300, 34) <= 0.085
    assert _rate(1.2, 0.6, 200, 33) == 0.0


def test_degenerate_and_bad_input():
    docs = np.repeat(np.arange(4), 3)
    assert np.isnan(tost_mean(np.zeros(12), docs, sesoi=0.1).p)  # constant D: no spread to test with
    assert np.isnan(tost_mean(np.arange(12.0), np.zeros(12), sesoi=0.1).p)  # one document
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sesoi must be a positive number"):
            tost_mean(np.arange(12.0), docs, sesoi=bad)
