"""Metric validity per corpus domain, with the metric-level test's own machinery (``tables/domains.csv``).

Per domain, the metric-level statistic of :mod:`moeaudit.experiments._metric_test` is computed on the positions of
the domain's documents only: at every layer, the audit's d of the metric's ranking (the audit's tie keys) and its
relabeling null on those positions; pooled over layers as in ``tables/metrics.csv``. The audit's effect (mean of D)
is compared across domains with documents as units. The per-layer z of the whole run (``tables/layer_z.csv``, the
two-model comparison's input) comes from the metric-level test's shared null itself
(:func:`moeaudit.experiments._audit_expert.audit_expert_level`); nothing here draws a second one for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from moeaudit.experiments._expert_null import _metric_vector, _n_experts
from moeaudit.experiments._metric_test import (
    N_METRIC_DRAWS,
    LayerNull,
    layer_nulls,
    observed_d,
    pooled_metric_test,
    tie_keys,
)
from moeaudit.experiments._pool import Pool, pools
from moeaudit.stats import cluster_heterogeneity

#: Domain-table columns, in order.
DOMAIN_COLUMNS: tuple[str, ...] = ("model", "domain", "metric", "n", "n_documents", "d", "d_low", "d_high",
                                   "n_layers", "pooled_z", "p_metric", "p_metric_holm", "p_heterogeneity",
                                   "p_heterogeneity_chi2", "q")


def audit_differences(records: pd.DataFrame) -> pd.DataFrame:
    """D = ΔL_high − ΔL_low per audit position: columns model, layer, metric, seq_id, position, D (the audit's own
    tie-breaks, so a cell's d_z of D equals its ``cohens_d``)."""
    sub = records[records["experiment"] == "audit"]
    if sub.empty:
        return pd.DataFrame(columns=["model", "layer", "metric", "seq_id", "position", "D"])
    wide = sub.pivot_table(index=["model", "layer", "metric", "seq_id", "position"], columns="role",
                           values="delta", aggfunc="first")
    return (wide["high"] - wide["low"]).rename("D").reset_index()


def domain_table(records: pd.DataFrame, metric_table: pd.DataFrame | None, domains: Mapping[int, str], *,
                 seed: int = 0, n_draws: int = N_METRIC_DRAWS) -> pd.DataFrame:
    r"""Per (model, domain, metric): the audit's effect and the metric-level statistic on the domain's positions,
    and a test of heterogeneity across domains.

    - ``d``: the domain's mean of D in units of each layer's sd of D (all domains), averaged over the domain's
      (layer, position) pairs: :math:`\delta_k = \mathrm{mean}_{(l,p) \in k}\, D_{l,p} / s_l`. With a common
      denominator per layer the domains are compared on one scale (a domain with larger losses does not get a
      smaller d for its larger spread). ``d_low`` / ``d_high``: 95% interval from the bias-reduced cluster-robust
      (CR2) variance with the domain's documents as units (t with the effective number of documents − 1 df).
    - ``pooled_z``, ``p_metric``: the metric-level test of ``tables/metrics.csv`` restricted to the domain's
      positions, :math:`T_{M,k} = \sum_l z_{k,l}`, :math:`z_{k,l} = (d_{k,l} - \bar d^{\,0}_{k,l}) / s^0_{k,l}`
      with :math:`d_{k,l}` the d of M's ranking (the audit's tie keys) on domain k's positions at layer l and
      :math:`\bar d^{\,0}_{k,l}, s^0_{k,l}` the mean and sd of d over ``n_draws`` relabelings of M across the
      layer's experts on the same positions (:func:`moeaudit.experiments._metric_test.layer_nulls`); one-sided
      p from independent relabelings per layer (:func:`moeaudit.experiments._metric_test.pooled_metric_test`).
      H0: on this domain, M's values are exchangeable across each layer's experts (M ranks no better than a
      random ranking). Unit of inference: the expert labeling. ``p_metric_holm``: Holm over the model's metrics
      within the domain. ``n_layers``: the layers it pooled.
    - ``p_heterogeneity``: H0 every domain has the same :math:`\delta_k`; documents are the units (Welch's F on the
      cluster-robust domain means, :func:`moeaudit.stats.cluster_heterogeneity`); the same value on every row of
      a (model, metric). ``p_heterogeneity_chi2``: the asymptotic chi-square reference; ``q``: the statistic.

    ``n`` is positions per layer (mean over the metric's layers), ``n_documents`` the domain's documents.
    ``seed`` must be the run's seed: the audit's tie keys derive from it.
    """
    diffs = audit_differences(records)
    if diffs.empty or not domains:
        return pd.DataFrame(columns=list(DOMAIN_COLUMNS))
    diffs = diffs.assign(domain=diffs["seq_id"].map(lambda s: domains.get(int(s))))
    if diffs["domain"].isna().any():
        raise ValueError("the records hold positions of documents without a domain label; the domain labels do "
                         "not belong to this run.")
    sd = diffs.groupby(["model", "layer", "metric"])["D"].transform(lambda x: x.std(ddof=1))
    diffs = diffs.assign(x=diffs["D"] / sd)
    names = sorted(set(domains.values()))
    tests = _domain_metric_tests(diffs, pools(records), metric_table, domains, names, seed=seed, n_draws=n_draws)
    rows = []
    for (model, metric), g in diffs.groupby(["model", "metric"], sort=True):
        het = cluster_heterogeneity(g["x"].to_numpy(float), g["seq_id"].to_numpy(), g["domain"].to_numpy())
        by_group = {m.group: m for m in het.groups}
        for domain, gd in g.groupby("domain", sort=True):
            m = by_group.get(domain)
            per_layer = gd.groupby("layer").size()
            n_layers, z, p = tests.get((str(model), str(domain), str(metric)), (0, np.nan, np.nan))
            rows.append({"model": model, "domain": domain, "metric": metric, "n": float(per_layer.mean()),
                         "n_documents": int(gd["seq_id"].nunique()),
                         "d": m.mean if m else float(gd["x"].mean()), "d_low": m.low if m else float("nan"),
                         "d_high": m.high if m else float("nan"), "n_layers": n_layers, "pooled_z": z,
                         "p_metric": p, "p_metric_holm": np.nan, "p_heterogeneity": het.p,
                         "p_heterogeneity_chi2": het.p_chi2, "q": het.q})
    table = pd.DataFrame(rows, columns=list(DOMAIN_COLUMNS))
    for _, idx in table.groupby(["model", "domain"]).groups.items():
        p = table.loc[idx, "p_metric"].to_numpy(float)
        ok = np.isfinite(p)
        if ok.any():
            holm = np.full(p.shape, np.nan)
            holm[ok] = multipletests(p[ok], method="holm")[1]
            table.loc[idx, "p_metric_holm"] = holm
    return table


def _domain_metric_tests(diffs: pd.DataFrame, layer_pools: Mapping[tuple[str, int], Pool],
                         metric_table: pd.DataFrame | None, domains: Mapping[int, str], names: Sequence[str], *,
                         seed: int, n_draws: int) -> dict[tuple[str, str, str], tuple[int, float, float]]:
    """``{(model, domain, metric): (n_layers, pooled_z, p_metric)}``: the metric-level test on each domain's
    positions (see :func:`domain_table`)."""
    if metric_table is None:
        return {}
    d_obs: dict[tuple[str, str, str], dict[int, float]] = {}
    nulls: dict[tuple[str, str, str], dict[int, LayerNull]] = {}
    for (model, layer), cells in diffs.groupby(["model", "layer"], sort=True):
        pool = layer_pools.get((str(model), int(layer)))
        if pool is None:
            continue
        keys = tie_keys(pool, seed)
        n_experts = _n_experts(pool, metric_table, int(layer))
        values = {str(m): _metric_vector(metric_table, int(layer), str(m), n_experts)
                  for m in sorted(cells["metric"].unique())}
        labels = np.array([domains.get(int(s)) for s in pool.seq_id], dtype=object)
        for domain in sorted(set(labels) - {None}):
            rows = labels == domain
            sub, sub_keys = pool.subset(rows), keys[rows]
            by_metric = layer_nulls(sub, values, sub_keys, n_draws=n_draws,
                                    seed=[int(seed), int(layer), 8, names.index(domain)])
            for m, vals in values.items():
                key = (str(model), str(domain), m)
                d_obs.setdefault(key, {})[int(layer)] = observed_d(sub, vals, sub_keys)
                nulls.setdefault(key, {})[int(layer)] = by_metric[m]
    out = {}
    for key in d_obs:
        test = pooled_metric_test(d_obs[key], nulls[key])
        out[key] = (len(test.z), test.pooled_z, test.p_metric)
    return out


def domain_labels(manifest: Mapping) -> dict[int, str]:
    """``{seq_id: domain}`` stored in a run's manifest (``corpus.domains``), or ``{}``."""
    labels: Sequence[str] | None = manifest.get("corpus", {}).get("domains")
    return {i: str(d) for i, d in enumerate(labels)} if labels else {}


def add_domain_tables(tables: dict[str, pd.DataFrame], records: pd.DataFrame, metric_table: pd.DataFrame | None,
                      manifest: Mapping, *, seed: int = 0) -> None:
    """Add ``tables["domains"]`` (:func:`domain_table`) to a run's summary tables when the run's corpus labels its
    documents and the audit covers two or more domains (``tables["layer_z"]`` is :func:`summarize`'s own)."""
    labels = domain_labels(manifest)
    audited = {labels.get(int(s)) for s in records.loc[records["experiment"] == "audit", "seq_id"].unique()}
    if len(audited - {None}) >= 2:  # one domain: the audit itself is its result
        tables["domains"] = domain_table(records, metric_table, labels, seed=seed)
