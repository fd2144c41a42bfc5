"""Paired item-level statistics of lm-eval scores (moeaudit.pruning._lmeval_stats), against independent
computations: scores and shares counted by hand, the item sign-flip test against statsmodels' exact McNemar test on
binary items, and the decisions' calibration (skewed item difficulty, no effect) and power (planted effect) by
simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from moeaudit.pruning._lmeval_stats import answer_scores, lm_eval_answer


def _long(arms: dict[tuple, np.ndarray], *, metric="acc", higher=True, folds=1) -> pd.DataFrame:
    """arms: (criterion, fraction, seed) -> [folds, n_items] item values."""
    rows = []
    for (criterion, fraction, seed), values in arms.items():
        values = np.atleast_2d(values)
        for fold in range(folds):
            for item, v in enumerate(values[fold % len(values)]):
                rows.append({"criterion": criterion, "fraction": fraction, "seed": seed, "fold": fold,
                             "allocation": "uniform", "method": "delete", "task": "t", "metric": metric,
                             "item": item, "value": float(v), "higher_is_better": higher})
    return pd.DataFrame(rows)


def test_scores_shares_and_signflip_against_hand_and_mcnemar():
    rng = np.random.default_rng(3)
    n = 60
    none = (rng.random(n) < 0.7).astype(float)
    causal = (rng.random(n) < 0.6).astype(float)
    reap = none.copy()
    reap[:14] = 0.0  # reap loses some items the unpruned model gets right
    randoms = {("random", 0.5, s): (rng.random(n) < rng.uniform(0.3, 0.7)).astype(float) for s in range(9)}
    arms = {("none", 0.0, 0): none, ("causal", 0.5, 0): causal, ("reap", 0.5, 0): reap, **randoms}
    table = lm_eval_answer(_long(arms), n_perm=20000, n_boot=500)
    row = table[table["criterion"] == "reap"].iloc[0]
    assert row["score"] == pytest.approx(reap.mean(), abs=1e-12)
    assert row["delta_unpruned"] == pytest.approx(reap.mean() - none.mean(), abs=1e-12)
    assert row["delta_causal"] == pytest.approx(reap.mean() - causal.mean(), abs=1e-12)
    exact = mcnemar(pd.crosstab(reap, none).reindex(index=[0.0, 1.0], columns=[0.0, 1.0], fill_value=0).to_numpy(),
                    exact=True).pvalue
    assert row["p_unpruned_signflip"] == pytest.approx(exact, abs=0.01)
    exact_c = mcnemar(pd.crosstab(reap, causal).to_numpy(), exact=True).pvalue
    assert row["p_causal_signflip"] == pytest.approx(exact_c, abs=0.01)
    share = np.mean([v.mean() >= reap.mean() for v in randoms.values()])
    assert row["share_random_better"] == pytest.approx(share, abs=1e-12) and row["n_random"] == 9
    assert row["share_random_better_low"] <= share <= row["share_random_better_high"]
    assert row["decision_unpruned"] == "worse"
    med = table[table["criterion"] == "random"].iloc[0]
    assert med["score"] == pytest.approx(np.median([v.mean() for v in randoms.values()]))


def test_loglikelihood_direction_and_fold_average():
    """Per-item log-likelihoods (higher is better) from two folds are averaged per item before the comparison."""
    rng = np.random.default_rng(0)
    base = -rng.gamma(2.0, 2.0, 40)
    worse = np.stack([base - rng.gamma(1.0, 0.5, 40), base - rng.gamma(1.0, 0.5, 40)])
    table = lm_eval_answer(_long({("none", 0.0, 0): np.stack([base, base]), ("reap", 0.5, 0): worse},
                                 metric="perplexity", folds=2), n_perm=2000, n_boot=200)
    row = table[table["criterion"] == "reap"].iloc[0]
    assert row["score"] == pytest.approx(worse.mean(0).mean(), abs=1e-12) and row["n_folds"] == 2
    assert row["delta_unpruned"] < 0 and row["decision_unpruned"] == "worse"


def _simulate(effect: float, rng, n=150, seeds=10) -> pd.DataFrame:
    difficulty = rng.beta(0.6, 0.4, n)  # skewed: most items easy, a long tail of hard ones
    def draw(shift):
        return (rng.random(n) < np.clip(difficulty + shift, 0, 1)).astype(float)
    arms = {("none", 0.0, 0): draw(0.0), ("causal", 0.5, 0): draw(-0.1), ("crit", 0.5, 0): draw(-0.1 + effect)}
    arms.update({("random", 0.5, s): draw(rng.choice([-0.1, -0.2, -0.4])) for s in range(seeds)})
    return lm_eval_answer(_long(arms), n_perm=500, n_boot=200, seed=int(rng.integers(1 << 30)))


def test_decision_vs_causal_is_calibrated_and_has_power(monkeypatch):
    monkeypatch.setattr("gc.collect", lambda *a: 0)  # statsmodels' multipletests collects garbage on every call
    rng = np.random.default_rng(11)
    null = [_simulate(0.0, rng) for _ in range(120)]
    rows = [t[t["criterion"] == "crit"].iloc[0] for t in null]
    false = np.mean([r["decision_causal"] != "inconclusive" for r in rows])
    assert false <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / len(rows))
    planted = [_simulate(0.15, rng) for _ in range(30)]
    rows = [t[t["criterion"] == "crit"].iloc[0] for t in planted]
    assert np.mean([r["decision_causal"] == "better" for r in rows]) >= 0.8
    assert np.mean([r["decision_random"] == "better" for r in rows]) >= 0.8


def test_answer_scores_join():
    answer = pd.DataFrame({"criterion": ["reap", "causal"], "fraction": [0.5, 0.5], "allocation": ["uniform"] * 2,
                           "method": ["delete"] * 2, "mean_loss": [2.0, 2.1]})
    lm = lm_eval_answer(_long({("none", 0.0, 0): np.ones(5), ("reap", 0.5, 0): np.array([1, 0, 1, 1, 0.]),
                               ("causal", 0.5, 0): np.array([1, 1, 1, 0, 0.])}), n_perm=100, n_boot=50)
    joined = answer_scores(answer, lm)
    assert joined["lm_eval:t:acc"].tolist() == pytest.approx([0.6, 0.6])
    assert "lm_eval:t:acc:decision_random" in joined and len(joined) == 2
