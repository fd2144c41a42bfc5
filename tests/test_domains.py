"""Per-domain results and the two-model comparison: stratified sampling, the heterogeneity and layer-permutation
tests against independent computations and calibrated by simulation (skewed, clustered nulls; planted effects),
z against brute-force relabelings, the domain labels of corpora."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.errors import ConfigError, CorpusError
from moeaudit.experiments import candidate_positions, domain_table, summarize
from moeaudit.experiments._compare import compare_models, comparison_sentence
from moeaudit.experiments._pool import Pool
from moeaudit.stats import cluster_heterogeneity, layer_permutation_test


# ------------------------------------------------------------------------------------------------------------------
# stratified sampling
# ------------------------------------------------------------------------------------------------------------------
def test_stratified_candidates_allocate_equally_and_keep_every_position():
    lengths = [400, 30, 30, 200, 25, 300]
    strata = ["a", "b", "b", "a", "c", "a"]
    plain = candidate_positions(lengths, 7, 1)
    strat = candidate_positions(lengths, 7, 1, strata=strata)
    # the same set of positions, only reordered
    assert sorted(map(tuple, plain.tolist())) == sorted(map(tuple, strat.tolist()))
    first = np.asarray(strata)[strat[:60, 0]]
    counts = {k: int((first == k).sum()) for k in "abc"}
    assert counts == {"a": 20, "b": 20, "c": 20}
    uniform = np.asarray(strata)[plain[:60, 0]]
    assert (uniform == "a").sum() > 40  # without strata the long documents dominate
    # within a stratum the order is the seeded uniform order of that stratum
    in_a = [tuple(r) for r in plain.tolist() if strata[r[0]] == "a"]
    assert [tuple(r) for r in strat.tolist() if strata[r[0]] == "a"] == in_a
    np.testing.assert_array_equal(candidate_positions(lengths, 7, 1, strata=None), plain)
    with pytest.raises(ValueError, match="one per sequence"):
        candidate_positions(lengths, 7, 1, strata=["a"])


# ------------------------------------------------------------------------------------------------------------------
# heterogeneity across domains (documents as units)
# ------------------------------------------------------------------------------------------------------------------
def _clustered(rng, n_docs, mean, scale, skew=True):
    """Positions of ``n_docs`` documents: a document effect plus skewed (centred lognormal) noise."""
    values, docs = [], []
    for g in range(n_docs):
        m = int(rng.integers(3, 25))
        effect = rng.normal(0, 0.5 * scale)
        noise = (rng.lognormal(0, 1.0, m) - math.exp(0.5)) * scale if skew else rng.normal(0, scale, m)
        values.append(mean + effect + noise)
        docs += [g] * m
    return np.concatenate(values), np.asarray(docs)


def _domains(rng, spec):
    values, docs, groups, offset = [], [], [], 0
    for name, (n_docs, mean, scale) in spec.items():
        v, d = _clustered(rng, n_docs, mean, scale)
        values.append(v)
        docs.append(d + offset)
        groups += [name] * v.size
        offset += n_docs
    return np.concatenate(values), np.concatenate(docs), np.asarray(groups)


def test_heterogeneity_matches_a_matrix_cr2_computation_and_welchs_formula():
    """Means from OLS on domain dummies; CR2 from its definition with matrices (Bell & McCaffrey 2002):
    V = (X'X)^-1 sum_g X_g' A_g e_g e_g' A_g X_g (X'X)^-1, A_g = (I - H_gg)^(-1/2)."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    y, docs, groups = _domains(rng, {"a": (12, 0.1, 1.0), "b": (8, 0.4, 2.0), "c": (15, -0.1, 0.5)})
    het = cluster_heterogeneity(y, docs, groups)
    names = sorted(set(groups))
    X = np.stack([(groups == k).astype(float) for k in names], axis=1)
    xtx_inv = np.linalg.inv(X.T @ X)
    beta = xtx_inv @ X.T @ y
    resid = y - X @ beta
    meat = np.zeros((3, 3))
    for g in np.unique(docs):
        rows = docs == g
        h_gg = X[rows] @ xtx_inv @ X[rows].T
        adj = np.real(sqrtm(np.linalg.inv(np.eye(rows.sum()) - h_gg))) @ resid[rows]
        u = X[rows].T @ adj
        meat += np.outer(u, u)
    var = np.diag(xtx_inv @ meat @ xtx_inv)
    got = {m.group: m for m in het.groups}
    w, dfs = 1 / var, []
    for i, name in enumerate(names):
        sizes = np.array([np.sum(docs == g) for g in np.unique(docs[groups == name])])
        df = sizes.sum() ** 2 / (sizes**2).sum() - 1
        dfs.append(df)
        assert got[name].mean == pytest.approx(beta[i], rel=1e-10)
        assert got[name].se == pytest.approx(math.sqrt(var[i]), rel=1e-8)
        assert got[name].n == int((groups == name).sum()) and got[name].n_clusters == len(sizes)
        assert got[name].low == pytest.approx(beta[i] - sps.t.ppf(0.975, df) * math.sqrt(var[i]), rel=1e-8)
    q = float((w * (beta - (w * beta).sum() / w.sum()) ** 2).sum())
    assert het.q == pytest.approx(q, rel=1e-8)
    assert het.p_chi2 == pytest.approx(sps.chi2.sf(q, 2), rel=1e-8)
    # Welch's F by its textbook formula (Welch 1951), the effective clusters - 1 as each variance's df
    h = sum((1 - wk / w.sum()) ** 2 / df for wk, df in zip(w, dfs))
    f = q / 2 / (1 + 2 * 1 / 8 * h)
    assert het.f == pytest.approx(f, rel=1e-10) and het.df2 == pytest.approx(8 / (3 * h), rel=1e-10)
    assert het.p == pytest.approx(sps.f.sf(f, 2, 8 / (3 * h)), rel=1e-8)


