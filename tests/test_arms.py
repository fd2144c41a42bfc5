"""Progressive arms: the per-arm cells and the paired comparison against independent computations, simulations
with a planted difference and with none, and the table and verdict that follow from them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import cached_tiny, random_ids
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from moeaudit import stats
from moeaudit.experiments import ExperimentSettings, run_experiments
from moeaudit.experiments._arms import ARM_PAIRS, arm_comparisons, progressive_cells
from moeaudit.experiments._summary import _n_perm
from moeaudit.report._tables import progressive_arms_table
from moeaudit.report._verdict import arms_verdict


@pytest.fixture(scope="module")
def records():
    model = cached_tiny("qwen3_moe")
    seqs = [random_ids(30, seed=40 + i) for i in range(8)]
    settings = ExperimentSettings(layers=(1, 3), n_progressive=24, seed=2, model_name="tiny")
    verified = SimpleNamespace(raise_if_failed=lambda: None)  # the engine's verification is tested elsewhere
    return run_experiments(model, seqs, settings, experiments=("progressive",), verification=verified).records


def _cluster_ols(values, docs):
    import statsmodels.api as sm

    fit = sm.OLS(values, np.ones((len(values), 1))).fit(cov_type="cluster", cov_kwds={"groups": docs})
    return fit.params[0], fit.bse[0]


def test_cells_match_numpy_and_statsmodels(records):
    cells = progressive_cells(records)
    prog = records[records["experiment"] == "progressive"]
    assert len(cells) == 2 * 3 * 3  # layers x arms x k
    for _, c in cells.iterrows():
        mine = prog[prog["role"] == f"{c['arm']}:{c['k']}"]
        mine = mine[mine["layer"] == c["layer"]]
        delta = mine["delta"].to_numpy()
        assert (c["n"], c["n_docs"]) == (len(delta), mine["seq_id"].nunique()) and c["n"] == 24
        assert c["mean"] == pytest.approx(delta.mean()) and c["median"] == pytest.approx(np.median(delta))
        assert c["p95"] == pytest.approx(np.percentile(delta, 95))
        mean, se = _cluster_ols(delta, mine["seq_id"].to_numpy())
        half = c["ci_high"] - c["mean"]
        assert half == pytest.approx(sps.t.ppf(0.975, c["n_docs"] - 1) * se, rel=1e-9)


def test_comparisons_match_an_independent_computation(records):
    table = arm_comparisons(records, sesoi=0.05)
    prog = records[records["experiment"] == "progressive"]
    assert len(table) == 2 * 3 * len(ARM_PAIRS)
    for _, r in table.iterrows():
        cell = prog[(prog["layer"] == r["layer"]) & (prog["k"] == r["k"])]
        by_arm = {arm: {(s, p): d for s, p, d in zip(g["seq_id"], g["position"], g["delta"])}
                  for arm, g in cell.groupby(cell["role"].str.split(":").str[0])}
        keys = sorted(by_arm[r["arm_a"]])
        diff = np.array([by_arm[r["arm_a"]][key] - by_arm[r["arm_b"]][key] for key in keys])
        docs = np.array([key[0] for key in keys])
        mean, se = _cluster_ols(diff, docs)
        assert r["mean_diff"] == pytest.approx(mean, abs=1e-12) and r["n"] == len(diff)
        assert r["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1))
        assert r["ci_low"] < mean < r["ci_high"]
        assert r["p_cluster"] == stats.sign_flip_test(diff, docs, n_perm=stats.N_PERM, seed=0)
        # the margin: min(0.05 nats, 10% of the layer's mean ΔL at k averaged over the orders)
        scale = np.mean([np.mean(list(v.values())) for v in by_arm.values()])
        margin = min(0.05, 0.1 * abs(scale))
        assert r["scale"] == pytest.approx(scale, rel=1e-12) and r["sesoi"] == pytest.approx(margin, rel=1e-12)
        t_low, t_high = (mean + margin) / se, (mean - margin) / se
        df = len(np.unique(docs)) - 1
        assert r["tost_p"] == pytest.approx(max(sps.t.sf(t_low, df), sps.t.cdf(t_high, df)), rel=1e-9)
    for column, corrected in (("p_cluster", "p_holm"), ("tost_p", "tost_p_holm")):
        reject, p_holm, _, _ = multipletests(table[column].fillna(1.0), alpha=0.05, method="holm")
        np.testing.assert_allclose(table[corrected].fillna(1.0), p_holm)
    assert (table["significant"] == (table["p_holm"] < 0.05)).all()


def _synthetic(rng, *, planted: dict, noise: float, n_docs: int = 30, per_doc: int = 6, layers=(0, 1),
               ks=(1, 2)) -> pd.DataFrame:
    """Progressive records: ΔL = k x (document effect + position effect), shared by every arm at a position, plus
    arm noise and the planted shift of (layer, arm)."""
    arms = ("highest", "lowest", "random")
    layer, doc, pos, k, arm = (a.ravel() for a in np.meshgrid(layers, range(n_docs), range(per_doc), ks,
                                                               range(len(arms)), indexing="ij"))
    doc_effect = rng.normal(0, 0.3, (len(layers), n_docs))
    pos_effect = rng.exponential(0.2, (len(layers), n_docs, per_doc))
    li = np.searchsorted(layers, layer)
    shift = np.array([planted.get((la, arms[a]), 0.0) for la, a in zip(layer, arm)])
    delta = (doc_effect[li, doc] + pos_effect[li, doc, pos]) * k + rng.normal(0, noise, layer.size) + shift
    return pd.DataFrame({"experiment": "progressive", "model": "m", "n_layers": 4, "layer": layer, "seq_id": doc,
                         "position": pos, "k": k, "role": [f"{arms[a]}:{kk}" for a, kk in zip(arm, k)],
                         "delta": delta})


def test_planted_difference_and_equivalence_are_found():
    recs = _synthetic(np.random.default_rng(1), planted={(1, "highest"): 0.5}, noise=0.01)
    table = arm_comparisons(recs, sesoi=0.05, sesoi_rel=1e9, n_perm_for=lambda m: 999)
    decisions = {(r["layer"], r["arm_a"], r["arm_b"]): r["decision"] for _, r in table.iterrows()}
    assert set(table.loc[table["layer"] == 0, "decision"]) == {"equivalent"}
    assert decisions[(1, "highest", "lowest")] == decisions[(1, "highest", "random")] == "differs"
    assert decisions[(1, "lowest", "random")] == "equivalent"
    planted = table[(table["layer"] == 1) & (table["arm_a"] == "highest")]
    assert (planted["ci_low"] < 0.5).all() and (planted["ci_high"] > 0.5).all()
    text = arms_verdict(table)
    assert "4 differ, 8 are equivalent within the margin (TOST; margin min(±0.05 nats, 1e+11% of the layer's mean ΔL" \
        in text and "0 are inconclusive" in text
    assert "At L0 the order does not matter beyond the margin of mean ΔL" in text
    assert "It matters at L1: highest weight first costs more than" in text
    assert "inconclusive:" not in text


def test_sign_draws_grow_with_the_number_of_comparisons():
    """60 comparisons with a planted difference everywhere: 999 draws would floor p at 0.001, above Holm's
    0.05 / 60; with the summary's rule (20 m / α draws) every comparison can reject."""
    planted = {(layer, "highest"): 1.0 for layer in range(10)}
    recs = _synthetic(np.random.default_rng(5), planted=planted, noise=0.01, layers=tuple(range(10)))
    floored = arm_comparisons(recs, n_perm_for=lambda m: 999)
    assert (floored.loc[floored["arm_a"] == "highest", "decision"] == "inconclusive").all()
    table = arm_comparisons(recs, n_perm_for=_n_perm)
    hi = table[table["arm_a"] == "highest"]
    assert len(table) == 60 and (hi["n_perm"] == _n_perm(60)).all() and (hi["p_holm"] < 0.05).all()
    assert (hi["decision"] == "differs").all()
    assert (table.loc[table["arm_a"] == "lowest", "decision"] == "equivalent").all()


