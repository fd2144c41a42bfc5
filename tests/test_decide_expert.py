"""The audit decision with the expert-level criterion (p_perm), and the verdict sentences that follow from it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit.experiments._decide import decide_family
from moeaudit.report._tables import audit_table
from moeaudit.report._verdict import audit_verdict, expert_level_verdict


def _cells(p_perm) -> pd.DataFrame:
    n = len(p_perm)
    return pd.DataFrame({
        "model": "m", "layer": list(range(n)), "metric": "utilization_rate", "n": 200, "n_layers": 8,
        "relative_depth": 0.0, "cohens_d": 0.3, "mean_diff": 0.1, "w_diff": 50.0, "ci_low": 0.2, "ci_high": 0.4,
        "p_cluster": 1e-5, "p_signrank_cluster": 1e-5, "p_t": 1e-5, "p_wilcoxon": 1e-5, "pct_high_larger": 60.0,
        "hl_estimate": 0.01, "hl_low": 0.0, "hl_high": 0.02, "tost_p": 0.9, "bf0plus": 0.1, "sesoi_d": 0.2,
        "p_perm": p_perm,
        "d_perm_low": -0.25, "d_perm_high": 0.27, "d_ceiling": 0.2, "d_ceiling_low": 0.1, "d_ceiling_high": 0.3,
    })


def test_p_perm_is_a_criterion_of_the_audit_decision():
    decided = decide_family(_cells([1e-4, 0.03, np.nan]), expert_level=True)
    assert decided["decision"].tolist() == ["positive", "not_beyond_random", "not_beyond_random"]
    assert "random expert rankings (p_perm): p = 0.03 does not survive" in decided["reason"].iloc[1]
    # without the criterion (the control, or no metric table) the token-level tests decide alone
    token_only = decide_family(_cells([1e-4, 0.03, np.nan]), expert_level=False)
    assert token_only["decision"].tolist() == ["positive"] * 3
    no_table = decide_family(_cells([np.nan] * 3), expert_level=True)
    assert no_table["decision"].tolist() == ["positive"] * 3


def test_verdict_and_table_say_what_p_perm_decided():
    audit = decide_family(_cells([1e-4, 0.03, 0.5]), expert_level=True)
    text = audit_verdict(audit)
    assert "1 of 3 metric × layer cells shows an effect" in text and "(p_perm) all survive" in text
    assert "test against random rankings of the experts does not survive correction" in text
    assert "p_perm = 0.03" in text and "not the same as shown no better" in text
    expert = expert_level_verdict(audit, None)
    assert "d in [-0.250, +0.270]" in expert and "of the 3 cells whose token-level tests survive" in expert
    assert "2 are not shown to beat random rankings" in expert and "1 of 3 cells reach p_perm" in expert
    assert "no better than random" not in expert
    table = audit_table(audit, "m")
    assert table.rows[1][-1] == "not shown beyond random rankings" and "p_perm" in table.columns
    assert "p_mean, p_rank and p_perm all survive" in table.notes
