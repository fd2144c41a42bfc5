"""Metric validity per layer on the expert-level null's scale (z), and per corpus domain: the statistics the
two-model comparison and ``tables/domains.csv`` are built from.

A layer's z puts an audit cell's d on the scale of its random-relabeling null: z = (d − mean of d under random
rankings of the layer's experts) / (its sd), so z ≈ 0 for a metric that ranks experts no better than an arbitrary
ranking and z > 0 for one that ranks the causally important experts high. Per domain, the same is computed on the
positions of the domain's documents, and the domains are compared with documents as units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moeaudit.experiments._pool import Pool, high_low_d, pools
from moeaudit.stats import cluster_heterogeneity

#: Random relabelings per (layer, metric) for z (and per domain).
N_RELABEL_Z = 1000
#: Domain-table columns, in order.
DOMAIN_COLUMNS: tuple[str, ...] = ("model", "domain", "metric", "n", "n_documents", "d", "d_low", "d_high",
                                   "pooled_z", "p_pooled", "p_heterogeneity", "p_heterogeneity_chi2", "q")


@dataclass(frozen=True)
class RelabelZ:
    """An observed d against its random-relabeling null at one layer.

    Attributes:
        d: The observed d_z.
        null_mean, null_sd: Mean and sd of d_z over the relabelings.
        z: (d - null_mean) / null_sd.
        null_z: [R] each relabeling's own z (for sums over layers).
    """

    d: float
    null_mean: float
    null_sd: float
    z: float
    null_z: np.ndarray


def relabel_z(pool: Pool, metric_values, d_obs: float, *, n_perm: int = N_RELABEL_Z, seed=0) -> RelabelZ:
    r"""z of ``d_obs`` against d_z under random rankings of the layer's experts.

    Each relabeling permutes the metric's values among the experts that have a finite value (experts without one
    keep no value, as in the audit) and scores every position of ``pool`` by high − low as the audit does, ties
    broken at random by a jitter below the gap between distinct values. Estimand: how many null sds the metric's d
    lies above random rankings' mean d, at this layer and these positions:

    .. math::

        z = \frac{d_{obs} - \overline{d_r}}{\mathrm{sd}(d_r)}

    Unit of inference: the expert labelling (as :func:`moeaudit.experiments.random_ranking_null`).
    """
    values = np.asarray(metric_values, dtype=float).ravel()
    finite = np.flatnonzero(np.isfinite(values))
    rank = np.full(values.size, np.nan)
    rank[finite] = np.unique(values[finite], return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    perms = np.tile(np.arange(values.size), (n_perm, 1))
    perms[:, finite] = finite[rng.permuted(np.tile(np.arange(finite.size), (n_perm, 1)), axis=1)]
    d_null = high_low_d(pool, rank[perms] + rng.random((n_perm, values.size)) * 0.5)
    d_null = d_null[np.isfinite(d_null)]
    if d_null.size < 2 or not np.isfinite(d_obs):
        nan = float("nan")
        return RelabelZ(float(d_obs), nan, nan, nan, np.full(n_perm, np.nan))
    mean, sd = float(d_null.mean()), float(d_null.std(ddof=1))
    if sd <= 0:
        nan = float("nan")
        return RelabelZ(float(d_obs), mean, sd, nan, np.full(n_perm, np.nan))
    null_z = np.full(n_perm, np.nan)
    null_z[: d_null.size] = (d_null - mean) / sd
    return RelabelZ(float(d_obs), mean, sd, (float(d_obs) - mean) / sd, null_z)


def audit_differences(records: pd.DataFrame) -> pd.DataFrame:
    """D = ΔL_high − ΔL_low per audit position: columns model, layer, metric, seq_id, position, D (the audit's own
    tie-breaks, so a cell's d_z of D equals its ``cohens_d``)."""
    sub = records[records["experiment"] == "audit"]
    if sub.empty:
        return pd.DataFrame(columns=["model", "layer", "metric", "seq_id", "position", "D"])
    wide = sub.pivot_table(index=["model", "layer", "metric", "seq_id", "position"], columns="role",
                           values="delta", aggfunc="first")
    return (wide["high"] - wide["low"]).rename("D").reset_index()


def _metric_vector(metric_table: pd.DataFrame, layer: int, metric: str, n_experts: int) -> np.ndarray:
    sub = metric_table[metric_table["layer"] == layer]
    values = np.full(max(n_experts, int(sub["expert"].max()) + 1 if len(sub) else 0), np.nan)
    values[sub["expert"].to_numpy(dtype=np.int64)] = sub[metric].to_numpy(dtype=float)
    return values


def _d(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean() / x.std(ddof=1)) if x.size >= 3 and x.std(ddof=1) > 0 else float("nan")


def layer_z_table(records: pd.DataFrame, metric_table: pd.DataFrame | None, *, seed: int = 0,
                  n_perm: int = N_RELABEL_Z) -> pd.DataFrame:
    """Per (model, layer, metric): n, d (the audit cell's d_z), the null's mean and sd, and z (:func:`relabel_z`);
    empty when the records hold no audit or no pool, or there is no metric table."""
    cols = ["model", "layer", "metric", "n", "d", "null_mean", "null_sd", "z"]
    diffs = audit_differences(records)
    layer_pools = pools(records)
    if diffs.empty or not layer_pools or metric_table is None:
        return pd.DataFrame(columns=cols)
    rows = []
    for (model, layer, metric), g in diffs.groupby(["model", "layer", "metric"], sort=True):
        pool = layer_pools.get((str(model), int(layer)))
        if pool is None:
            continue
        values = _metric_vector(metric_table, int(layer), str(metric), int(pool.experts.max()) + 1)
        r = relabel_z(pool, values, _d(g["D"].to_numpy(float)), n_perm=n_perm, seed=[seed, int(layer), 5])
        rows.append({"model": model, "layer": int(layer), "metric": metric, "n": int(g["D"].notna().sum()),
                     "d": r.d, "null_mean": r.null_mean, "null_sd": r.null_sd, "z": r.z})
    return pd.DataFrame(rows, columns=cols)


def domain_table(records: pd.DataFrame, metric_table: pd.DataFrame | None, domains: Mapping[int, str], *,
                 seed: int = 0, n_perm: int = N_RELABEL_Z) -> pd.DataFrame:
    r"""Per (model, domain, metric): the audit's effect and the metric-level statistic on the domain's positions,
    and a test of heterogeneity across domains.

    - ``d``: the domain's mean of D in units of each layer's sd of D (all domains), averaged over the domain's
      (layer, position) pairs: :math:`\delta_k = \mathrm{mean}_{(l,p) \in k}\, D_{l,p} / s_l`. With a common
      denominator per layer the domains are compared on one scale (a domain with larger losses does not get a
      smaller d for its larger spread). ``d_low`` / ``d_high``: 95% interval from the bias-reduced cluster-robust
      (CR2) variance with the domain's documents as units (t with the effective number of documents − 1 df).
    - ``pooled_z``: :math:`\sum_l z_{k,l} / \sqrt{L}`, z of each layer's d on the domain's positions against
      random relabelings of that layer's experts on the same positions (:func:`relabel_z`); ``p_pooled``: its
      one-sided p-value from the sum of independent relabelings per layer (H0: the metric ranks the experts no
      better than random rankings on this domain).
    - ``p_heterogeneity``: H0 every domain has the same :math:`\delta_k`; documents are the units (Welch's F on the
      cluster-robust domain means, :func:`moeaudit.stats.cluster_heterogeneity`); the same value on every row of
      a (model, metric). ``p_heterogeneity_chi2``: the asymptotic chi-square reference; ``q``: the statistic.

    ``n`` is positions per layer (mean over the metric's layers), ``n_documents`` the domain's documents.
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
    layer_pools = pools(records)
    rows = []
    names = sorted(set(domains.values()))
    for (model, metric), g in diffs.groupby(["model", "metric"], sort=True):
        het = cluster_heterogeneity(g["x"].to_numpy(float), g["seq_id"].to_numpy(), g["domain"].to_numpy())
        by_group = {m.group: m for m in het.groups}
        for domain, gd in g.groupby("domain", sort=True):
            z_obs, z_null = _domain_z(gd, layer_pools, metric_table, str(model), str(metric), seed, n_perm,
                                      names.index(domain))
            m = by_group.get(domain)
            per_layer = gd.groupby("layer").size()
            rows.append({"model": model, "domain": domain, "metric": metric, "n": float(per_layer.mean()),
                         "n_documents": int(gd["seq_id"].nunique()),
                         "d": m.mean if m else float(gd["x"].mean()), "d_low": m.low if m else float("nan"),
                         "d_high": m.high if m else float("nan"), "pooled_z": z_obs,
                         "p_pooled": _p_upper(z_obs, z_null), "p_heterogeneity": het.p,
                         "p_heterogeneity_chi2": het.p_chi2, "q": het.q})
    return pd.DataFrame(rows, columns=list(DOMAIN_COLUMNS))


def _domain_z(gd: pd.DataFrame, layer_pools: Mapping[tuple[str, int], Pool], metric_table, model: str,
              metric: str, seed: int, n_perm: int, domain_index: int) -> tuple[float, np.ndarray]:
    """Σ_l z_l / √L on one domain's positions, and the same sum over independent relabelings per layer."""
    if metric_table is None:
        return float("nan"), np.array([])
    z_sum, null_sum, n_layers = 0.0, np.zeros(n_perm), 0
    for layer, gl in gd.groupby("layer", sort=True):
        pool = layer_pools.get((model, int(layer)))
        if pool is None:
            continue
        keys = set(zip(gl["seq_id"].tolist(), gl["position"].tolist()))
        rows = np.array([(s, p) in keys for s, p in zip(pool.seq_id.tolist(), pool.position.tolist())])
        values = _metric_vector(metric_table, int(layer), metric, int(pool.experts.max()) + 1)
        r = relabel_z(pool.subset(rows), values, _d(gl["D"].to_numpy(float)), n_perm=n_perm,
                      seed=[seed, int(layer), 6, domain_index])
        if not np.isfinite(r.z):
            continue
        z_sum += r.z
        null_sum += r.null_z
        n_layers += 1
    if n_layers == 0:
        return float("nan"), np.array([])
    return z_sum / np.sqrt(n_layers), null_sum / np.sqrt(n_layers)


def _p_upper(obs: float, null: np.ndarray) -> float:
    null = null[np.isfinite(null)]
    if not np.isfinite(obs) or null.size == 0:
        return float("nan")
    return float((1 + np.sum(null >= obs - 1e-12 * abs(obs))) / (1 + null.size))


def domain_labels(manifest: Mapping) -> dict[int, str]:
    """``{seq_id: domain}`` stored in a run's manifest (``corpus.domains``), or ``{}``."""
    labels: Sequence[str] | None = manifest.get("corpus", {}).get("domains")
    return {i: str(d) for i, d in enumerate(labels)} if labels else {}


def add_domain_tables(tables: dict[str, pd.DataFrame], records: pd.DataFrame, metric_table: pd.DataFrame | None,
                      manifest: Mapping, *, seed: int = 0) -> None:
    """Add ``tables["layer_z"]`` (:func:`layer_z_table`) and, when the run's corpus labels its documents and the
    audit covers two or more domains, ``tables["domains"]`` (:func:`domain_table`) to a run's summary tables."""
    tables["layer_z"] = layer_z_table(records, metric_table, seed=seed)
    labels = domain_labels(manifest)
    audited = {labels.get(int(s)) for s in records.loc[records["experiment"] == "audit", "seq_id"].unique()}
    if len(audited - {None}) >= 2:  # one domain: the audit itself is its result
        tables["domains"] = domain_table(records, metric_table, labels, seed=seed)
