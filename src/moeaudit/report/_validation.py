"""The report's validation section, from ``validation.json`` (written by ``moeaudit validate``): null calibration,
family-wise rate, random-ranking rates, power against planted metrics and the minimum detectable d."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from moeaudit.report._document import Block, Heading, Paragraph, Table
from moeaudit.report._style import _figure, _style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEST_LABELS = {"t": "paired t", "wilcoxon": "Wilcoxon", "clustered_mean": "p_mean (clustered)",
               "clustered_rank": "p_rank (clustered)", "decision": "token-level rule (old)"}


def _pct(r: dict) -> str:
    return f"{100 * r['rate']:.2f}% [{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]"


def validation_blocks(validation: dict, label: str, n_records: int | None = None) -> list[Block]:
    """Heading, the calibration table, the power table and a paragraph; the figure is :func:`validation_figure`."""
    v = validation
    blocks: list[Block] = [Heading(f"{label}: validation of the tests (`moeaudit validate`)")]
    if n_records is not None and v.get("n_records") not in (None, n_records):
        blocks.append(Paragraph(f"**validation.json is out of date**: it was computed on {v['n_records']:,} records, "
                                f"the run now holds {n_records:,}. Run `moeaudit validate` again."))
    rows = []
    for test, r in v["null_rate"].items():
        rr = v.get("random_ranking_rate", {}).get(test)
        rows.append([TEST_LABELS.get(test, test), _pct(r), str(r["n_draws"]), _pct(rr) if rr else "n/a"])
    blocks.append(Table(
        f"{label}: rejection rate at α = {v['alpha']} uncorrected, with exact binomial 95% intervals",
        ["test", "true null (random pairs)", "draws", "random expert rankings"], rows,
        notes=("True null: at each position two active experts drawn at random in random order, so E[D] = 0 by "
               "construction while the run's ΔL (tails, experts) are kept; a calibrated test rejects 5%. The "
               "orientation is random per token, so this checks the tests' tails, not the within-document "
               "correlation. Random expert rankings: D of random static rankings of the layer's experts (the null "
               "of p_perm); the token-level tests reject far more than 5% wherever experts differ in importance, "
               "which is why the audit's decision also requires p_perm. t and Wilcoxon treat positions as "
               "independent (the paper's tests); p_mean and p_rank flip the signs of whole documents (the run's). "
               "The old token-level rule (no longer decides a cell) needs both clustered tests and one direction, so it rejects less than each alone; "
               "the expert-level criterion p_perm is a permutation test, exact by construction, and is not part of "
               "these draws.")))
    f = v["fwer"]
    power = v.get("power", [])
    sizes = sorted({int(r["n"]) for r in power})
    strengths = sorted({float(r["strength"]) for r in power})
    if power:
        lookup = {(float(r["strength"]), int(r["n"])): r for r in power}
        prow = []
        for s in strengths:
            cells = [lookup.get((s, n)) for n in sizes]
            d = next((c["mean_d"] for c in reversed(cells) if c), math.nan)
            prow.append([f"{s:.2f}", f"{d:+.3f}", *[f"{100 * c['rate']:.1f}%" if c else "" for c in cells]])
        blocks.append(Table(
            f"{label}: detection rate of planted metrics (old token-level rule at α = {v['alpha_corrected']:.3g}, D > 0)",
            ["Spearman s with the causal ranking", "mean d (largest n)", *[f"n = {n}" for n in sizes]], prow,
            notes=("Per draw the documents are halved at random; experts are ranked by mean ΔL on one half and a "
                   "synthetic metric with Spearman ≈ s to that ranking scores the other half's positions (and the "
                   "reverse); n positions are subsampled. s = 1 is the best a static ranking learned from half the "
                   "documents can do (compare the causal ceiling).")))
    mde = v.get("mde_d", math.nan)
    mde_text = (f"{mde:.3f}" if mde is not None and not math.isnan(mde)
                else f"above {max(c['d'] for c in v.get('mde_curve', [{'d': math.nan}])):.2f}")
    blocks.append(Paragraph(
        "**Validation.** Under a true null the rejection rates at α = .05 are "
        + "; ".join(f"{TEST_LABELS.get(t, t)} {_pct(r)}" for t, r in v["null_rate"].items())
        + f" ({v['null_rate']['t']['n_draws']:,} draws). The old token-level rule at the Bonferroni level over "
        f"{f['family_size']} {v['family']} cells (α = {f['alpha_corrected']:.3g} each) rejects somewhere in "
        f"{100 * f['rate']:.1f}% [{100 * f['ci_low']:.1f}, {100 * f['ci_high']:.1f}] of {f['n_draws']} null families "
        f"(the correction promises at most 5%). The minimum detectable d of that token-level cell rule (80% power "
        f"against a location shift of null D, at the run's n) is {mde_text}; it is not the power of the metric-level "
        "test that decides (below). Computed from the run's records in "
        f"{v.get('seconds', math.nan):.1f} s."))
    blocks.extend(rule_blocks(v, label))
    return blocks


def rule_blocks(v: dict, label: str) -> list[Block]:
    """The tests that decide: the one-sided test of the mean under the three nulls, and the power of the pooled
    metric-level test with ``n_needed`` (absent from validation.json written before moeaudit computed them)."""
    if "null_rate_skewed" not in v:
        return [Paragraph("This validation.json predates the skewed nulls and the power of the metric-level test; "
                          "run `moeaudit validate` again to get them.")]
    rows = []
    for key, name in (("null_rate", "random orientation per token"), ("null_rate_skewed", "documents resampled "
                      "from centred D"), ("null_rate_docflip", "orientation flipped per document")):
        for test, tname in (("clustered_mean", "p_cluster (sign-flip, two-sided)"),
                            ("mean_test", "p_mean_greater (one-sided, calibrated)")):
            r, rc = v.get(key, {}).get(test), v.get(f"{key}_corrected", {}).get(test)
            if r:
                rows.append([name, tname, _pct(r), _pct(rc) if rc else "n/a", str(r["n_draws"])])
    blocks: list[Block] = [Table(
        f"{label}: the per-cell tests of the mean under three nulls (α = {v['alpha']} and α = "
        f"{v['alpha_corrected']:.3g})", ["null", "test", "rate at α", "rate at corrected α", "draws"], rows,
        notes=("Skewed null: D of random rankings, centred, documents resampled with replacement (skew and "
               "within-document correlation kept). A rate whose interval lies above α means the nominal level does "
               "not hold; the audit table carries each cell's measured level (mean_level)."))]
    power = v.get("power_rule", [])
    pooled = [r for r in power if r["scope"] == "pooled"]
    if pooled:
        blocks.append(Table(
            f"{label}: power of the rule that decides (pooled one-sided relabeling test, α = {v['alpha_rule']:.3g})",
            ["Spearman s with the causal ranking", "pooled detection rate", "best layer alone"],
            [[f"{r['strength']:.2f}", _pct(r), f"{100 * max(x['rate'] for x in power if x['strength'] == r['strength'] and x['scope'] != 'pooled'):.1f}%"]
             for r in pooled],
            notes=("Planted metrics: the causal ranking estimated on half the documents mixed with noise to Spearman "
                   "s, scored on the other half, against each layer's relabeling null. s = 1 is the causal ranking "
                   "itself (p_detect_ceiling); s = 0 checks the level.")))
    ceiling = v.get("p_detect_ceiling", {}).get("pooled", math.nan)
    n_half, n_full = v.get("n_needed", math.nan), v.get("n_needed_ceiling", math.nan)
    n_run = pooled[0]["n"] if pooled else "n"
    half = (f"about n = {n_half:,.0f} positions per layer would be needed for a metric capturing half of the ceiling"
            if n_half is not None and not math.isnan(n_half) else
            "no n suffices for a metric capturing half of the ceiling (random rankings' own spread of d is as large)")
    full = (f"; the causal ranking itself needs about n = {n_full:,.0f}" if n_full is not None
            and not math.isnan(n_full) else "")
    blocks.append(Paragraph(f"**Sample size.** At n = {n_run} on {len(v.get('layers', []))} layers the best static "
                            f"ranking is found with probability {ceiling:.2f}; {half}{full} (80% power, normal "
                            "approximation from subsampled relabeling nulls)."))
    return blocks


def validation_figure(validation: dict, label: str) -> Figure | None:
    """Three panels: null rejection rates (with intervals) against 5%; detection rate against planted strength,
    one line per n; detection rate against the true d of shifted null D, with the minimum detectable d."""
    v = validation
    fig = _figure(11.0, 3.4)
    axes = fig.subplots(1, 3)
    tests = list(v["null_rate"])
    x = np.arange(len(tests))
    for offset, (key, name, color) in enumerate((("null_rate", "true null", "#1f77b4"),
                                                  ("random_ranking_rate", "random rankings", "#d62728"))):
        block = v.get(key)
        if not block:
            continue
        rates = np.array([block[t]["rate"] for t in tests])
        err = np.array([[block[t]["rate"] - block[t]["ci_low"] for t in tests],
                        [block[t]["ci_high"] - block[t]["rate"] for t in tests]])
        axes[0].errorbar(x + (offset - 0.5) * 0.25, rates, yerr=err, fmt="o", color=color, capsize=3, label=name)
    axes[0].axhline(v["alpha"], color="0.3", linestyle="--", linewidth=0.8)
    axes[0].set_xticks(x, [TEST_LABELS.get(t, t) for t in tests], fontsize=7)
    axes[0].set_ylabel("rejection rate at α = .05", fontsize=8)
    axes[0].legend(fontsize=7)
    _style(axes[0], "calibration")
    power = v.get("power", [])
    for n in sorted({int(r["n"]) for r in power}):
        rows = sorted((r for r in power if int(r["n"]) == n), key=lambda r: r["strength"])
        axes[1].plot([r["strength"] for r in rows], [r["rate"] for r in rows], marker="o", markersize=3,
                     label=f"n = {n}")
    axes[1].set_xlabel("planted Spearman s with the causal ranking", fontsize=8)
    axes[1].set_ylabel("detection rate", fontsize=8)
    axes[1].set_ylim(-0.02, 1.02)
    if power:
        axes[1].legend(fontsize=7)
    _style(axes[1], f"power (α = {v['alpha_corrected']:.3g})")
    curve = v.get("mde_curve", [])
    if curve:
        axes[2].plot([c["d"] for c in curve], [c["rate"] for c in curve], marker="o", markersize=3, color="0.2")
        axes[2].axhline(0.8, color="0.3", linestyle="--", linewidth=0.8)
        mde = v.get("mde_d")
        if mde is not None and not math.isnan(mde):
            axes[2].axvline(mde, color="#d62728", linewidth=1.0)
            axes[2].text(mde, 0.05, f" d = {mde:.2f}", color="#d62728", fontsize=7)
    axes[2].set_xlabel("true d (shifted null D)", fontsize=8)
    axes[2].set_ylim(-0.02, 1.02)
    _style(axes[2], "minimum detectable d")
    fig.suptitle(f"{label}: calibration and power of the tests", fontsize=10)
    return fig
