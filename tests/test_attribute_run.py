"""``moeaudit attribute``: the agreement statistics against independent computations and simulations, and the run
directory end to end on the embedded model (rows recomputed by the engine and by autograd, resume, refusals)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from moeaudit.errors import ConfigError, CorpusError, RunDirectoryError
from moeaudit.run.attribution import (
    AGREEMENT_COLUMNS,
    AttributeConfig,
    agreement_table,
    attribution_run,
    removal_costs,
)
from moeaudit.run.attribution._agreement import _pearson_ci, within_token_pairs
from moeaudit.stats import paired_test


def synthetic(n_docs=20, per_doc=15, k=4, slope=1.0, noise=0.1, seed=0, related=True) -> pd.DataFrame:
    """Pool-like rows: k active experts at per_doc positions of n_docs documents; heavy-tailed exact ΔL with a
    document effect; the estimate is ``slope``-scaled truth plus noise (``related``) or independent of it."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_docs):
        doc_effect = rng.standard_t(3) * 0.3
        for p in range(per_doc):
            exact = rng.lognormal(-2, 1.2, size=k) * rng.choice([-1, 1], size=k, p=[0.2, 0.8]) + doc_effect * 0.1
            est = (exact / slope + noise * rng.standard_normal(k)) if related else \
                rng.lognormal(-2, 1.2, size=k) + doc_effect * 0.1
            weight = rng.dirichlet(np.ones(k))
            experts = rng.choice(16, size=k, replace=False)
            for j in range(k):
                rows.append((d, p, 1, int(experts[j]), weight[j], est[j], exact[j]))
    return pd.DataFrame(rows, columns=["doc_id", "position", "layer", "expert", "weight", "estimate_zero",
                                       "exact_zero"])


def test_agreement_against_scipy_and_brute_force():
    frame = synthetic(noise=0.02)
    importance = removal_costs(frame, ["zero"], 16)
    table = agreement_table(frame, importance, ["zero"], 16, n_boot=200, n_perm=999)
    assert list(table.columns) == list(AGREEMENT_COLUMNS)
    row = table.iloc[0]
    x, y = frame["estimate_zero"].to_numpy(), frame["exact_zero"].to_numpy()
    assert row["pearson"] == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-12)
    assert row["spearman"] == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert row["slope"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    assert row["sign_agree"] == pytest.approx(np.mean(np.sign(x) == np.sign(y)))
    # Definition 2.1 brute force: per position, exact ΔL of the argmax and argmin of the estimate
    high, low, docs = [], [], []
    for (d, _p), part in frame.groupby(["doc_id", "position"]):
        e = part["estimate_zero"].to_numpy()
        high.append(part["exact_zero"].to_numpy()[e.argmax()])
        low.append(part["exact_zero"].to_numpy()[e.argmin()])
        docs.append(d)
    expected = paired_test(high, low, clusters=docs, n_perm=999)
    assert row["d_attr"] == pytest.approx(expected.cohens_d, rel=1e-12)
    assert row["p_attr_t"] == pytest.approx(expected.p_t, rel=1e-12)
    pairs = within_token_pairs(frame, "exact_zero", "weight")
    assert len(pairs) == 20 * 15
    assert row["verdict"] == "stands in" and bool(row["significant_attr"])
    assert row["map_spearman"] > 0.8


def test_planted_and_null_verdicts():
    miscalibrated = agreement_table(f := synthetic(slope=0.25, noise=0.01), removal_costs(f, ["zero"], 16),
                                    ["zero"], 16, n_boot=200, n_perm=999).iloc[0]
    assert miscalibrated["slope"] == pytest.approx(0.25, rel=0.1)
    assert miscalibrated["verdict"] == "ranks only"  # ranks like ablation but its values are not ΔL
    null = agreement_table(f := synthetic(related=False), removal_costs(f, ["zero"], 16), ["zero"], 16,
                           n_boot=200, n_perm=999).iloc[0]
    assert null["verdict"] == "does not stand in" and not bool(null["significant_attr"])
    one_doc = agreement_table(f := synthetic(n_docs=1), removal_costs(f, ["zero"], 16), ["zero"], 16,
                              n_boot=50, n_perm=99).iloc[0]
    assert one_doc["verdict"] == "cannot tell"


def test_pearson_interval_covers_zero_under_a_clustered_null():
    """Skewed values with document effects in both columns and no row-level relation: the document bootstrap
    interval covers the true correlation 0 at about its nominal rate (a row bootstrap would not)."""
    rng = np.random.default_rng(1)
    covered = 0
    sims = 120
    for s in range(sims):
        docs = np.repeat(np.arange(25), 12)
        x = rng.lognormal(0, 1, 25)[docs] * 0 + rng.lognormal(0, 1, docs.size) + rng.standard_normal(25)[docs]
        y = rng.standard_t(3, docs.size) + rng.standard_normal(25)[docs] * 0.0 + rng.standard_normal(25)[docs]
        _, low, high = _pearson_ci(x, y, docs, 300, s)
        covered += low <= 0 <= high
    assert covered / sims > 0.88


def test_removal_costs_by_hand():
    frame = synthetic(n_docs=3, per_doc=4)
    table = removal_costs(frame, ["zero"], 16)
    n_pos = 12
    for expert in (0, 5):
        part = frame[frame["expert"] == expert]
        row = table[table["expert"] == expert].iloc[0]
        assert row["n_routed"] == len(part)
        if len(part):
            assert row["attr_removal_cost"] == pytest.approx(part["estimate_zero"].sum() / n_pos)
            assert row["routed_share"] == pytest.approx(len(part) / n_pos)
        else:
            assert np.isnan(row["attr_removal_cost"])


def test_config_refusals():
    with pytest.raises(ConfigError, match="modes=zero,mean-ish"):
        AttributeConfig(modes=("zero", "mean-ish"))
    with pytest.raises(ConfigError, match="n_exact=2"):
        AttributeConfig(n_exact=2)
    with pytest.raises(ConfigError, match="repeats"):
        AttributeConfig(modes=("zero", "zero"))


def test_refusals_before_work_leave_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CorpusError):
        attribution_run(AttributeConfig(corpus=str(tmp_path / "missing.txt"), n_docs=2, n_exact=3), out)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="existing file"):
        attribution_run(AttributeConfig(n_docs=2, n_exact=3), tmp_path / "file")


