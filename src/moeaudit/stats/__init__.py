"""Paired tests, effect sizes, bootstrap intervals, multiple-comparison corrections, rank correlations and Bayes
factors for the audit (pure: arrays in, values out).
"""

from moeaudit.stats._clustered import (
    ClusteredDifference,
    ClusteredMean,
    PredictionTest,
    clustered_difference,
    clustered_mean,
    prediction_test,
)
from moeaudit.stats._correlation import KendallTauCI, fisher_z, kendall_tau_ci, sign_test, spearman
from moeaudit.stats._multiple import CORRECTION_METHODS, CorrectionResult, correct, significant_both
from moeaudit.stats._paired import JZS_PRIOR_SCALE, PairedTest, paired_test

__all__ = [
    "CORRECTION_METHODS",
    "ClusteredDifference",
    "ClusteredMean",
    "JZS_PRIOR_SCALE",
    "CorrectionResult",
    "KendallTauCI",
    "PairedTest",
    "PredictionTest",
    "clustered_difference",
    "clustered_mean",
    "correct",
    "fisher_z",
    "kendall_tau_ci",
    "paired_test",
    "prediction_test",
    "sign_test",
    "significant_both",
    "spearman",
]
