"""The verification suite passes on healthy models and catches broken ones."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_tiny, random_ids

from moeaudit import verify
from moeaudit.errors import VerificationError
from moeaudit.intervene import _incremental
from moeaudit.testing import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_verify_passes_on_every_family(family):
    report = verify(cached_tiny(family), None, [random_ids(40, seed=1), random_ids(33, seed=2)])
    assert report.passed, report.to_dict()
    assert [c.name for c in report.checks] == ["ce_alignment", "no_stale_state", "position_diversity",
                                               "position_specific", "engines_agree"]
    report.raise_if_failed()


def test_verify_catches_a_broken_fast_engine(monkeypatch):
    """A fast engine that forgets the sliding window / prefix mask is caught by engines_agree."""
    real = _incremental._query_mask

    def leaky(*args):
        return torch.zeros_like(real(*args))  # sees every key

    monkeypatch.setattr(_incremental, "_query_mask", leaky)
    report = verify(cached_tiny("olmoe"), None, [random_ids(40, seed=1)], n_engine_checks=12)
    assert not report.passed
    assert [c.name for c in report.checks if not c.passed] == ["engines_agree"]
    with pytest.raises(VerificationError, match="engines_agree"):
        report.raise_if_failed()


def test_verify_catches_constant_model():
    """A model that ignores its input has no position diversity and no position-specific effect."""
    model = cached_tiny("olmoe")
    ids = torch.full((40,), 5)
    report = verify(model, None, [ids])
    failed = {c.name for c in report.checks if not c.passed}
    assert "position_diversity" in failed


def test_verify_bad_input():
    with pytest.raises(ValueError, match="at least one sequence"):
        verify(cached_tiny("olmoe"), None, [])
    with pytest.raises(ValueError, match="1-D sequences"):
        verify(cached_tiny("olmoe"), None, [random_ids(10)[None]])


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_passes_and_still_catches_a_leaky_mask(family, dtype, monkeypatch):
    """Rounding in half precision must not fail a correct engine (bfloat16 runs such as the paper's Qwen would be
    blocked), while broken logic stays caught."""
    from moeaudit.testing import tiny_model

    model = tiny_model(family, seed=0, dtype=dtype)
    ids = [random_ids(40, seed=1)]
    report = verify(model, None, ids, n_engine_checks=12)
    assert report.passed, [c for c in report.checks if not c.passed]
    real = _incremental._query_mask
    monkeypatch.setattr(_incremental, "_query_mask", lambda *a: torch.zeros_like(real(*a)))
    leaky = verify(model, None, ids, n_engine_checks=12)
    assert [c.name for c in leaky.checks if not c.passed] == ["engines_agree"]
