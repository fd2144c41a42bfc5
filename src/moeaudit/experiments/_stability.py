"""Ranking stability: does a metric rank the experts of a layer the same way on two halves of the corpus?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from moeaudit import stats


def ranking_stability(model: nn.Module, sequences: Sequence, *, metrics: Sequence[str], layers: Sequence[int] | None = None,
                      n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Kendall tau between each metric's expert values on the even and odd halves of the corpus.

    A metric that cannot rank experts consistently across halves of the same corpus cannot predict anything.
    The interval is a bootstrap over experts (:func:`moeaudit.stats.kendall_tau_ci`).

    Returns:
        One row per (layer, metric): ``layer, metric, n_experts, tau, p, ci_low, ci_high``.
    """
    from moeaudit._observe import observe

    ids = [getattr(s, "input_ids", s) for s in sequences]
    if len(ids) < 2:
        raise ValueError(f"ranking stability needs at least 2 sequences to split in halves, got {len(ids)}.")
    halves = [observe(model, ids[0::2], layers=layers), observe(model, ids[1::2], layers=layers)]
    rows = []
    for layer in sorted(halves[0]["layer"].unique()):
        a = halves[0][halves[0]["layer"] == layer].sort_values("expert")
        b = halves[1][halves[1]["layer"] == layer].sort_values("expert")
        for metric in metrics:
            x, y = a[metric].to_numpy(float), b[metric].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
                rows.append({"layer": int(layer), "metric": metric, "n_experts": int(ok.sum()), "tau": np.nan,
                             "p": np.nan, "ci_low": np.nan, "ci_high": np.nan})
                continue
            res = stats.kendall_tau_ci(x[ok], y[ok], n_boot=n_boot, seed=seed)
            rows.append({"layer": int(layer), "metric": metric, "n_experts": res.n, "tau": res.tau, "p": res.p,
                         "ci_low": res.ci_low, "ci_high": res.ci_high})
    return pd.DataFrame(rows)
