"""Report pieces on synthetic tables: the verdict follows the numbers, the tables mark significance, the renderers
escape and embed."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from moeaudit.report._document import Figure, Heading, Paragraph, Table, render_html, render_markdown
from moeaudit.report._tables import audit_table, fmt_p, progressive_table
from moeaudit.report._verdict import audit_verdict, control_verdict, progressive_verdict


def _audit(d: list[float], p: list[float], significant: list[bool], decision: list[str] | None = None,
           p_rank: list[float] | None = None, w_sign: list[float] | None = None) -> pd.DataFrame:
    n = len(d)
    decision = decision or ["positive" if s else "not_shown" for s in significant]
    return pd.DataFrame({
        "model": "m", "layer": list(range(n)), "metric": ["utilization_rate"] * n, "n": 200, "cohens_d": d,
        "mean_diff": np.array(d) / 10, "w_diff": w_sign if w_sign is not None else np.sign(d),
        "ci_low": np.array(d) - 0.1, "ci_high": np.array(d) + 0.1, "p_t": p, "p_wilcoxon": p, "p_cluster": p,
        "p_signrank_cluster": p_rank if p_rank is not None else p, "p_sign": p, "pct_high_larger": 50.0,
        "hl_estimate": 1e-4, "hl_low": -1e-4, "hl_high": 3e-4, "tost_p": 0.5, "bf01": 3.0, "bf0plus": 4.0,
        "bf0plus_r05": 2.0, "bf0plus_r02": 1.0, "significant": significant, "significant_paper_rule": significant,
        "decision": decision, "p_mean_greater_holm": p, "mean_level": 0.04, "mean_level_low": 0.02,
        "mean_level_high": 0.07, "alpha_corrected": 0.05 / n, "sesoi_d": 0.2, "note": "",
    })


FAMILIES = pd.DataFrame([{"model": "m", "family": "audit", "m_cells": 3, "n": 200.0, "mde_d": 0.27,
                          "design_effect": 1.3, "mde_d_clustered": 0.31}])


def test_audit_verdict_follows_the_numbers():
    null = audit_verdict(_audit([0.05, -0.02, 0.01], [0.4, 0.7, 0.9], [False] * 3), FAMILIES)
    assert "0 of 3 metric × layer cells show E[D] > 0" in null
    assert "none of utilization is shown, cell by cell" in null
    assert "E[D] > 0 is not shown at all 3 cells (a non-rejection" in null
    assert "assumption these data do not support" not in null and "metric-level test" in null
    assert "location shift" not in null  # the token-level tests' power is not the decision's
    assert "BF0+ exceeds 3 in 3 of 3 cells at prior scale r = 0.707, 0 of 3 cells at prior scale r = 0.5" in null
    assert "not evidence that the effect is zero" in null and "half-width" not in null
    mixed = audit_verdict(_audit([0.35, -0.30, 0.01], [1e-6, 1e-5, 0.9], [True, True, False]))
    assert "2 of 3 metric × layer cells show E[D] > 0" in mixed
    assert "higher-ranked expert costs more" in mixed and "utilization at L0 (d = +0.350, p_mean>0 (Holm) = 1e-06" in mixed
    assert "measured level 0.040 [0.020, 0.070]" in mixed
    assert "none of" not in mixed and "the other 1 cell (a non-rejection" in mixed


def test_control_verdict_compares_with_the_metrics():
    control = _audit([0.4, 0.0], [1e-4, 0.5], [True, False]).drop(columns="metric")
    control["spearman_rho"] = [0.3, -0.1]
    text = control_verdict(control, _audit([0.05, 0.05], [0.5, 0.5], [False, False]))
    assert "gives 1 of 2 layers with E[D] > 0" in text
    assert "costs more on average; one-sided document-level test of the mean, Holm, at a measured level that " \
           "holds .05) at L0 (d = +0.400" in text
    assert "mean |d| over layers is 0.200, against 0.050" in text and "not compared by a test" in text
    assert "from -0.100 to +0.300" in text and "stronger signal" not in text


def test_rank_verdict_counts_corrected_clustered_cells():
    from moeaudit.report._verdict import rank_verdict

    rank = pd.DataFrame({"model": "m", "layer": [0, 1, 2], "metric": "utilization_rate",
                         "mean_rho": [0.3, 0.05, -0.02], "p_cluster": [1e-4, 0.03, 0.6],
                         "significant": [True, False, False], "alpha_corrected": 0.05 / 3})
    text = rank_verdict(rank)
    assert "1 of 3 cells differ from zero after Bonferroni correction" in text
    assert "utilization at L0 (mean ρ = +0.300)" in text and "2 at p < .05 uncorrected" in text


def test_progressive_verdict_tail_rule():
    base = {"model": "m", "n": 100, "n_layers": 8}
    heavy = pd.DataFrame([{**base, "layer": 0, "k": 3, "mean": 2.0, "median": 0.1, "p95": 9.0},
                          {**base, "layer": 4, "k": 3, "mean": 0.01, "median": 0.01, "p95": 0.02}])
    text = progressive_verdict(heavy)
    assert "+0.010 nats at L4" in text and "+2.000 at L0" in text and "heaviest upper tail is at L0" in text
    flat = heavy.assign(p95=heavy["median"] * 2)
    assert "No layer shows a heavy upper tail" in progressive_verdict(flat)


def test_tables_mark_uncorrected_and_corrected_significance():
    assert fmt_p(0.049) == "0.049*" and fmt_p(0.05) == "0.05" and fmt_p(2e-5) == "2.00e-05*"
    assert fmt_p(float("nan")) == "n/a"
    table = audit_table(_audit([0.35, 0.01], [1e-6, 0.9], [True, False]), "m")
    assert table.columns[3:7] == ["d [95% CI]", "p_mean>0 (Holm)", "level at .05", "p_rank"]
    assert table.rows[0][-1] == "E[D] > 0" and table.rows[1][-1] == "E[D] > 0 not shown"
    assert table.rows[0][3] == "+0.350 [+0.250, +0.450]" and table.rows[0][4] == "1.00e-06*"
    assert table.rows[0][5] == "0.040" and table.rows[0][8] == "+0.0001 [-0.0001, +0.0003]"
    assert "Holm over the model's 2 audit cells" in table.notes and "Unit of inference: the document" in table.notes
    floor = _audit([0.35], [1e-4], [True]).assign(n_perm=9999)  # the smallest p 9999 sign flips can give
    assert audit_table(floor, "m").rows[0][6] == "≤1.00e-04*"
    prog = pd.DataFrame({"model": "m", "layer": [0, 0, 1], "k": [1, 2, 1], "n": 10, "mean": [0.1, 0.2, 0.3],
                         "median": [0.0, 0.1, 0.2], "p95": [0.5, 0.6, 0.7], "n_layers": 4})
    t = progressive_table(prog, "m")
    # a summary from before the arms (no arm column) is the highest-weight-first order
    assert t.columns == ["layer", "order", "n", "k=1", "k=2"]
    assert t.rows[1] == ["L1", "highest weight first", "10", "0.300 / 0.200 / 0.700", ""]
    both = pd.concat([prog.assign(arm="random"), prog.assign(arm="highest", mean=prog["mean"] + 1)])
    rows = progressive_table(both, "m").rows
    assert [r[:2] for r in rows] == [["L0", "highest weight first"], ["L0", "random order"],
                                     ["L1", "highest weight first"], ["L1", "random order"]]
    assert rows[0][3] == "1.100 / 0.000 / 0.500" and rows[1][3] == "0.100 / 0.000 / 0.500"


def test_renderers_escape_and_embed():
    png = b"\x89PNG\r\n\x1a\nfake"
    blocks = [Heading("A <b> & c"), Paragraph("**bold** and `code` <script>"),
              Table("cap", ["x", "y|z"], [["<1>", "2"]], notes="n"), Figure("fig", "caption <i>", png)]
    html = render_html("T & T", blocks)
    assert "<script>" not in html and "&lt;script&gt;" in html and "<strong>bold</strong>" in html
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in html
    assert "&lt;1&gt;" in html and 'href="#a-b-c"' in html
    md = render_markdown("T", blocks)
    assert "| x | y\\|z |" in md and "![caption <i>](figures/fig.png)" in md and md.startswith("# T\n")


def test_comparison_with_the_paper_only_for_its_checkpoints():
    from moeaudit.report._paper import comparison

    audit = _audit([0.05, -0.1, 0.12, 0.0, 0.02], [0.5] * 5, [False] * 5)
    audit["layer"] = [0, 4, 7, 11, 15]
    control = _audit([0.05, 0.0, 0.1, 0.02, 0.231], [0.5, 0.5, 0.5, 0.5, 0.0013],
                     [False, False, False, False, True]).drop(columns="metric")
    control["layer"] = [0, 4, 7, 11, 15]
    tables = {"audit": audit, "control": control}
    text = comparison("allenai/OLMoE-1B-7B-0924", tables, "float32")
    assert "0 significant cells and max |d| = 0.120 (consistent)" in text
    assert "paper L15 (d = +0.231); this run L15 (d = +0.231) (consistent)" in text
    assert "ran this model in" not in text and "tested layers" not in text
    local = comparison("/models/Qwen1.5-MoE-A2.7B", tables, "float32")  # a local copy, other precision
    assert "paper none; this run L15" in local and "(different)" in local and "in bfloat16; this run in float32" in local
    assert comparison("builtin:tiny-moe", tables, "float32") is None