def test_heterogeneity_refuses_a_document_in_two_domains_and_drops_single_document_domains():
    with pytest.raises(ValueError, match="more than one group"):
        cluster_heterogeneity([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], ["a", "b", "a", "a"])
    het = cluster_heterogeneity([1.0, 2.0, 3.0, 4.0, 5.0, 0.5], [0, 1, 2, 3, 4, 5], ["a", "a", "b", "b", "b", "c"])
    assert "c" in het.note and {g.group for g in het.groups} == {"a", "b"}


def _rate(pvalues, alpha=0.05):
    return float(np.mean(np.asarray(pvalues) <= alpha))


def test_heterogeneity_holds_its_level_under_a_skewed_clustered_null_and_finds_a_planted_effect():
    rng = np.random.default_rng(2024)
    # equal means, very unequal spreads and document counts, skewed noise and document effects
    null_spec = {"prose": (16, 0.0, 1.0), "code": (10, 0.0, 3.0), "arithmetic": (16, 0.0, 0.4),
                 "records": (12, 0.0, 1.5)}
    p_null = [cluster_heterogeneity(*_domains(rng, null_spec)).p for _ in range(400)]
    # 400 draws: the 99.9% binomial range around 0.05 is about [0.022, 0.088] (label permutation: ~0.13 here)
    assert 0.015 <= _rate(p_null) <= 0.088, _rate(p_null)
    planted = {**null_spec, "arithmetic": (16, 0.8, 0.4)}
    p_alt = [cluster_heterogeneity(*_domains(rng, planted)).p for _ in range(60)]
    assert _rate(p_alt) >= 0.8, _rate(p_alt)


