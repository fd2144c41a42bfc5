"""Shared clean passes: one clean forward per sequence serves every cell, records unchanged, memory budget honoured."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from conftest import cached_tiny, random_ids

import moeaudit.intervene as intervene
from moeaudit.experiments import CleanStates, ExperimentSettings, run_experiments
from moeaudit.experiments._run import collect_progressive, collect_single
from moeaudit.models import describe

LAYERS = (1, 3)


def _corpus(n=6, seed=1):
    rng = random.Random(seed)
    return [random_ids(rng.randint(30, 50), seed=seed * 100 + i) for i in range(n)]


@pytest.fixture
def count_clean_passes(monkeypatch):
    """Wrap the clean forward every SequenceAblator runs; the list collects the length of each sequence."""
    calls: list[int] = []
    real = intervene.clean_state

    def counting(model, input_ids, **kwargs):
        calls.append(int(input_ids.shape[0]))
        return real(model, input_ids, **kwargs)

    monkeypatch.setattr(intervene, "clean_state", counting)
    return calls


def _cells(model, seqs, settings, states):
    """Every cell of a small run (single and progressive on two layers; progressive on a longer prefix)."""
    frames = []
    for layer in LAYERS:
        frames.append(collect_single(model, seqs[:4], None, settings, layer, experiments=("control",),
                                     states=states))
    for layer in LAYERS:
        frames.append(collect_progressive(model, seqs, settings, layer, states=states))
    return frames


def test_one_clean_pass_per_sequence_serves_every_cell_with_equal_records(count_clean_passes):
    model = cached_tiny("olmoe")
    seqs = _corpus()
    settings = ExperimentSettings(layers=LAYERS, n=30, n_progressive=20, seed=2)
    alone = _cells(model, seqs, settings, None)
    per_cell = [len(set(f["seq_id"])) for f in alone]  # each cell clean-passes each sequence it samples once
    assert len(count_clean_passes) == sum(per_cell) > len(seqs)

    count_clean_passes.clear()
    states = CleanStates(model, seqs, layers=LAYERS, budget_bytes=None)
    shared = _cells(model, seqs, settings, states)
    touched = set().union(*(set(f["seq_id"]) for f in alone))
    assert len(count_clean_passes) == states.clean_passes == len(touched)
    assert states.reused == sum(per_cell) - len(touched) and states.kept == len(touched)
    for a, b in zip(alone, shared):
        pd.testing.assert_frame_equal(a, b)


def test_the_budget_keeps_the_first_states_that_fit_and_never_evicts(count_clean_passes):
    model = cached_tiny("olmoe")
    seqs = _corpus()
    sizes = [CleanStates(model, seqs, layers=LAYERS, budget_bytes=0).ablator(i).state.nbytes
             for i in range(len(seqs))]
    count_clean_passes.clear()
    states = CleanStates(model, seqs, layers=LAYERS, budget_bytes=sizes[0] + sizes[1])
    for seq_id in [0, 1, 2, 3, 0, 1, 2, 3, 0]:
        states.ablator(seq_id)
    # 0 and 1 fit and stay; 2 and 3 are recomputed each time they are asked for.
    assert states.kept == 2 and states.used_bytes == sizes[0] + sizes[1]
    assert states.clean_passes == len(count_clean_passes) == 2 + 2 * 2 and states.reused == 3
    none = CleanStates(model, seqs, layers=LAYERS, budget_bytes=0)
    none.ablator(0), none.ablator(0)
    assert none.clean_passes == 2 and none.kept == 0 and none.stats()["kept_bytes"] == 0


def test_state_bytes_match_the_model_geometry():
    """CleanState.nbytes against the sizes the geometry implies: every layer's output and keys/values, the audited
    layers' routing, the clean pass's rotary cos/sin, the losses and the ids."""
    model = cached_tiny("olmoe")
    cfg = model.config
    desc = describe(model)
    T = 40
    state = CleanStates(model, [random_ids(T)], layers=LAYERS, budget_bytes=0).ablator(0).state
    f32, i64 = 4, 8
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = (desc.n_layers * T * cfg.hidden_size * f32  # layer outputs
                + desc.n_layers * 2 * cfg.num_key_value_heads * T * head_dim * f32  # keys and values
                + len(LAYERS) * T * (2 * cfg.hidden_size + desc.n_experts + desc.top_k) * f32  # x, moe_out, logits, w
                + len(LAYERS) * T * desc.top_k * i64  # expert indices
                + 2 * T * head_dim * f32  # rotary cos and sin of the clean pass
                + (T - 1) * f32 + T * i64)  # losses, ids
    assert state.nbytes == expected


def test_run_experiments_shares_clean_passes(count_clean_passes):
    from moeaudit import verify

    model = cached_tiny("olmoe")
    seqs = _corpus(4)
    settings = ExperimentSettings(layers=LAYERS, n=12, n_progressive=6, seed=1)
    verification = verify(model, None, seqs[:2])
    count_clean_passes.clear()
    shared = run_experiments(model, seqs, settings, experiments=("control", "progressive"),
                             verification=verification)
    assert len(count_clean_passes) == shared.records["seq_id"].nunique()
    count_clean_passes.clear()
    alone = run_experiments(model, seqs, settings, experiments=("control", "progressive"), clean_cache_bytes=0,
                            verification=verification)
    per_cell = shared.records.groupby(["layer", "experiment"])["seq_id"].nunique()
    assert len(count_clean_passes) == per_cell.xs("control", level="experiment").sum() + \
        per_cell.xs("progressive", level="experiment").sum()
    pd.testing.assert_frame_equal(shared.records, alone.records)


def test_bad_arguments_are_refused():
    model = cached_tiny("olmoe")
    seqs = _corpus(3)
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        CleanStates(model, seqs, layers=LAYERS, budget_bytes=-1)
    with pytest.raises(ValueError, match=r"not MoE layers.*MoE layers: \[0, 1, 2, 3\]"):
        CleanStates(model, seqs, layers=[9], budget_bytes=0)
    states = CleanStates(model, seqs, layers=[1], budget_bytes=0)
    settings = ExperimentSettings(layers=(1,), n=3)
    with pytest.raises(ValueError, match="not a prefix"):
        collect_single(model, _corpus(3, seed=9), None, settings, 1, experiments=("control",), states=states)
    with pytest.raises(ValueError, match="layer 3 is not captured"):
        collect_single(model, seqs, None, settings, 3, experiments=("control",), states=states)