def test_noise_without_effect_is_inconclusive_not_equivalent():
    recs = _synthetic(np.random.default_rng(1), planted={}, noise=0.5, n_docs=10, per_doc=3)
    table = arm_comparisons(recs, sesoi=0.05, sesoi_rel=1e9, n_perm_for=lambda m: 999)
    assert set(table["decision"]) == {"inconclusive"}
    text = arms_verdict(table)
    assert "0 differ, 0 are equivalent" in text and "no claim either way" in text
    assert "does not matter" not in text and "It matters" not in text


def test_family_wise_error_under_no_effect(monkeypatch):
    """40 simulated runs without any arm effect: a 'differs' anywhere in a run (12 comparisons, Holm) in at most
    about 5% of runs (binomial sd 3.4%)."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # statsmodels' Holm collects garbage on every call (0.1 s)
    rng = np.random.default_rng(2)
    runs_with_a_difference = 0
    for _ in range(40):
        table = arm_comparisons(_synthetic(rng, planted={}, noise=0.3, n_docs=20, per_doc=4), n_perm_for=lambda m: 199)
        runs_with_a_difference += bool((table["decision"] == "differs").any())
    assert runs_with_a_difference / 40 <= 0.15


def test_everything_equivalent_gives_the_strong_sentence_and_the_table_notes():
    recs = _synthetic(np.random.default_rng(3), planted={}, noise=0.005)
    table = arm_comparisons(recs, sesoi=0.1, sesoi_rel=1e9, n_perm_for=lambda m: 999)
    text = arms_verdict(table)
    assert "At every tested layer and depth the order does not matter beyond the margin of mean ΔL" in text
    t = progressive_arms_table(table, "m")
    assert len(t.rows) == 12 and t.rows[0][:3] == ["L0", "1", "highest − lowest"] and t.rows[0][-1] == "equivalent"
    assert "min(±0.1 nats" in t.notes and "12 comparisons" in t.notes and "unit of inference: the document" in t.notes


def test_single_arm_has_no_comparison():
    recs = _synthetic(np.random.default_rng(4), planted={}, noise=0.1, n_docs=4, per_doc=2)
    recs = recs[recs["role"].str.startswith("lowest")]
    assert arm_comparisons(recs).empty and arms_verdict(arm_comparisons(recs)) is None
    assert set(progressive_cells(recs)["arm"]) == {"lowest"}


def test_verdict_counts_what_the_cli_counts():
    """A comparison that differs and is also equivalent within the margin is counted as 'differs, within bounds'
    (the CLI's count), not among the equivalent ones."""
    recs = _synthetic(np.random.default_rng(1), planted={(1, "highest"): 0.5}, noise=0.01)
    table = arm_comparisons(recs, sesoi=0.05, sesoi_rel=1e9, n_perm_for=lambda m: 999)
    i = table.index[table["decision"] == "equivalent"][0]
    table.loc[i, ["significant", "decision"]] = [True, "differs, within bounds"]
    text = arms_verdict(table)
    counts = table["decision"].value_counts()
    assert (f"{counts['differs']} differ, 1 differs but stays within the margin, {counts['equivalent']} are "
            "equivalent within the margin") in text


def test_long_arms_table_lists_only_what_is_not_equivalent():
    planted = {(layer, "highest"): 1.0 for layer in range(3)}
    recs = _synthetic(np.random.default_rng(5), planted=planted, noise=0.01, layers=tuple(range(10)))
    table = arm_comparisons(recs, n_perm_for=_n_perm)
    t = progressive_arms_table(table, "m")
    n_equivalent = int((table["decision"] == "equivalent").sum())
    assert len(table) == 60 and n_equivalent > 0
    assert len(t.rows) == 60 - n_equivalent and all(row[-1] != "equivalent" for row in t.rows)
    assert f"The {n_equivalent} equivalent comparisons are not listed" in t.notes


def test_the_margin_scales_with_the_layer():
    """A layer where removing experts costs little gets a margin of 10% of its mean ΔL, not 0.05 nats: the same
    0.01-nat difference between orders is equivalent where ΔL is about 1 nat and not where ΔL is about 0.02."""
    rng = np.random.default_rng(5)
    rows = []
    for layer, base in ((0, 1.0), (1, 0.02)):
        for doc in range(40):
            for pos in range(6):
                common = base + rng.normal(0, 0.002)
                for arm, shift in (("highest", 0.01), ("lowest", 0.0)):
                    rows.append({"experiment": "progressive", "model": "m", "layer": layer, "k": 1,
                                 "role": f"{arm}:1", "seq_id": doc, "position": pos, "n_layers": 2,
                                 "delta": common + shift + rng.normal(0, 0.001)})
    table = arm_comparisons(pd.DataFrame(rows), sesoi=0.05, sesoi_rel=0.1, n_perm_for=lambda m: 999)
    by_layer = table.set_index("layer")
    assert by_layer.loc[0, "sesoi"] == pytest.approx(0.05) and by_layer.loc[0, "decision"] == "differs, within bounds"
    assert by_layer.loc[1, "sesoi"] == pytest.approx(0.1 * by_layer.loc[1, "scale"])
    assert by_layer.loc[1, "decision"] == "differs"  # 0.01 nats is half of that layer's ΔL: beyond 10%
    assert "10% of the layer's mean ΔL" in arms_verdict(table)