# ------------------------------------------------------------------------------------------------------------------
# two models, layers as units
# ------------------------------------------------------------------------------------------------------------------
def test_layer_permutation_test_is_exact_and_matches_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 1, (6, 2)), rng.normal(0, 2, (5, 2))
    res = layer_permutation_test(a, b)
    assert res.exact and res.n_perm == math.comb(11, 6)
    x = np.vstack([a, b])
    t_obs = sps.ttest_ind(a, b, equal_var=False).statistic
    np.testing.assert_allclose(res.t, t_obs, rtol=1e-10)
    ts = []
    for idx in itertools.combinations(range(11), 6):
        mask = np.zeros(11, bool)
        mask[list(idx)] = True
        ts.append(sps.ttest_ind(x[mask], x[~mask], equal_var=False).statistic)
    ts = np.asarray(ts)
    np.testing.assert_allclose(res.p, (np.abs(ts) >= np.abs(t_obs) - 1e-12).mean(0), rtol=1e-12)
    assert res.p_joint == pytest.approx(((ts**2).sum(1) >= (t_obs**2).sum() - 1e-12).mean())
    np.testing.assert_allclose(res.diff, a.mean(0) - b.mean(0))
    with pytest.raises(ValueError, match="at least 2"):
        layer_permutation_test([1.0], [1.0, 2.0])


def test_layer_permutation_test_level_under_a_skewed_null_and_power_under_a_planted_difference():
    rng = np.random.default_rng(11)

    def draw(shift):
        base = rng.gamma(1.0, 1.0, (16, 3)) - 1.0 + rng.normal(0, 0.5, (16, 1))  # skewed, metrics correlated
        base[:8] += shift
        return base[:8], base[8:]

    p_null = [layer_permutation_test(*draw(0.0), n_perm=999, seed=i) for i in range(150)]
    assert 0.005 <= _rate([r.p[0] for r in p_null]) <= 0.12
    assert 0.005 <= _rate([r.p_joint for r in p_null]) <= 0.12
    p_alt = [layer_permutation_test(*draw(2.5), n_perm=999, seed=i).p[0] for i in range(40)]  # 2.2 sd
    assert _rate(p_alt) >= 0.8


def test_compare_models_table_and_sentence():
    rng = np.random.default_rng(5)
    rows = [{"model": m, "layer": layer, "metric": metric, "z": rng.normal(2.0 if m == "a" and metric == "u" else 0)}
            for m in ("a", "b") for layer in range(8) for metric in ("u", "v")]
    table = compare_models(pd.DataFrame(rows), "a", "b")
    assert list(table["metric"]) == ["u", "v"]
    assert table["n_layers_a"].iloc[0] == 8 and table["p_joint"].nunique() == 1
    u = table.set_index("metric").loc["u"]
    assert u["diff"] > 1 and u["p_holm"] < 0.01
    assert "differs between a and b for u" in comparison_sentence(table)
    with pytest.raises(ValueError, match="no per-layer statistics for c"):
        compare_models(pd.DataFrame(rows), "a", "c")
    null = [{"model": m, "layer": layer, "metric": "u", "z": rng.normal()} for m in ("a", "b") for layer in range(8)]
    t0 = compare_models(pd.DataFrame(null), "a", "b")
    if t0["p_holm"].iloc[0] > 0.05:
        assert comparison_sentence(t0).startswith("This run cannot tell")


# ------------------------------------------------------------------------------------------------------------------
# z against random relabelings, and the domain table
# ------------------------------------------------------------------------------------------------------------------
def _pool(rng, n_pos=60, n_experts=6, k=2, n_docs=12):
    experts = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_pos)])
    delta = rng.gamma(0.6, 0.1, (n_pos, k)) * (1 + experts)  # higher ids matter more
    seq = np.sort(rng.integers(0, n_docs, n_pos))
    return Pool("m", 0, seq, np.arange(n_pos), experts, delta, np.full((n_pos, k), 0.5))


def _brute_d(pool, values):
    d = []
    for p in range(pool.n_positions):
        s = values[pool.experts[p]]
        d.append(pool.delta[p, np.argmax(s)] - pool.delta[p, np.argmin(s)])
    d = np.asarray(d)
    return d.mean() / d.std(ddof=1)


def _exact_null(pool, values):
    """d of every relabeling of the (tie-free) values over the experts, by brute force: its mean and sd."""
    ds = np.array([_brute_d(pool, values[list(perm)]) for perm in itertools.permutations(range(values.size))])
    return ds.mean(), ds.std(ddof=1), ds


