"""``moeaudit validate``: calibration and power of the run's tests on its own records, into ``validation.json``."""

from __future__ import annotations

import time
from pathlib import Path

from moeaudit.errors import RunDirectoryError

VALIDATION = "validation.json"


def validate(run_dir: str | Path, *, n_families: int = 200, n_power_draws: int = 40) -> dict:
    """Check the run's tests against a null that holds by construction and against planted effects.

    Reuses only the run's records (the single-expert pool: no model, no new ablation) and writes
    ``validation.json`` atomically into ``run_dir`` (see :mod:`moeaudit.experiments._calibration` for every
    quantity). Keys: ``null_rate`` ({test: {rate, ci_low, ci_high, n_draws}}, α = .05 uncorrected), ``fwer``
    (family-wise rate of the decision rule under the Bonferroni correction), ``random_ranking_rate``, ``power``
    (rows of strength, n, rate), ``mde_d`` (minimum detectable d at 80 % power of the token-level cell rule), and for
    the rule that decides (:mod:`moeaudit.experiments._rule_power`): ``null_rate_skewed`` and ``null_rate_docflip``
    (same shape as ``null_rate``; ``*_corrected`` at the family's corrected α), ``power_rule`` (rows of scope =
    "layer L" or "pooled", strength, n, rate), ``p_detect_ceiling`` and ``n_needed``; and provenance.

    Raises:
        RunDirectoryError: ``run_dir`` is not a run directory or holds no single-expert pool.
    """
    from moeaudit.experiments._calibration import calibrate, family_cells
    from moeaudit.experiments._pool import pools
    from moeaudit.experiments._rule_power import decision_checks
    from moeaudit.rundir import RunDirectory

    start = time.perf_counter()
    rd = RunDirectory(run_dir)
    manifest = rd.manifest()
    records = rd.read_records()
    if records.empty:
        raise RunDirectoryError(f"{rd.path} holds no finished cell yet (records/ is empty); run or resume it first.")
    layer_pools = pools(records)
    if not layer_pools:
        raise RunDirectoryError(f"{rd.path} holds no single-expert pool (experiment 'pool' records): it was written "
                                "before moeaudit recorded the pool, or ran no single-expert experiment. Re-run its "
                                "cells (audit / control) into a new directory to validate it.")
    metrics = rd.read_parquet("metrics.parquet")
    by_layer = {}
    for (_, layer), pool in layer_pools.items():
        listed = metrics.loc[metrics["layer"] == layer, "expert"] if metrics is not None else []
        n_experts = max(int(pool.experts.max()) + 1, int(max(listed)) + 1 if len(listed) else 0)
        by_layer[layer] = (pool, n_experts)
    try:
        family = family_cells(records)
        seed = int(manifest["config"].get("seed", 0))
        result = calibrate(by_layer, family, seed=seed, n_families=n_families, n_power_draws=n_power_draws)
        result.update(decision_checks(by_layer, family[1], seed=seed, n_power_draws=2 * n_power_draws))
    except ValueError as exc:
        raise RunDirectoryError(f"{rd.path}: {exc}") from None
    result = {"run": str(rd.path), "model": str(records["model"].iloc[0]), "n_records": int(len(records)), **result,
              "seconds": round(time.perf_counter() - start, 2)}
    rd.write_json(VALIDATION, result)
    return result
