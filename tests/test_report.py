"""Report pieces on synthetic tables: the verdict follows the numbers, the tables mark significance, the renderers
escape and embed."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from moeaudit.report._document import Figure, Heading, Paragraph, Table, render_html, render_markdown
from moeaudit.report._tables import audit_table, fmt_p, progressive_table
from moeaudit.report._verdict import audit_verdict, control_verdict, progressive_verdict


def _audit(d: list[float], p: list[float], significant: list[bool]) -> pd.DataFrame:
    n = len(d)
    return pd.DataFrame({
        "model": "m", "layer": list(range(n)), "metric": ["utilization_rate"] * n, "n": 200, "cohens_d": d,
        "ci_low": np.array(d) - 0.1, "ci_high": np.array(d) + 0.1, "p_t": p, "p_wilcoxon": p,
        "pct_high_larger": 50.0, "bf01": 3.0, "significant": significant, "alpha_corrected": 0.05 / n,
    })


def test_audit_verdict_follows_the_numbers():
    null = audit_verdict(_audit([0.05, -0.02, 0.01], [0.4, 0.7, 0.9], [False] * 3))
    assert "0 of 3 metric × layer cells survive" in null and "none of utilization" in null
    assert "|d| ≤ 0.050" in null and "0 cells reach p < .05" in null
    mixed = audit_verdict(_audit([0.35, -0.30, 0.01], [1e-6, 1e-5, 0.9], [True, True, False]))
    assert "2 of 3 metric × layer cells survive" in mixed
    assert "right way" in mixed and "utilization at L0 (d = +0.350" in mixed
    assert "wrong way" in mixed and "utilization at L1 (d = -0.300" in mixed
    assert "none of" not in mixed
    assert "mean half-width of 0.100" in mixed


def test_control_verdict_compares_with_the_metrics():
    control = _audit([0.4, 0.0], [1e-4, 0.5], [True, False]).drop(columns="metric")
    control["spearman_rho"] = [0.3, -0.1]
    text = control_verdict(control, _audit([0.05, 0.05], [0.5, 0.5], [False, False]))
    assert "1 significant layer of 2: L0 (d = +0.400" in text and "a stronger signal" in text
    assert "from -0.100 to +0.300" in text
    weaker = control_verdict(control, _audit([0.9, 0.9], [0.5, 0.5], [False, False]))
    assert "not a stronger signal" in weaker


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
    assert table.rows[0][-1] == "yes" and table.rows[1][-1] == ""
    assert table.rows[0][5] == "1.00e-06*" and "0.05/2 = 0.025" in table.notes
    prog = pd.DataFrame({"model": "m", "layer": [0, 0, 1], "k": [1, 2, 1], "n": 10, "mean": [0.1, 0.2, 0.3],
                         "median": [0.0, 0.1, 0.2], "p95": [0.5, 0.6, 0.7], "n_layers": 4})
    t = progressive_table(prog, "m")
    assert t.columns == ["layer", "n", "k=1", "k=2"] and t.rows[1] == ["L1", "10", "0.300 / 0.200 / 0.700", ""]


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
