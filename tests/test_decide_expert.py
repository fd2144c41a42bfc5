"""The per-cell decision (Definition 2.1 by the one-sided document-level test of the mean, Holm, at its measured
level; p_perm secondary; absence only against half of the ceiling), and the verdict / table / CLI counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from moeaudit.experiments import decision_counts
from moeaudit.experiments._decide import decide_family
from moeaudit.report._tables import audit_table
from moeaudit.report._verdict import audit_verdict, expert_level_verdict


def _cells(p_mean, *, p_perm=None, level_low=None, share_high=None, informative=None) -> pd.DataFrame:
    n = len(p_mean)
    return pd.DataFrame({
        "model": "m", "layer": list(range(n)), "metric": "utilization_rate", "n": 200, "n_layers": 8,
        "relative_depth": 0.0, "cohens_d": 0.3, "mean_diff": 0.1, "w_diff": 50.0, "ci_low": 0.2, "ci_high": 0.4,
        "p_cluster": 1e-5, "p_signrank_cluster": 1e-5, "p_t": 1e-5, "p_wilcoxon": 1e-5, "pct_high_larger": 60.0,
        "hl_estimate": 0.01, "hl_low": 0.0, "hl_high": 0.02, "tost_p": 0.9, "bf0plus": 0.1, "sesoi_d": 0.2,
        "p_mean_greater": p_mean, "mean_level": 0.05,
        "mean_level_low": level_low if level_low is not None else [0.03] * n, "mean_level_high": 0.08,
        "p_perm": p_perm if p_perm is not None else [0.5] * n,
        "ceiling_share": 0.1, "ceiling_share_low": -0.3,
        "ceiling_share_high": share_high if share_high is not None else [0.9] * n,
        "layer_informative": informative if informative is not None else [True] * n,
        "d_perm_low": -0.25, "d_perm_high": 0.27, "d_ceiling": 0.2, "d_ceiling_low": 0.1, "d_ceiling_high": 0.3,
    })


def test_holm_over_the_family_decides_against_statsmodels():
    p = [1e-4, 0.004, 0.02, 0.3, np.nan]
    decided = decide_family(_cells(p))
    want = multipletests(p[:4], method="holm")[1]
    np.testing.assert_allclose(decided["p_mean_greater_holm"].to_numpy()[:4], want, rtol=1e-12)
    assert np.isnan(decided["p_mean_greater_holm"].iloc[4])
    # 4e-4, 0.012, 0.04 <= .05 after Holm (m = 4): three positives; 0.3 is not; NaN is untested
    assert decided["decision"].tolist() == ["positive"] * 3 + ["not_shown", "untested"]
    assert decided["significant"].tolist() == [True] * 3 + [False, False]


def test_p_perm_and_the_typical_token_do_not_gate():
    decided = decide_family(_cells([1e-4, 1e-4], p_perm=[0.9, np.nan]).assign(p_signrank_cluster=0.9,
                                                                             pct_high_larger=40.0))
    assert decided["decision"].tolist() == ["positive", "positive"]
    assert "secondary: p_perm = 0.9" in decided["reason"].iloc[0] and "p_perm" not in decided["reason"].iloc[1]


def test_a_level_not_held_is_never_labelled_positive():
    decided = decide_family(_cells([1e-4, 1e-4], level_low=[0.051, 0.049]))
    assert decided["decision"].tolist() == ["positive_level_not_held", "positive"]
    assert not decided["significant"].iloc[0] and decided["level_not_held"].iloc[0]
    assert "E[D] > 0 is not claimed" in decided["reason"].iloc[0]
    assert "rejects at the nominal level, but its measured level" in audit_verdict(decided)
    assert audit_table(decided, "m").rows[0][5] == "0.050 (!)"


def test_absence_only_against_half_the_ceiling_and_only_where_informative():
    decided = decide_family(_cells([0.5] * 4, share_high=[0.4, 0.6, 0.4, np.nan],
                                   informative=[True, True, False, True]))
    assert decided["decision"].tolist() == ["below_half_ceiling", "not_shown", "cannot_tell", "not_shown"]
    assert decided["equivalent"].tolist() == [True, False, False, False]
    text = audit_verdict(decided)
    assert "less than half of the causal ceiling" in text and "utilization at L0 (share +0.10 [-0.30, +0.40])" in text
    assert "At L2 the causal ceiling does not rise above" in text and "cannot tell" in text
    assert "the other 2 cells (a non-rejection, not a test that the mean is zero)" in text
    assert "no better than random" not in text
    # the control has no ceiling share: a non-rejection is "not shown"
    control = decide_family(_cells([0.5, 1e-4]).drop(columns=["layer_informative", "ceiling_share_high"]))
    assert control["decision"].tolist() == ["not_shown", "positive"]


def test_the_cli_line_and_the_report_count_the_same_cells():
    decided = decide_family(_cells([1e-4, 1e-4, 0.5, 0.5], level_low=[0.03, 0.06, 0.03, 0.03],
                                   share_high=[0.9, 0.9, 0.4, 0.9]))
    line = decision_counts(decided, "audit")
    assert line.startswith("audit decisions (of 4): 1 E[D] > 0, 1 rejected but level not held, 1 below half of the "
                           "ceiling, 1 E[D] > 0 not shown")
    text = audit_verdict(decided)
    assert "1 of 4 metric × layer cells shows E[D] > 0" in text
    assert line.split(": ", 1)[1].split(" (")[0] in text
    expert = expert_level_verdict(decided, None)
    assert "of the 2 cells whose test of the mean rejects after Holm, 2 are not shown to beat random" in expert
    table = audit_table(decided, "m")
    assert [r[-1] for r in table.rows] == ["E[D] > 0", "p ≤ α but level not held", "< ½ of the ceiling",
                                           "E[D] > 0 not shown"]
    assert "p_mean>0 (Holm)" in table.columns and "typical token" in table.notes