def test_layer_z_is_the_shared_null_of_the_metric_level_test_against_exact_enumeration():
    rng = np.random.default_rng(8)
    records, metric_table = _records(rng, layers=(0, 1))
    full = records.assign(n_layers=2, k=1, clean_loss=1.0, ablated_loss=1.0 + records["delta"], target_token=0,
                          ablated_weight=0.5, ablated_metric_value=np.nan, scope="layer", mode="zero", seed=0)
    for column in ("gap_norm", "final_gap_norm", "remaining_norm", "compensation_cos", "relative_compensation",
                   "output_norm"):
        full[column] = np.nan
    full["metric_values"] = [[float(e) for e in a] for a in full["active_experts"]]
    tables = summarize(full, metrics=metric_table, n_boot=50, n_relabel=50, n_splits=10, seed=0)
    z, audit, metrics = tables["layer_z"], tables["audit"], tables["metrics"]
    assert list(z.columns) == ["model", "layer", "metric", "n", "d", "null_mean", "null_sd", "z"] and len(z) == 2
    pool_of = {layer: _layer_pool(records, layer) for layer in (0, 1)}
    values = np.arange(4, dtype=float)
    z_exact = []
    for row in z.itertuples():
        pool = pool_of[row.layer]
        d = _brute_d(pool, values)
        assert row.d == pytest.approx(d, rel=1e-10)  # the audit's d
        assert row.d == pytest.approx(audit.set_index("layer").loc[row.layer, "cohens_d"], rel=1e-10)
        mean, sd, _ = _exact_null(pool, values)  # all 24 relabelings
        n_draws = int(metrics["n_draws"].iloc[0])
        assert n_draws >= 10_000
        assert row.null_mean == pytest.approx(mean, abs=5 * sd / math.sqrt(n_draws))
        assert row.null_sd == pytest.approx(sd, rel=0.03)
        assert row.z == pytest.approx((row.d - row.null_mean) / row.null_sd, rel=1e-12)
        z_exact.append((d - mean) / sd)
    # pooled_z of tables/metrics.csv is the sum of these components; within Monte Carlo error of the exact one
    assert metrics["pooled_z"].iloc[0] == pytest.approx(z["z"].sum(), rel=1e-12)
    assert metrics["pooled_z"].iloc[0] == pytest.approx(sum(z_exact), rel=0.05)


def _layer_pool(records, layer, seq_ids=None):
    from moeaudit.experiments._pool import pools

    pool = pools(records)[("m", layer)]
    return pool if seq_ids is None else pool.subset(np.isin(pool.seq_id, list(seq_ids)))


def _records(rng, n_docs=16, per_doc=6, layers=(0, 1)):
    """Synthetic audit + pool records: 4 experts, top-2; ΔL grows with the expert id."""
    rows = []
    for layer in layers:
        for doc in range(n_docs):
            for pos in range(per_doc):
                active = sorted(rng.choice(4, 2, replace=False).tolist())
                deltas = {e: float(rng.gamma(0.5, 0.1) * (1 + e)) for e in active}
                base = {"model": "m", "layer": layer, "seq_id": doc, "position": pos, "active_experts": active,
                        "active_weights": [0.5, 0.5]}
                for e in active:
                    rows.append({**base, "experiment": "pool", "metric": "routing_weight", "role": "single",
                                 "ablated_experts": [e], "delta": deltas[e]})
                rows.append({**base, "experiment": "audit", "metric": "util", "role": "high",
                             "ablated_experts": [active[1]], "delta": deltas[active[1]]})
                rows.append({**base, "experiment": "audit", "metric": "util", "role": "low",
                             "ablated_experts": [active[0]], "delta": deltas[active[0]]})
    metric_table = pd.DataFrame([{"layer": layer, "expert": e, "util": float(e)} for layer in layers
                                 for e in range(4)])
    return pd.DataFrame(rows), metric_table