@pytest.mark.slow
def test_run_rows_match_the_engine_and_autograd_and_resume(tmp_path):
    from moeaudit import Ablation, ablate, load_corpus
    from moeaudit.models import decoder_layers, load_model, moe_block

    config = AttributeConfig(n_docs=2, n_exact=4, layers=(1, 6), modes=("zero", "renormalize"), max_length=48)
    out = tmp_path / "run"
    result = attribution_run(config, out, report=True)
    table = pd.read_parquet(out / "attribution.parquet")
    for col in ("doc_id", "position", "layer", "expert", "weight", "estimate_zero", "estimate_renormalize",
                "exact_zero", "exact_renormalize"):
        assert col in table.columns
    agreement = pd.read_csv(out / "tables" / "attribution.csv")
    assert {"pearson", "spearman", "slope", "sign_agree", "d_attr", "d_control"} <= set(agreement.columns)
    assert len(agreement) == 4 and (out / "report.md").is_file()
    # the agreement table is recomputable from the parquet
    rows = table[(table["layer"] == 1)].dropna(subset=["exact_zero"])
    assert agreement.query("layer == 1 and mode == 'zero'")["pearson"].iloc[0] == pytest.approx(
        sps.pearsonr(rows["estimate_zero"], rows["exact_zero"]).statistic, abs=1e-9)
    # exact rows are the engine's ΔL; estimates are own-loss autograd on plain forwards
    model, tokenizer = load_model(config.model, dtype="float32", device="cpu")
    docs = {q.doc_index: q for q in load_corpus("builtin", tokenizer, n_samples=2, max_length=48, min_length=32)}
    for row in rows.head(3).itertuples():
        ids = docs[row.doc_id].input_ids
        exact = ablate(model, ids, [Ablation(row.layer, row.position, (row.expert,))])[0].delta_loss
        assert row.exact_zero == pytest.approx(exact, abs=1e-6)
        store = {}
        handle = decoder_layers(model)[row.layer].register_forward_hook(
            lambda m, a, o, store=store: store.setdefault("y", o[0] if isinstance(o, tuple) else o))
        try:
            logits = model(input_ids=ids[None]).logits[0]
        finally:
            handle.remove()
        t = row.position
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[t:t + 1], ids[t + 1:t + 2]), store["y"])[0]
        block = moe_block(model, row.layer)
        with torch.no_grad():
            x = _block_input(model, ids, row.layer)[t]
            out_e = block.experts(x[None], torch.tensor([[row.expert]]), torch.ones(1, 1))[0]
        assert row.estimate_zero == pytest.approx(float(-row.weight * (g[0, t] @ out_e)), rel=1e-3, abs=1e-6)
    # resume: nothing recomputed, same tables
    stamps = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    again = attribution_run(config, out, report=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == stamps
    pd.testing.assert_frame_equal(again.agreement, result.agreement)
    with pytest.raises(RunDirectoryError):
        attribution_run(config.replace(n_exact=5), out, report=False)


def _block_input(model, ids, layer):
    from moeaudit.models import moe_block

    store = {}

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        store["x"] = h.reshape(-1, h.shape[-1])

    handle = moe_block(model, layer).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        handle.remove()
    return store["x"]


def test_attribution_is_an_opt_in_prune_criterion():
    from moeaudit.intervene._attribution import attribute, attribution_importance
    from moeaudit.pruning._plan import prune_geometry
    from moeaudit.pruning._units import criterion_scores, resolve_criteria
    from moeaudit.testing import tiny_model

    assert "attribution" not in resolve_criteria(None)
    assert resolve_criteria(["attribution", "random"]) == ["attribution", "random"]
    model = tiny_model("olmoe")
    rows = attribute(model, [torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(0))],
                     layers=[1, 2], modes=("reroute",))
    table = attribution_importance(rows, ["reroute"], 16)
    scores = criterion_scores("attribution", [1, 2], metrics=None, importance=None, attribution=table,
                              geometry=prune_geometry(model), seed=0)
    for layer in (1, 2):
        expected = table[table["layer"] == layer].sort_values("expert")["attr_removal_cost"].to_numpy()
        np.testing.assert_array_equal(scores[layer], expected)


