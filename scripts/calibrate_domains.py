#!/usr/bin/env python
"""Calibrate the per-domain heterogeneity test and the two-model comparison by simulation (known null, planted
effect), synthetic and, with ``--run``, resampled from a run's own per-domain D.

Usage (from the repository root)::

    PYTHONPATH=src python scripts/calibrate_domains.py --draws 2000 [--run moeaudit-demo/tiny-moe]

Prints rejection rates at alpha = .05 and .01 with exact (Clopper-Pearson) 95% intervals:

- heterogeneity (Welch's F, documents as units), against label permutation and the chi-square reference, on a
  synthetic null (4 domains, 10-16 documents of 3-24 positions, document effects, centred lognormal noise of
  skewness ~6, spreads differing 7-fold) and with a planted shift of one domain;
- with ``--run``: the run's standardised D per (layer, position), centred within each domain (so H0 holds),
  documents resampled with replacement within their domain (skew and within-document correlation kept), and
  the same with the smallest domain shifted by 0.3;
- the two-model comparison (Welch t, exact permutation over 8 + 8 layers) on skewed, metric-correlated per-layer
  statistics, null and planted;
- with two ``--run`` directories: the comparison on nulls built from the runs' own per-layer z
  (``tables/layer_z.csv``, the components of the metric-level statistic): each model's rows (a layer's metrics
  together) centred per metric, then as many layers as each model has drawn with replacement from its own centred
  rows (H0: equal means; each model's spread, skew and correlation across metrics kept), and the same with one
  planted mean difference of 1 per-layer sd.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moeaudit.stats import cluster_heterogeneity, layer_permutation_test  # noqa: E402


def rate(p: list[float], alpha: float) -> str:
    k, n = int(np.sum(np.asarray(p) <= alpha)), len(p)
    low = sps.beta.ppf(0.025, k, n - k + 1) if k else 0.0
    high = sps.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}]"


def synthetic(rng, spec):
    values, docs, groups, offset = [], [], [], 0
    for name, (n_docs, mean, scale) in spec.items():
        for g in range(n_docs):
            m = int(rng.integers(3, 25))
            noise = (rng.lognormal(0, 1.0, m) - math.exp(0.5)) * scale
            values.append(mean + rng.normal(0, 0.5 * scale) + noise)
            docs += [offset + g] * m
            groups += [name] * m
        offset += n_docs
    return np.concatenate(values), np.asarray(docs), np.asarray(groups)


def permutation_p(y, docs, groups, rng, n_perm=199):
    q = cluster_heterogeneity(y, docs, groups).q
    ids, first = np.unique(docs, return_index=True)
    labels = groups[first]
    index = np.searchsorted(ids, docs)
    null = [cluster_heterogeneity(y, docs, rng.permutation(labels)[index]).q for _ in range(n_perm)]
    return (1 + np.sum(np.asarray(null) >= q)) / (1 + n_perm)


def heterogeneity(draws: int, rng) -> None:
    spec = {"prose": (16, 0.0, 1.0), "code": (10, 0.0, 3.0), "arithmetic": (16, 0.0, 0.4), "records": (12, 0.0, 1.5)}
    welch, chi2, perm = [], [], []
    for i in range(draws):
        y, d, g = synthetic(rng, spec)
        h = cluster_heterogeneity(y, d, g)
        welch.append(h.p)
        chi2.append(h.p_chi2)
        if i < min(draws, 400):
            perm.append(permutation_p(y, d, g, rng))
    planted = {**spec, "arithmetic": (16, 0.5, 0.4)}
    power = [cluster_heterogeneity(*synthetic(rng, planted)).p for _ in range(draws // 4)]
    print(f"heterogeneity, synthetic skewed clustered null ({draws} draws):")
    print(f"  Welch F      alpha .05 {rate(welch, .05)}   alpha .01 {rate(welch, .01)}")
    print(f"  chi-square   alpha .05 {rate(chi2, .05)}   alpha .01 {rate(chi2, .01)}")
    print(f"  permutation  alpha .05 {rate(perm, .05)} ({len(perm)} draws, 199 permutations each)")
    print(f"  planted shift 0.5 in one domain (sd 0.4): power at .05 {rate(power, .05)}")


def from_run(run: Path, draws: int, rng) -> None:
    from moeaudit.experiments._domains import audit_differences, domain_labels
    from moeaudit.rundir import RunDirectory

    rd = RunDirectory(run)
    labels = domain_labels(rd.manifest())
    diffs = audit_differences(rd.read_records())
    diffs["x"] = diffs["D"] / diffs.groupby(["layer", "metric"])["D"].transform("std")
    diffs["domain"] = diffs["seq_id"].map(labels)
    for metric, g in diffs.groupby("metric"):
        g = g.assign(x=g["x"] - g.groupby("domain")["x"].transform("mean"))
        docs = {dom: [gd["x"].to_numpy() for _, gd in gdom.groupby("seq_id")] for dom, gdom in g.groupby("domain")}
        smallest = min(docs, key=lambda k: sum(map(len, docs[k])))
        skew = float(sps.skew(g["x"]))
        p_null, p_alt = [], []
        for i in range(draws):
            for shift, out in ((0.0, p_null), (0.3, p_alt)):
                if shift and i >= draws // 4:
                    continue
                ys, ds, gs, c = [], [], [], 0
                for dom, parts in docs.items():
                    for j in rng.integers(0, len(parts), len(parts)):
                        ys.append(parts[j] + (shift if dom == smallest else 0.0))
                        ds += [c] * len(parts[j])
                        gs += [dom] * len(parts[j])
                        c += 1
                out.append(cluster_heterogeneity(np.concatenate(ys), np.asarray(ds), np.asarray(gs)).p)
        print(f"  {metric} (skewness {skew:+.1f}): null .05 {rate(p_null, .05)}  .01 {rate(p_null, .01)}; "
              f"shift 0.3 in {smallest}: power {rate(p_alt, .05)}")


def two_models(draws: int, rng) -> None:
    def draw(shift):
        x = rng.gamma(1.0, 1.0, (16, 4)) - 1.0 + rng.normal(0, 0.5, (16, 1))  # skewed, metrics correlated
        x[:8] += shift
        return x[:8], x[8:]

    null = [layer_permutation_test(*draw(0.0)) for _ in range(draws)]
    alt = [layer_permutation_test(*draw(1.5)).p[0] for _ in range(draws // 4)]
    print(f"two-model comparison, 8 + 8 layers, exact permutation, skewed null ({draws} draws):")
    print(f"  per metric   alpha .05 {rate([r.p[0] for r in null], .05)}   alpha .01 {rate([r.p[0] for r in null], .01)}")
    print(f"  joint        alpha .05 {rate([r.p_joint for r in null], .05)}")
    print(f"  planted difference of 1.34 sd: power at .05 {rate(alt, .05)}")


def two_models_from_runs(runs: list[Path], draws: int, rng) -> None:
    import pandas as pd

    rows = []
    for run in runs[:2]:
        z = pd.read_csv(run / "tables" / "layer_z.csv").pivot_table(index="layer", columns="metric", values="z")
        rows.append(z.dropna().to_numpy(float))
    a, b = (x - x.mean(0) for x in rows)
    sd = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    null, alt = [], []
    for i in range(draws):
        ra, rb = a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]
        null.append(layer_permutation_test(ra, rb))
        if i < draws // 4:
            alt.append(layer_permutation_test(ra + sd, rb).p[0])
    first = [r.p[0] for r in null]
    print(f"two-model comparison, resampled from {runs[0].name} / {runs[1].name} per-layer z "
          f"({len(a)} + {len(b)} layers, {draws} draws):")
    print(f"  per metric (first)  alpha .05 {rate(first, .05)}   alpha .01 {rate(first, .01)}")
    every = [p for r in null for p in r.p]
    print(f"  all metrics pooled  alpha .05 {rate(every, .05)}")
    print(f"  joint               alpha .05 {rate([r.p_joint for r in null], .05)}")
    print(f"  planted difference of 1 per-layer sd: power at .05 {rate(alt, .05)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--run", type=Path, action="append", default=[], help="a run directory with domain labels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.time()
    heterogeneity(args.draws, rng)
    for run in args.run:
        print(f"heterogeneity, resampled from {run} (centred per domain; {args.draws} draws):")
        from_run(run, args.draws, rng)
    two_models(args.draws // 2, rng)
    if len(args.run) >= 2:
        two_models_from_runs(args.run, args.draws // 2, rng)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