def test_domain_table_columns_and_values():
    rng = np.random.default_rng(9)
    records, metric_table = _records(rng)
    domains = {doc: ("code" if doc % 2 else "prose") for doc in range(16)}
    table = domain_table(records, metric_table, domains, n_draws=4000)
    assert list(table.columns) == ["model", "domain", "metric", "n", "n_documents", "d", "d_low", "d_high",
                                   "n_layers", "pooled_z", "p_metric", "p_metric_holm", "p_heterogeneity",
                                   "p_heterogeneity_chi2", "q"]
    assert set(table["domain"]) == {"code", "prose"} and (table["n"] == 48).all()  # 8 documents x 6 positions per layer
    assert (table["n_documents"] == 8).all() and table["p_heterogeneity"].nunique() == 1
    # d: mean of D / (layer's sd of D over all domains), by hand
    audit = records[records["experiment"] == "audit"]
    wide = audit.pivot_table(index=["layer", "seq_id", "position"], columns="role", values="delta")
    diff = (wide["high"] - wide["low"]).rename("D").reset_index()
    diff["x"] = diff["D"] / diff.groupby("layer")["D"].transform("std")
    values = np.arange(4, dtype=float)
    for row in table.itertuples():
        mine = diff[diff["seq_id"].map(domains) == row.domain]["x"].mean()
        assert row.d == pytest.approx(mine, rel=1e-10)
        assert row.d_low < row.d < row.d_high
        # the metric-level statistic on the domain's positions, by exact enumeration of every layer's relabelings
        docs = [doc for doc, name in domains.items() if name == row.domain]
        z_obs, z_null = 0.0, np.zeros(1)
        for layer in (0, 1):
            pool = _layer_pool(records, layer, docs)
            mean, sd, ds = _exact_null(pool, values)
            z_obs += (_brute_d(pool, values) - mean) / sd
            z_null = (z_null[:, None] + ((ds - mean) / sd)[None]).ravel()  # independent relabelings per layer
        assert row.n_layers == 2
        assert row.pooled_z == pytest.approx(z_obs, rel=0.05)
        p_exact = np.mean(z_null >= z_obs - 1e-9)
        assert row.p_metric == pytest.approx(p_exact, abs=4 * math.sqrt(p_exact * (1 - p_exact) / 4000) + 1 / 4000)
    assert (table["pooled_z"] > 1).all()  # the metric ranks by true importance on every domain
    assert (table["p_metric_holm"] >= table["p_metric"]).all()
    with pytest.raises(ValueError, match="without a domain label"):
        domain_table(records, metric_table, {0: "prose"}, n_draws=10)


