"""The attribution control of the audit: records against a brute-force recomputation from the pool and
``moeaudit.attribute``; the paired test (estimate vs weight) against an independent computation and on simulations
with known truth; refusals; report section; shards, merge and resume with the experiment on."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pandas as pd
import pytest
from conftest import cached_tiny, random_ids
from typer.testing import CliRunner

import moeaudit
from moeaudit.config import RunConfig
from moeaudit.errors import ConfigError
from moeaudit.experiments import ExperimentSettings, attribution_control, attribution_vs_control, run_experiments
from moeaudit.experiments._attribution_control import answer_sentence
from moeaudit.report._attribution_control import attribution_control_blocks

LAYERS = (1, 3)


def _corpus(n=8, seed=0):
    rng = random.Random(seed)
    return [random_ids(rng.randint(30, 60), seed=seed * 100 + i) for i in range(n)]


@pytest.fixture(scope="module", params=["zero", "renormalize"])
def run(request):
    model = cached_tiny("olmoe")
    seqs = _corpus()
    settings = ExperimentSettings(layers=LAYERS, n=40, seed=3, mode=request.param)
    return model, seqs, settings, attribution_control(model, seqs, settings)


def test_records_equal_brute_force_from_the_pool_and_attribute(run):
    model, seqs, settings, result = run
    rec = result.records
    est = moeaudit.attribute(model, seqs, layers=list(LAYERS), modes=[settings.mode])
    est = est[est["weight"] != 0].set_index(["layer", "seq_id", "position", "expert"])[f"estimate_{settings.mode}"]
    pool = rec[rec["experiment"] == "pool"]
    exact = {(r.layer, r.seq_id, r.position, r.ablated_experts[0]): r.delta for r in pool.itertuples()}
    attr = rec[rec["experiment"] == "attribution"]
    assert set(attr["metric"]) == {f"attribution_{settings.mode}"} and set(attr["mode"]) == {settings.mode}
    ctrl = rec[rec["experiment"] == "control"]
    key = ["layer", "seq_id", "position"]
    assert set(map(tuple, attr[key].to_numpy())) == set(map(tuple, ctrl[key].to_numpy())) \
        == set(map(tuple, pool[key].to_numpy()))  # the control's positions, every one of them
    checked = 0
    for (layer, seq_id, pos), part in attr.groupby(key):
        roles = part.set_index("role")
        active = list(roles.loc["high", "active_experts"])
        values = np.array([est.loc[(layer, seq_id, pos, e)] for e in active])
        np.testing.assert_allclose(np.asarray(roles.loc["high", "metric_values"], float), values, rtol=1e-4,
                                   atol=1e-6)
        gaps = np.sort(values)
        if np.min(np.diff(gaps)) < 1e-4 * max(1.0, np.abs(values).max()):
            continue  # a near tie: float noise between the two computations may order it either way
        hi, lo = active[int(np.argmax(values))], active[int(np.argmin(values))]
        assert roles.loc["high", "ablated_experts"][0] == hi and roles.loc["low", "ablated_experts"][0] == lo
        # the pool's exact ΔL, bit for bit: no extra ablation
        assert roles.loc["high", "delta"] == exact[(layer, seq_id, pos, hi)]
        assert roles.loc["low", "delta"] == exact[(layer, seq_id, pos, lo)]
        assert np.isclose(roles.loc["high", "ablated_metric_value"], values.max(), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 0.9 * attr.groupby(key).ngroups


def _signflip_exact(totals: np.ndarray) -> float:
    """Two-sided sign-flip p by enumerating every sign vector (independent of moeaudit.stats)."""
    observed = abs(totals.sum())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(totals))))
    return float(np.mean(np.abs(flips @ totals) >= observed - 1e-12))


def test_paired_table_equals_an_independent_computation(run):
    _, _, settings, result = run
    rec = result.records
    d = {}
    for exp in ("attribution", "control"):
        sub = rec[rec["experiment"] == exp].pivot_table(index=["layer", "seq_id", "position"], columns="role",
                                                        values="delta")
        d[exp] = sub["high"] - sub["low"]
    table = result.tables["attribution_vs_control"].set_index("layer")
    attr_cells = result.tables["attribution_control"].set_index("layer")
    assert list(table.index) == list(LAYERS)
    for layer in LAYERS:
        a, c = d["attribution"].loc[layer], d["control"].loc[layer]
        diff = (a - c.reindex(a.index)).to_numpy()
        docs = a.index.get_level_values("seq_id").to_numpy()
        row = table.loc[layer]
        assert row["n"] == len(diff) == settings.n and row["n_docs"] == len(np.unique(docs))
        assert row["mode"] == settings.mode
        np.testing.assert_allclose([row["mean_d_attr"], row["mean_d_control"], row["attr_minus_control"]],
                                   [a.mean(), c.mean(), diff.mean()], rtol=1e-12, atol=1e-15)
        totals = pd.Series(diff).groupby(docs).sum().to_numpy()
        assert row["p_signflip"] == pytest.approx(_signflip_exact(totals), abs=1e-12)
        assert row["attr_minus_control_low"] <= diff.mean() <= row["attr_minus_control_high"]
        np.testing.assert_allclose(attr_cells.loc[layer, "cohens_d"], a.mean() / a.std(ddof=1), rtol=1e-9)
        m = len(LAYERS)
        expect = "cannot tell" if row["p_signflip"] >= 0.05 / m else ("estimate" if diff.mean() > 0 else "weight")
        assert row["answer"] == expect


def _synthetic(rng: np.random.Generator, reps: int, noise_attr: float, noise_ctrl: float, k: int = 4) -> pd.DataFrame:
    """Records of ``reps`` independent replications (one per "layer"): 10 documents of skewed sizes, ΔL lognormal
    with a per-document scale (skewed and clustered like real ΔL), each ranking a noisy copy of ΔL."""
    rows = []
    for layer in range(reps):
        for doc in range(10):
            scale = rng.lognormal(0, 1)
            for pos in range(1 + rng.poisson(rng.choice([2, 12]))):
                delta = scale * rng.lognormal(-2, 1.2, size=k)
                for exp, noise in (("attribution", noise_attr), ("control", noise_ctrl)):
                    score = delta + noise * scale * rng.standard_normal(k) * np.median(delta)
                    for role, i in (("high", int(np.argmax(score))), ("low", int(np.argmin(score)))):
                        rows.append((exp, "m", layer, doc, pos, role, float(delta[i]), [i], "zero"))
    return pd.DataFrame(rows, columns=["experiment", "model", "layer", "seq_id", "position", "role", "delta",
                                       "ablated_experts", "mode"])


def test_paired_test_holds_its_level_under_the_null_and_finds_a_planted_difference():
    rng = np.random.default_rng(19)
    reps = 200
    null = attribution_vs_control(_synthetic(rng, reps, 1.0, 1.0), n_perm=999, n_boot=200, seed=1)
    rate = float(np.mean(null["p_signflip"] < 0.05))
    assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps), rate  # exchangeable rankings: level <= alpha
    assert (null["answer"] != "cannot tell").mean() <= 0.05
    planted = attribution_vs_control(_synthetic(rng, 60, 0.05, 3.0), n_perm=999, n_boot=200, seed=1)
    assert np.mean(planted["p_signflip"] < 0.05) >= 0.8
    assert (planted["attr_minus_control"] > 0).all()
    reverse = attribution_vs_control(_synthetic(rng, 60, 3.0, 0.05), n_perm=999, n_boot=200, seed=1)
    assert np.mean((reverse["p_signflip"] < 0.05) & (reverse["attr_minus_control"] < 0)) >= 0.8
    # 60 "layers" of 10 documents: Bonferroni over them (0.05 / 60) is below the smallest sign-flip p (2 / 2^10)
    assert (reverse["answer"] == "cannot tell").all() and (planted["answer"] == "cannot tell").all()


def test_answer_sentence_says_no_more_than_the_test():
    row = {"layer": 2, "n": 40, "n_docs": 7, "attr_minus_control": 0.1, "attr_minus_control_low": -0.02,
           "attr_minus_control_high": 0.2, "p_signflip": 0.3, "answer": "cannot tell"}
    assert "cannot tell" in answer_sentence(row)
    assert "estimate separates" in answer_sentence({**row, "p_signflip": 0.001, "answer": "estimate"})
    assert "weight separates" in answer_sentence({**row, "attr_minus_control": -0.1, "p_signflip": 0.001,
                                                  "answer": "weight"})
    assert "cannot tell" in answer_sentence({**row, "p_signflip": float("nan")})


def test_report_section(run):
    _, _, _, result = run
    blocks = attribution_control_blocks(result.tables, "tiny")
    table, paragraph = blocks
    assert [r[0] for r in table.rows] == [f"L{layer}" for layer in LAYERS]
    vs = result.tables["attribution_vs_control"]
    assert [r[-1] for r in table.rows] == list(vs.sort_values("layer")["answer"])
    assert all(answer_sentence(r) in paragraph.text for r in vs.to_dict("records"))
    assert attribution_control_blocks({k: v for k, v in result.tables.items() if "attribution" not in k}, "x") == []


def test_refusals_before_any_work():
    model = cached_tiny("olmoe")
    seqs = _corpus(2)
    with pytest.raises(ConfigError, match="add control"):
        run_experiments(model, seqs, ExperimentSettings(layers=(1,), n=3), experiments=("attribution",))
    with pytest.raises(ConfigError, match="scope=token"):
        run_experiments(model, seqs, ExperimentSettings(layers=(1,), n=3, scope="sequence"),
                        experiments=("control", "attribution"))
    with pytest.raises(ConfigError, match="add control"):
        RunConfig.from_mapping({"experiments": "audit,attribution"})
    with pytest.raises(ConfigError, match="attribution"):
        RunConfig.from_mapping({"experiments": "atribution"})
    assert "attribution" in RunConfig.from_mapping({"experiments": "control,attribution"}).experiments
    assert "attribution" not in RunConfig().experiments  # opt-in


FLAGS = ["--model", "builtin:tiny-moe", "--name", "tiny", "--corpus", "builtin", "--n-docs", "6", "--max-length",
         "64", "--layers", "1,5", "--n", "10", "--n-boot", "100", "--device", "cpu", "--dtype", "float32",
         "--experiments", "control,attribution", "--no-report"]


@pytest.mark.slow
def test_shards_merge_and_resume_keep_the_attribution_tables(tmp_path):
    from moeaudit.cli import app
    from moeaudit.rundir import RunDirectory

    runner = CliRunner()
    for args in (["--out", str(tmp_path / "alone")], ["--shard", "0/2", "--out", str(tmp_path / "s0")],
                 ["--shard", "1/2", "--out", str(tmp_path / "s1")]):
        result = runner.invoke(app, ["run", *FLAGS, *args])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                                 str(tmp_path / "merged"), "--no-report"])
    assert result.exit_code == 0, result.output
    alone = RunDirectory(tmp_path / "alone").read_records()
    pd.testing.assert_frame_equal(RunDirectory(tmp_path / "merged").read_records(), alone)
    for name in ("attribution_control", "attribution_vs_control"):
        assert (tmp_path / "merged" / "tables" / f"{name}.csv").read_bytes() == \
            (tmp_path / "alone" / "tables" / f"{name}.csv").read_bytes()
    before = (tmp_path / "alone" / "tables" / "attribution_vs_control.csv").read_bytes()
    result = runner.invoke(app, ["run", *FLAGS, "--out", str(tmp_path / "alone")])  # resumes: nothing to compute
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(RunDirectory(tmp_path / "alone").read_records(), alone)
    assert (tmp_path / "alone" / "tables" / "attribution_vs_control.csv").read_bytes() == before
    assert (alone["experiment"] == "attribution").sum() == 2 * 2 * 10


@pytest.mark.parametrize("mode", ["zero", "reroute"])
def test_estimates_at_a_subset_of_positions_equal_the_full_pass(mode):
    from moeaudit.experiments._attribution_control import token_estimates
    from moeaudit.intervene._attribution import estimates, own_loss_gradients
    from moeaudit.intervene._state import clean_state

    model = cached_tiny("olmoe")
    ids = random_ids(40, seed=7)
    state = clean_state(model, ids, layers=[2], keep_cache=True)
    full = estimates(model, state, 2, own_loss_gradients(model, state, [2])[2], (mode,))[mode]
    positions = [31, 0, 17, 38, 5]
    sub = token_estimates(model, state, ids, 2, mode, positions)
    fresh = token_estimates(model, None, ids, 2, mode, positions)  # its own clean pass
    for p in positions:
        np.testing.assert_allclose(sub[p], full[p], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(fresh[p], full[p], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="positions"):
        own_loss_gradients(model, state, [2], positions=[39])