@pytest.mark.slow
def test_prune_eval_prunes_the_lowest_attribution_cost(tmp_path):
    from moeaudit import PruneConfig, prune_eval

    config = PruneConfig(model="builtin:tiny-moe", corpus="builtin", n_docs=2, n_docs_eval=2, max_length=48, n=4,
                         criteria=("attribution", "random"), fractions=(0.25,), random_seeds=2, n_boot=40,
                         n_perm=50, dtype="float32", device="cpu")
    prune_eval(config, tmp_path / "run", report=False)
    pruned = pd.read_parquet(tmp_path / "run" / "pruned.parquet")
    for fold in sorted(pruned["fold"].unique()):  # each fold ranks by its own calibration split's costs
        costs = pd.read_parquet(tmp_path / "run" / f"fold{fold}" / "attribution_importance.parquet")
        removed = pruned.query("criterion == 'attribution' and fold == @fold and allocation == 'uniform'")
        for layer, part in costs.groupby("layer"):
            values = part.sort_values("expert")["attr_removal_cost"].fillna(-np.inf).to_numpy()
            m = len(removed[removed["layer"] == layer])
            assert m == 4
            assert set(removed.loc[removed["layer"] == layer, "expert"]) == set(np.argsort(values, kind="stable")[:m])


@pytest.mark.slow
def test_cli_refuses_before_work_with_flag_names(tmp_path):
    from test_cli_refusals import _flags, cli, refused, snapshot

    small = {"layers": "1", "n_exact": "4", "n_docs": "2", "max_length": "32", "min_length": "8", "device": "cpu"}
    (tmp_path / "afile").write_text("not a directory")
    before = snapshot(tmp_path)
    cases = [
        (["--modes", "zero,bogus"], ["--modes=zero,bogus: bogus not a mode; valid: zero, renormalize, reroute"]),
        (["--n-exact", "1"], ["--n-exact=1 is too small"]),
        (["--out", "afile"], ["--out='afile' is an existing file, not a directory"]),
        (["--layers", "99"], ["--layers=99: 99 not MoE layer(s) of 'builtin:tiny-moe'"]),
    ]
    for args, fragments in cases:
        out = ["--out", "run"] if "--out" not in args else []
        kept = {k: v for k, v in small.items() if f"--{k.replace('_', '-')}" not in args}
        refused(cli("attribute", *_flags(kept), *args, *out, cwd=tmp_path), *fragments)
        assert snapshot(tmp_path) == before, args
    done = cli("attribute", *_flags(small), "--no-report", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "attribution against exact ablation" in done.stdout
    refused(cli("map", "--layers", "1", "--n", "6", "--n-docs", "2", "--max-length", "32", "--min-length", "8",
                "--device", "cpu", "--out", "run", cwd=tmp_path),
            "holds a `moeaudit attribute` run, not a `moeaudit map` one")