# ------------------------------------------------------------------------------------------------------------------
# domain labels of corpora and the demo's model choice
# ------------------------------------------------------------------------------------------------------------------
def test_read_domains_of_builtin_jsonl_and_parquet(tmp_path):
    from moeaudit.corpus import read_documents, read_domains

    held = read_domains("builtin")
    assert len(held) == len(read_documents("builtin")) and set(held) == {"prose", "code", "arithmetic", "records"}
    rows = [{"text": "a b c", "kind": "x"}, {"text": "   ", "kind": "y"}, {"text": "d e", "kind": "z"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_domains(jsonl, domain_field="kind") == ["x", "z"]  # aligned with the non-blank documents
    assert len(read_documents(jsonl)) == 2
    parquet = tmp_path / "c.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert read_domains(parquet, domain_field="kind") == ["x", "z"]
    assert read_domains(jsonl) is None
    with pytest.raises(CorpusError, match="no 'genre' column"):
        read_domains(parquet, domain_field="genre")
    with pytest.raises(CorpusError, match="no 'genre' field"):
        read_domains(jsonl, domain_field="genre")
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\ntwo\n")
    with pytest.raises(CorpusError, match="has none"):
        read_domains(txt, domain_field="kind")
    with pytest.raises(CorpusError, match="labels its own domains"):
        read_domains("builtin", domain_field="kind")


def test_demo_configs_and_stratification_key():
    from moeaudit.config import BEFORE_KEY_EXISTED, RunConfig, demo_configs

    both = demo_configs()
    assert [c.model for c in both] == ["builtin:tiny-moe", "builtin:tiny-mixtral"]
    assert [c.label for c in both] == ["tiny-moe", "tiny-mixtral"]
    assert demo_configs("tiny-mixtral")[0].model == "builtin:tiny-mixtral"
    with pytest.raises(ConfigError, match="valid: builtin:tiny-moe, builtin:tiny-mixtral"):
        demo_configs("builtin:tiny-moee")
    assert RunConfig(corpus="builtin").with_resolved_paths().stratify_domains is True
    assert RunConfig(corpus="wikitext-2").with_resolved_paths().stratify_domains is False  # no domains
    assert BEFORE_KEY_EXISTED["stratify_domains"] is False  # runs written before it: uniform sampling


# ------------------------------------------------------------------------------------------------------------------
# end to end: a .jsonl corpus with --domain-field
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_labelled_jsonl_corpus_gets_stratified_positions_and_domain_results(tmp_path):
    from moeaudit.builtin import builtin_labelled_documents
    from moeaudit.config import RunConfig
    from moeaudit.run.pipeline import run_audit

    held = builtin_labelled_documents("heldout")
    rows = [{"text": t, "kind": d} for d, t in held if d in ("prose", "arithmetic")][:3]
    rows += [{"text": t, "kind": d} for d, t in held if d == "arithmetic"][:3]
    corpus = tmp_path / "labelled.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = RunConfig(model="builtin:tiny-moe", corpus=str(corpus), domain_field="kind", n_docs=6, max_length=96,
                    layers=(1, 5), n=16, n_boot=50, device="cpu", dtype="float32", seed=3,
                    experiments=("audit",))
    out = tmp_path / "run"
    result = run_audit(cfg, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["stratify_domains"] is True and manifest["config"]["domain_field"] == "kind"
    assert manifest["corpus"]["domains"] == ["prose"] * 3 + ["arithmetic"] * 3
    audit = result.records[result.records["experiment"] == "audit"]
    per_domain = audit.drop_duplicates(["layer", "seq_id", "position"]).assign(
        domain=lambda f: f["seq_id"].map(dict(enumerate(manifest["corpus"]["domains"]))))
    assert (per_domain.groupby(["layer", "domain"]).size() == 8).all()  # 16 positions: 8 per domain and layer
    table = pd.read_csv(out / "tables" / "domains.csv")
    assert set(table["domain"]) == {"prose", "arithmetic"} and (table["n"] == 8).all()
    assert list(table.columns) == ["model", "domain", "metric", "n", "n_documents", "d", "d_low", "d_high",
                                   "n_layers", "pooled_z", "p_metric", "p_metric_holm", "p_heterogeneity",
                                   "p_heterogeneity_chi2", "q"]
    md = (out / "report.md").read_text()
    assert "Positions per layer by domain: arithmetic 8 (3 documents), prose 8 (3 documents)" in md
    assert "results per domain" in md
    # a second run, and the two side by side: the comparison and the combined per-domain table
    from moeaudit.report import write_report

    other = tmp_path / "other"
    run_audit(cfg.replace(name="tiny-b", seed=4), other, report=False)
    paths = write_report([out, other], tmp_path / "both")
    md = paths["markdown"].read_text()
    assert "## Metric validity across redundancy levels: tiny-moe (16 experts, top-4) vs tiny-b (16 experts, top-4)" in md
    assert "**Redundancy levels.**" in md and "What this comparison can and cannot show" in md
    assert "## Both models side by side" in md
    metrics = pd.read_csv(tmp_path / "both" / "tables" / "metrics.csv")
    assert set(metrics["model"]) == {"tiny-moe", "tiny-b"} and len(metrics) == 8
    both = pd.read_csv(tmp_path / "both" / "tables" / "domains.csv")
    assert set(both["model"]) == {"tiny-moe", "tiny-b"}
    versus = pd.read_csv(tmp_path / "both" / "tables" / "model_comparison.csv")
    assert len(versus) == 4 and (versus["n_layers_a"] == 2).all() and versus["p_perm"].between(0, 1).all()


def test_domain_sentence_says_what_the_test_supports():
    from moeaudit.report._domains import domain_sentence

    def table(p_values):
        return pd.DataFrame([{"metric": m, "domain": d, "n_documents": 8, "p_heterogeneity": p}
                             for m, p in p_values.items() for d in ("code", "prose")])

    hit = domain_sentence(table({"u": 0.001, "v": 0.5}), "m")
    assert "differs across domains for u (Holm p = 0.002)" in hit and "approximate" in hit and " v " not in hit
    none = domain_sentence(table({"u": 0.2, "v": 0.5}), "m")
    assert none.startswith("m: this run cannot tell") and "smallest Holm p = 0.4" in none and "16 documents" in none


def test_no_comparison_section_for_runs_with_fewer_than_two_layers():
    from types import SimpleNamespace

    from moeaudit.report._domains import comparison

    def run(label, layers):
        z = pd.DataFrame([{"model": label, "layer": i, "metric": m, "z": 0.1 * i} for i in layers for m in "uv"])
        return SimpleNamespace(label=label, tables={"layer_z": z}, config={"seed": 0})

    assert comparison([run("a", [7]), run("b", [7])]) is None
    assert comparison([run("a", [0, 7]), run("b", [7])]) is None
    table = comparison([run("a", [0, 7]), run("b", [1, 2, 3])])
    assert list(table["metric"]) == ["u", "v"] and table["n_layers_b"].iloc[0] == 3


def test_compare_models_p_against_exact_enumeration_of_layer_splits():
    rng = np.random.default_rng(12)
    rows = [{"model": m, "layer": layer, "metric": "u", "z": rng.gamma(1.0) + (0.8 if m == "a" else 0.0)}
            for m, n in (("a", 6), ("b", 5)) for layer in range(n)]
    table = compare_models(pd.DataFrame(rows), "a", "b")
    x = pd.DataFrame(rows)["z"].to_numpy()
    t_obs = abs(sps.ttest_ind(x[:6], x[6:], equal_var=False).statistic)
    ts = []
    for idx in itertools.combinations(range(11), 6):  # every split of the 11 layers between the models
        mask = np.zeros(11, bool)
        mask[list(idx)] = True
        ts.append(abs(sps.ttest_ind(x[mask], x[~mask], equal_var=False).statistic))
    assert table["p_perm"].iloc[0] == pytest.approx(np.mean(np.asarray(ts) >= t_obs * (1 - 1e-12)), abs=1e-12)
    assert table["mean_a"].iloc[0] == pytest.approx(x[:6].mean()) and table["statistic"].iloc[0] == "z"


def test_side_by_side_block_lists_every_models_metric_level_row():
    from types import SimpleNamespace

    from moeaudit.report._document import Table
    from moeaudit.report._domains import side_by_side_blocks

    def run(label, z):
        metrics = pd.DataFrame([{"model": label, "metric": m, "pooled_z": z + i, "p_metric_holm": 0.01 * (i + 1),
                                 "ceiling_share": 0.5, "ceiling_share_low": 0.1, "ceiling_share_high": 0.9,
                                 "decision": "not_distinguishable"} for i, m in enumerate(("utilization_rate", "u"))])
        return SimpleNamespace(label=label, tables={"metrics": metrics},
                               manifest={"model": {"n_experts": 8, "top_k": 2}})

    blocks = side_by_side_blocks([run("a", 1.0), run("b", -1.0)], None)
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.columns[1:4] == ["pooled z (Holm p) a", "share of ceiling a", "decision a"]
    assert [r[0] for r in table.rows] == ["u", "utilization"]
    assert table.rows[1][1] == "1.00 (p = 0.01)" and table.rows[1][4] == "-1.00 (p = 0.01)"
    assert table.rows[0][3] == "not distinguishable" and table.rows[0][2] == "0.50 [0.10, 0.90]"
    assert side_by_side_blocks([run("a", 1.0)], None) == []
