"""Paired tests, effect sizes, bootstrap intervals, document-clustered sign-flip tests, clustered means and
differences, equivalence tests, power, multiple-comparison corrections and the decision rule, rank correlations and
Bayes factors for the audit (pure: arrays in, values out).
"""

from moeaudit.stats._bayes import JZS_PRIOR_SCALE, PRIOR_SCALES, bf0plus, jzs_bf10, jzs_bf_one_sided
from moeaudit.stats._cluster_corr import SpearmanCI, spearman_cluster_ci, spearman_cluster_cis
from moeaudit.stats._clustered import (
    ClusteredDifference,
    ClusteredMean,
    PredictionTest,
    clustered_difference,
    clustered_mean,
    prediction_test,
)
from moeaudit.stats._correlation import KendallTauCI, kendall_tau_ci, sign_test, spearman
from moeaudit.stats._equivalence import SESOI_D, Tost, design_effect, minimum_detectable_d, tost_d, tost_mean
from moeaudit.stats._heterogeneity import (
    Heterogeneity,
    TwoGroupComparison,
    cluster_heterogeneity,
    layer_permutation_test,
)
from moeaudit.stats._intervals import HodgesLehmann, bca_interval, hodges_lehmann
from moeaudit.stats._mean_test import ClusteredMeanTest, NullLevel, clustered_mean_test, skewed_null_level
from moeaudit.stats._multiple import (
    CORRECTION_METHODS,
    CorrectionResult,
    Criterion,
    Decision,
    correct,
    decide,
    significant_both,
)
from moeaudit.stats._paired import PairedTest, paired_test
from moeaudit.stats._signflip import (
    N_PERM,
    ClusteredRows,
    ClusteredTests,
    clustered_tests,
    clustered_tests_rows,
    sign_flip_test,
)

__all__ = [
    "CORRECTION_METHODS",
    "JZS_PRIOR_SCALE",
    "N_PERM",
    "PRIOR_SCALES",
    "SESOI_D",
    "ClusteredDifference",
    "ClusteredMeanTest",
    "ClusteredMean",
    "ClusteredRows",
    "ClusteredTests",
    "CorrectionResult",
    "Criterion",
    "Decision",
    "Heterogeneity",
    "HodgesLehmann",
    "KendallTauCI",
    "NullLevel",
    "PairedTest",
    "PredictionTest",
    "SpearmanCI",
    "Tost",
    "TwoGroupComparison",
    "bca_interval",
    "bf0plus",
    "cluster_heterogeneity",
    "clustered_difference",
    "clustered_mean",
    "clustered_mean_test",
    "clustered_tests",
    "clustered_tests_rows",
    "correct",
    "decide",
    "design_effect",
    "hodges_lehmann",
    "jzs_bf10",
    "jzs_bf_one_sided",
    "kendall_tau_ci",
    "layer_permutation_test",
    "minimum_detectable_d",
    "paired_test",
    "prediction_test",
    "sign_flip_test",
    "sign_test",
    "significant_both",
    "skewed_null_level",
    "spearman",
    "spearman_cluster_ci",
    "spearman_cluster_cis",
    "tost_d",
    "tost_mean",
]
