"""Calibration of the audit's statistics by simulation with a known truth (the docs' figures).

Run:  PYTHONPATH=src python scripts/calibrate_stats.py [--draws 2000] [--demo RUN_DIR]

Every simulation uses the demo's document geometry (200 positions in 61 documents of 1 to 9 positions: the sizes
``moeaudit demo`` samples), a document-level random effect with intra-class correlation ICC, and prints rates with
binomial 95% intervals:

1. null rejection rates at alpha = .05 of the plain t-test and Wilcoxon (positions independent) and of the
   document-level sign-flip tests (mean, signed rank, sign) and the decision rule, under ICC 0 and 0.33, normal and
   heavy-tailed (t with 3 df) D; power at a planted d = 0.3;
2. rank validity: the t-test on Fisher-z of the per-token rho (the old column), the t-test on rho, and the
   document sign-flip of mean rho, under the null and a planted metric signal;
3. coverage of the percentile and the BCa bootstrap intervals of d_z, and of the Hodges-Lehmann interval;
4. TOST at its equivalence bound (|d| = 0.2), at alpha = .05 and at the corrected alpha = .05 / 32;
5. the minimum detectable d of the decision rule at n = 200 and 32 cells against the simulated rule.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats as sps

from moeaudit import stats
from moeaudit.stats._intervals import bootstrap_d_z, d_z, jackknife_d_z

# positions per document of the demo's 200 sampled positions (61 documents)
DEMO_SIZES = np.array([1] * 12 + [2] * 12 + [3] * 14 + [4] * 10 + [5] * 4 + [6] * 5 + [7] + [8] * 2 + [9])


def _docs() -> np.ndarray:
    return np.repeat(np.arange(DEMO_SIZES.size), DEMO_SIZES)


def _draw(rng, icc: float, shift: float = 0.0, tails: str = "normal") -> tuple[np.ndarray, np.ndarray]:
    docs = _docs()
    # heavy tails: t with 3 df scaled to unit variance (kurtosis infinite in theory, ~10-40 in samples of 200)
    noise = rng.normal(size=docs.size) if tails == "normal" else rng.standard_t(3, docs.size) / np.sqrt(3.0)
    values = np.sqrt(icc) * rng.normal(size=DEMO_SIZES.size)[docs] + np.sqrt(1 - icc) * noise
    return shift + values, docs


def _rate(hits: int, draws: int) -> str:
    ci = sps.binomtest(int(hits), draws).proportion_ci(0.95, method="wilson")
    return f"{hits / draws:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def paired_tests(draws: int, rng) -> None:
    print("\n1. Paired tests on D (demo geometry: 200 positions in 61 documents), rejection rate at alpha = .05")
    names = ["t (positions)", "Wilcoxon (positions)", "p_cluster (mean)", "signed rank (docs)", "sign (docs)",
             "rule: mean & rank, same sign"]
    for icc, tails, shift in ((0.0, "normal", 0.0), (0.33, "normal", 0.0), (0.33, "t3", 0.0),
                              (0.33, "normal", 0.3), (0.33, "t3", 0.3)):
        hits = np.zeros(len(names), dtype=int)
        for _ in range(draws):
            d, docs = _draw(rng, icc, shift, tails)
            res = stats.clustered_tests(d, docs, n_perm=999, seed=int(rng.integers(1 << 31)))
            rule = res.p_mean < 0.05 and res.p_signrank < 0.05 and np.sign(d.mean()) == np.sign(res.w_diff)
            hits += [sps.ttest_1samp(d, 0).pvalue < 0.05, sps.wilcoxon(d).pvalue < 0.05, res.p_mean < 0.05,
                     res.p_signrank < 0.05, res.p_sign < 0.05, rule]
        label = f"ICC {icc}, {tails} D, " + ("null" if shift == 0 else f"d = {shift}")
        print(f"  {label}: " + "; ".join(f"{n} {_rate(h, draws)}" for n, h in zip(names, hits)))


def _token_rhos(rng, signal: float, n_docs: int = 40, tokens: int = 5):
    effect = rng.normal(size=(n_docs, 1, 16))
    metric = signal * effect + rng.normal(size=(n_docs, 1, 16))
    active = np.argsort(rng.random((n_docs, tokens, 16)), axis=2)[:, :, :4]
    delta = np.take_along_axis(np.broadcast_to(effect, active.shape[:2] + (16,)), active, 2)
    delta = delta + 0.5 * rng.standard_t(3, size=delta.shape)
    values = np.take_along_axis(np.broadcast_to(metric, active.shape[:2] + (16,)), active, 2)
    rank_m = np.argsort(np.argsort(values, axis=2), axis=2)
    rank_d = np.argsort(np.argsort(delta, axis=2), axis=2)
    rho = 1 - 6 * ((rank_m - rank_d) ** 2).sum(axis=2) / (4 * 15)
    return rho.ravel(), np.repeat(np.arange(n_docs), tokens)


def rank_validity(draws: int, rng) -> None:
    print("\n2. Rank validity (per-token Spearman rho of 4 of 16 experts, 40 documents x 5 tokens, document-level "
          "expert effects), rejection rate at alpha = .05")
    edge = np.nextafter(1.0, 0.0)
    for signal in (0.0, 0.15, 0.3):
        fisher = plain = flip = 0
        for _ in range(draws):
            rho, docs = _token_rhos(rng, signal)
            z = np.arctanh(np.clip(rho, -edge, edge))  # the old column: |rho| = 1 clipped to z = +-18.7
            fisher += sps.ttest_1samp(z, 0).pvalue < 0.05
            plain += sps.ttest_1samp(rho, 0).pvalue < 0.05
            flip += stats.sign_flip_test(rho, docs, n_perm=999, seed=int(rng.integers(1 << 31))) < 0.05
        label = "null" if signal == 0 else f"metric signal {signal}"
        print(f"  {label}: t on Fisher z {_rate(fisher, draws)}; t on rho {_rate(plain, draws)}; "
              f"document sign-flip of mean rho {_rate(flip, draws)}")


def intervals(draws: int, rng, demo: str | None) -> None:
    print("\n3. Coverage of 95% intervals (n = 200)")
    populations = {}
    sigma = 1.2
    mean, sd = np.exp(sigma**2 / 2), np.sqrt((np.exp(sigma**2) - 1) * np.exp(sigma**2))
    big = rng.lognormal(0, sigma, 2_000_000)
    populations["skewed lognormal (sigma 1.2), d = 0.3"] = 0.3 + (big - mean) / sd
    populations["normal, d = 0.3"] = rng.normal(0.3, 1.0, 2_000_000)
    if demo:
        from moeaudit.rundir import RunDirectory

        records = RunDirectory(demo).read_records()
        for exp, layer, metric in (("control", 2, "routing_weight"), ("control", 7, "routing_weight"),
                                   ("audit", 5, "activation_norm")):
            sub = records[(records["experiment"] == exp) & (records["layer"] == layer)
                          & (records["metric"] == metric)]
            pivot = sub.pivot_table(index=["seq_id", "position"], columns="role", values="delta")
            d = (pivot["high"] - pivot["low"]).to_numpy()
            populations[f"demo D, {exp} L{layer} {metric} (kurtosis {sps.kurtosis(d):.0f})"] = d
    groups = np.arange(200)
    for name, pop in populations.items():
        true = pop.mean() / pop.std()
        pct = bca = 0
        for rep in range(draws):
            d = rng.choice(pop, 200)
            boot = bootstrap_d_z(d, groups, 1000, rep)
            lo, hi = np.nanquantile(boot, [0.025, 0.975])
            pct += lo <= true <= hi
            lo, hi = stats.bca_interval(d_z(d), boot, jackknife_d_z(d, groups), 0.95)
            bca += lo <= true <= hi
        print(f"  d_z, {name}: percentile {_rate(pct, draws)}; BCa {_rate(bca, draws)}")
    hits = 0
    for _ in range(draws):
        d, docs = _draw(rng, 0.33, 0.2, "t3")  # symmetric: the pseudo-median is 0.2
        res = stats.hodges_lehmann(d, docs)
        hits += res.ci_low <= 0.2 <= res.ci_high
    print(f"  Hodges-Lehmann, ICC 0.33, t3 D, demo geometry: {_rate(hits, draws)}")


def tost(draws: int, rng) -> None:
    print("\n4. TOST of |d| < 0.2 at the bound (true d = 0.2): claims of equivalence (must be <= alpha)")
    for icc, tails in ((0.0, "normal"), (0.33, "normal"), (0.33, "t3")):
        at05 = at_corr = 0
        for _ in range(draws):
            d, docs = _draw(rng, icc, 0.2, tails)
            p = stats.tost_d(d, docs, sesoi_d=0.2).p
            at05 += p < 0.05
            at_corr += p < 0.05 / 32
        print(f"  ICC {icc}, {tails} D: alpha .05 {_rate(at05, draws)}; alpha .05/32 {_rate(at_corr, draws)}")
    zero = sum(stats.tost_d(*_draw(rng, 0.33, 0.0, "normal"), sesoi_d=0.2).p < 0.05 for _ in range(draws))
    print(f"  power at d = 0 (ICC 0.33, normal): {_rate(zero, draws)}")


def power(draws: int, rng) -> None:
    mde = stats.minimum_detectable_d(200, 32)
    print(f"\n5. Minimum detectable d at n = 200, 32 cells, Bonferroni, 80% power: rule {mde:.3f}, mean test alone "
          f"{stats.minimum_detectable_d(200, 32, rule='mean'):.3f}")
    hits = 0
    for _ in range(draws):
        d = rng.normal(mde, 1.0, 200)
        t, w = sps.ttest_1samp(d, 0), sps.wilcoxon(d)
        hits += t.pvalue < 0.05 / 32 and w.pvalue < 0.05 / 32 and t.statistic > 0
    print(f"  simulated power of the rule at that d (normal D, independent positions): {_rate(hits, draws)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--demo", help="a demo run directory: adds its heaviest-tailed D to the coverage study")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    paired_tests(args.draws, rng)
    rank_validity(args.draws, rng)
    intervals(args.draws // 2, rng, args.demo)
    tost(args.draws, rng)
    power(args.draws, rng)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
