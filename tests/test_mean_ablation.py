"""Mean ablation (``mode="mean"``): the experts' means against brute force, both engines against plain full forwards
of a model whose experts module was replaced by hand, on every family, token and sequence scope."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import random_ids
from torch import nn

from moeaudit.intervene import Ablation, ExpertMeans, SequenceAblator, ablate, expert_means
from moeaudit.models import describe, moe_block
from moeaudit.testing import TINY_FAMILIES, tiny_model


@functools.cache
def model64(family: str):
    return tiny_model(family, seed=1, dtype=torch.float64, experts_implementation="eager")


def _expert_output(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """E_e(x) of one token [d_model], before the routing weight."""
    one = torch.ones(1, 1, dtype=x.dtype)
    return experts(x[None], torch.tensor([[e]]), one)[0]


@torch.no_grad()
def brute_means(model, seqs, layer):
    """c_e by a per-token loop over the block inputs a plain forward sees."""
    desc = describe(model)
    block = moe_block(model, layer)
    inputs = []
    handle = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        for ids in seqs:
            model(input_ids=ids[None])
    finally:
        handle.remove()
    gate = getattr(block, "gate", None) or block.router
    sums = torch.zeros(desc.n_experts, desc.d_model, dtype=torch.float64)
    counts = np.zeros(desc.n_experts, dtype=int)
    for x in inputs:
        _, _, indices = gate(x)
        for t in range(x.shape[0]):
            for e in indices[t].tolist():
                sums[e] += _expert_output(block.experts, x[t], e).double()
                counts[e] += 1
    return sums, counts


class _HandReplaced(nn.Module):
    """The experts module rebuilt token by token: expert e at row t outputs c_e where ``replace[t, e]``."""

    def __init__(self, original: nn.Module, replace: torch.Tensor, constants: torch.Tensor) -> None:
        super().__init__()
        self.original, self.replace, self.constants = original, replace, constants

    def forward(self, hidden, indices, weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j, e in enumerate(indices[t].tolist()):
                value = self.constants[e].to(hidden.dtype) if self.replace[t, e] else \
                    _expert_output(self.original, hidden[t], e)
                out[t] += weights[t, j] * value
        return out


@torch.no_grad()
def reference_loss(model, ids, ab: Ablation, means: ExpertMeans) -> float:
    desc = describe(model)
    block = moe_block(model, ab.layer)
    replace = torch.zeros(len(ids), desc.n_experts, dtype=torch.bool)
    rows = [ab.position] if ab.scope == "token" else list(range(ab.position + 1))
    for e in ab.experts:
        replace[rows, e] = True
    original = block.experts
    block.experts = _HandReplaced(original, replace, means.means[ab.layer])
    try:
        logits = model(input_ids=ids[None]).logits[0]
    finally:
        block.experts = original
    t = ab.position
    return float(torch.nn.functional.cross_entropy(logits[t: t + 1].double(), ids[t + 1: t + 2]))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_expert_means_equal_brute_force(family):
    model = model64(family)
    seqs = [random_ids(24, seed=s) for s in range(2)]
    layer = describe(model).moe_layers[-1]
    means = expert_means(model, seqs, layers=[layer])
    sums, counts = brute_means(model, seqs, layer)
    np.testing.assert_array_equal(means.counts[layer], counts)
    routed = counts > 0
    torch.testing.assert_close(means.means[layer][routed], sums[routed] / torch.tensor(counts[routed])[:, None],
                               rtol=0, atol=1e-12)
    assert torch.isnan(means.means[layer][~routed]).all()
    assert means.unrouted(layer) == [int(e) for e in np.flatnonzero(~routed)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mean_mode_both_engines_equal_hand_replaced_forward(family):
    """float64: both engines equal a full forward whose experts module was rebuilt by hand (2e-6 nats naive: the
    engines round losses to float32; 1e-5 fast: its deltas are float32), token and sequence scope, one and two
    experts removed."""
    model = model64(family)
    desc = describe(model)
    ids = random_ids(20, seed=7)
    means = expert_means(model, [ids, random_ids(30, seed=8)])
    layer = desc.moe_layers[0]
    routing = SequenceAblator(model, ids, layers=[layer]).state.moe[layer]
    ablations = []
    for t, scope in ((5, "token"), (11, "sequence"), (16, "token")):
        routed = routing.indices[t].tolist()
        ablations.append(Ablation(layer, t, (routed[0],), scope=scope))
        ablations.append(Ablation(layer, t, tuple(routed[:2]), scope=scope))
    fast = ablate(model, ids, ablations, mode="mean", means=means)
    naive = ablate(model, ids, ablations, mode="mean", means=means, engine="naive")
    zero = ablate(model, ids, ablations, mode="zero")
    for ab, f, n, z in zip(ablations, fast, naive, zero):
        ref = reference_loss(model, ids, ab, means)
        assert abs(n.ablated_loss - ref) < 2e-6, (ab, n.ablated_loss, ref)  # engines' losses are float32
        assert abs(f.ablated_loss - ref) < 1e-5, (ab, f.ablated_loss, ref)  # fast deltas are float32
        assert f.removed_weight == pytest.approx(z.removed_weight)
        assert abs(f.ablated_loss - z.ablated_loss) > 1e-9  # the mean is not zero ablation


def test_mean_mode_float32_engines_agree_and_match_reference():
    model = tiny_model("olmoe", seed=2)
    ids = random_ids(40, seed=3)
    means = expert_means(model, [ids])
    layer = describe(model).moe_layers[1]
    routing = SequenceAblator(model, ids, layers=[layer]).state.moe[layer]
    ablations = [Ablation(layer, t, (int(routing.indices[t, 0]),), scope=s)
                 for t in range(2, 38, 5) for s in ("token", "sequence")]
    fast = ablate(model, ids, ablations, mode="mean", means=means)
    naive = ablate(model, ids, ablations, mode="mean", means=means, engine="naive")
    for ab, f, n in zip(ablations, fast, naive):
        assert abs(f.ablated_loss - n.ablated_loss) < 2e-5
        assert abs(f.gap_norm - n.gap_norm) < 2e-5
        assert abs(n.ablated_loss - reference_loss(model, ids, ab, means)) < 2e-5


def test_unrouted_expert_is_left_alone_and_missing_means_are_refused():
    model = model64("olmoe")
    desc = describe(model)
    ids = random_ids(20, seed=7)
    layer = desc.moe_layers[0]
    routing = SequenceAblator(model, ids, layers=[layer]).state.moe[layer]
    idle = next(e for e in range(desc.n_experts) if e not in routing.indices[4].tolist())
    means = expert_means(model, [ids, random_ids(60, seed=1)])
    [r] = ablate(model, ids, [Ablation(layer, 4, (idle,))], mode="mean", means=means)
    assert r.delta_loss == 0.0 and r.removed_weight == 0.0
    with pytest.raises(ValueError, match="pass means="):
        ablate(model, ids, [Ablation(layer, 4, (idle,))], mode="mean")
    short = expert_means(model, [ids[:3]])
    never = short.unrouted(layer)[0]
    with pytest.raises(ValueError, match="never routed"):
        ablate(model, ids, [Ablation(layer, 4, (never,))], mode="mean", means=short)
    other = tiny_model("olmoe", num_experts=4, num_experts_per_tok=2, dtype=torch.float64, experts_implementation="eager")
    with pytest.raises(ValueError, match="another model"):
        ablate(other, ids[:10], [Ablation(layer, 4, (0,))], mode="mean", means=means)


def test_means_round_trip_and_model_clean_after_error():
    model = model64("qwen2_moe")
    ids = random_ids(16, seed=2)
    means = expert_means(model, [ids])
    back = ExpertMeans.from_frame(means.to_frame())
    for layer in means.layers:
        torch.testing.assert_close(back.means[layer], means.means[layer], equal_nan=True, rtol=0, atol=0)
        np.testing.assert_array_equal(back.counts[layer], means.counts[layer])
    layer = means.layers[0]
    before = model(input_ids=ids[None]).logits
    from moeaudit.intervene import replace_with_means

    wrong = torch.zeros(3, describe(model).n_experts, dtype=torch.bool)  # a mask for 3 tokens, 16 in the forward
    with pytest.raises(RuntimeError), replace_with_means(model, layer, wrong, means.constants(layer)):
        model(input_ids=ids[None])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(model(input_ids=ids[None]).logits, before, rtol=0, atol=0)


def test_settings_and_verification_with_mode_mean():
    from moeaudit import verify
    from moeaudit.errors import ConfigError
    from moeaudit.experiments import ExperimentSettings, collect_single

    model = tiny_model("qwen3_moe", seed=0)
    seqs = [random_ids(40, seed=s) for s in range(2)]
    with pytest.raises(ConfigError, match="needs the experts' mean outputs"):
        ExperimentSettings(mode="mean").check(model)
    means = expert_means(model, seqs)
    settings = ExperimentSettings(mode="mean", means=means, n=6, layers=(1,))
    assert settings == ExperimentSettings(mode="mean", n=6, layers=(1,))  # the means are data, not a setting
    assert settings.check(model) == (1,)
    frame = collect_single(model, seqs, None, settings, 1, experiments=())
    row = frame.iloc[0]
    [r] = ablate(model, seqs[int(row["seq_id"])], [Ablation(1, int(row["position"]), tuple(row["ablated_experts"]))],
                 mode="mean", means=means)
    assert r.delta_loss == pytest.approx(row["delta"], abs=1e-6) and set(frame["mode"]) == {"mean"}
    report = verify(model, None, seqs, modes=("zero", "mean"), means=means)
    assert report.passed, report.to_dict()
