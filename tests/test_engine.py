"""The ablation engines: fast == naive on every family, mode and scope; semantics; bad input; scoped hooks."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from conftest import cached_tiny, random_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeaudit import Ablation, SequenceAblator, ablate, describe
from moeaudit.intervene import MODES, SCOPES, ExpertMeans, apply_mode, dense_weights, override_routing
from moeaudit.models import adapter_for, moe_block, router
from moeaudit.testing import TINY_FAMILIES, tiny_model

ATOL = 1e-4  # the bar for float32; the engines agree to ~1e-6 in practice


def _random_ablations(desc, seq_len, n, seed, scope=None):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, min(3, desc.n_experts - 1))
        out.append(Ablation(rng.choice(desc.moe_layers), rng.randrange(seq_len - 1),
                            tuple(rng.sample(range(desc.n_experts), k)), scope=scope or rng.choice(SCOPES)))
    return out


def _assert_same(fast, naive):
    assert [r.ablation for r in fast] == [r.ablation for r in naive]
    for f, n in zip(fast, naive):
        assert f.clean_loss == pytest.approx(n.clean_loss, abs=ATOL)
        assert f.ablated_loss == pytest.approx(n.ablated_loss, abs=ATOL)
        assert f.delta_loss == pytest.approx(n.delta_loss, abs=ATOL)
        assert f.gap_norm == pytest.approx(n.gap_norm, abs=ATOL)
        assert f.final_gap_norm == pytest.approx(n.final_gap_norm, abs=ATOL)
        assert f.removed_weight == pytest.approx(n.removed_weight, abs=1e-6)


def _active_ablations(model, ids, n, seed, scope):
    """Ablations of experts that are routed at their position (so they change something)."""
    desc = describe(model)
    state = SequenceAblator(model, ids).state
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        layer = rng.choice(desc.moe_layers)
        t = rng.randrange(len(ids) - 1)
        active = state.moe[layer].indices[t].tolist()
        out.append(Ablation(layer, t, tuple(rng.sample(active, rng.randint(1, 2))), scope=scope))
    return out


def _means(model) -> ExpertMeans:
    """Seeded constants for every expert (mode="mean"; the engines must agree for any constants)."""
    desc = describe(model)
    g = torch.Generator().manual_seed(0)
    return ExpertMeans({layer: torch.randn(desc.n_experts, desc.d_model, generator=g, dtype=torch.float64)
                        for layer in desc.moe_layers},
                       {layer: np.ones(desc.n_experts, dtype=np.int64) for layer in desc.moe_layers})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_naive(family, mode):
    model = cached_tiny(family)
    ids = random_ids(36, seed=hash(family) % 1000)
    for scope in SCOPES:
        ablations = _active_ablations(model, ids, 8, seed=1, scope=scope)
        fast = ablate(model, ids, ablations, engine="fast", mode=mode, means=_means(model))
        naive = ablate(model, ids, ablations, engine="naive", mode=mode, means=_means(model))
        _assert_same(fast, naive)
        # the test can fail: these ablations really move the loss
        assert max(abs(r.delta_loss) for r in naive) > 10 * ATOL


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(MODES), length=st.integers(3, 40))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_naive_property(family, seed, mode, length):
    model = cached_tiny(family)
    desc = describe(model)
    ids = random_ids(length, seed=seed)
    ablations = _random_ablations(desc, length, 5, seed)
    means = _means(model)
    _assert_same(ablate(model, ids, ablations, mode=mode, means=means),
                 ablate(model, ids, ablations, engine="naive", mode=mode, means=means))


def test_sliding_window_longer_than_window():
    """Mixtral with an 8-token window on a 40-token sequence: the query mask applies the window."""
    model = tiny_model("mixtral", sliding_window=8)
    ids = random_ids(40, seed=5)
    ablations = _active_ablations(model, ids, 10, seed=2, scope="token")
    ablations += _active_ablations(model, ids, 4, seed=3, scope="sequence")
    _assert_same(ablate(model, ids, ablations), ablate(model, ids, ablations, engine="naive"))


def test_chunking_does_not_change_results():
    model = cached_tiny("olmoe")
    ids = random_ids(30, seed=9)
    ablations = _random_ablations(describe(model), 30, 20, seed=4)
    big = ablate(model, ids, ablations, max_query_tokens=4096)
    small = ablate(model, ids, ablations, max_query_tokens=3)
    for a, b in zip(big, small):
        assert a.ablated_loss == pytest.approx(b.ablated_loss, abs=1e-5)


@pytest.mark.parametrize("engine", ["fast", "naive"])
@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_unrouted_expert_changes_nothing(family, engine):
    model = cached_tiny(family)
    desc = describe(model)
    ids = random_ids(24, seed=3)
    state = SequenceAblator(model, ids).state
    ablations = []
    for layer in desc.moe_layers:
        for t in (0, 7, 22):
            routed = set(state.moe[layer].indices[t].tolist())
            idle = next(e for e in range(desc.n_experts) if e not in routed)
            ablations.append(Ablation(layer, t, (idle,)))
    for mode in MODES:
        for r in ablate(model, ids, ablations, engine=engine, mode=mode, means=_means(model)):
            assert r.delta_loss == 0.0
            assert r.ablated_loss == r.clean_loss
            assert r.gap_norm == 0.0
            assert r.removed_weight == 0.0


def test_gap_norm_is_removed_contribution():
    """Token scope, zero mode: the gap is exactly sum_e w_e E_e(x_t) over removed routed experts."""
    model = cached_tiny("qwen3_moe")
    ids = random_ids(20, seed=4)
    ablator = SequenceAblator(model, ids)
    layer, t = 2, 11
    ls = ablator.state.moe[layer]
    experts = tuple(ls.indices[t, :2].tolist())
    (result,) = ablator.run([Ablation(layer, t, experts)])
    block = moe_block(model, layer)
    contribution = torch.zeros(ls.x.shape[-1])
    for slot in range(2):
        e, w = int(ls.indices[t, slot]), float(ls.weights[t, slot])
        gate, up = (ls.x[t] @ block.experts.gate_up_proj[e].T).chunk(2)
        out = (torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].T
        contribution += w * out.detach()
    assert result.gap_norm == pytest.approx(float(contribution.norm()), rel=1e-5)
    assert result.removed_weight == pytest.approx(float(ls.weights[t, :2].sum()), rel=1e-6)


def test_sequence_scope_of_expert_routed_only_at_position_equals_token_scope():
    model = cached_tiny("olmoe")
    ids = random_ids(30, seed=6)
    ablator = SequenceAblator(model, ids)
    ls = ablator.state.moe[1]
    for t in range(29):
        for e in ls.indices[t].tolist():
            if not (ls.indices[:t] == e).any():
                tok, seq = ablator.run([Ablation(1, t, (e,)), Ablation(1, t, (e,), scope="sequence")])
                assert tok.ablated_loss == pytest.approx(seq.ablated_loss, abs=1e-6)
                return
    pytest.fail("no expert first routed at a later position; pick another seed")


def test_apply_mode_semantics():
    model = cached_tiny("olmoe")
    adapter = adapter_for(model)
    gate = router(model, 0, adapter)
    ls = SequenceAblator(model, random_ids(10)).state.moe[0]
    removed = torch.zeros(10, 16, dtype=torch.bool)
    removed[torch.arange(10), ls.indices[:, 0]] = True
    old = dense_weights(ls.weights, ls.indices, 16)
    w, i = apply_mode(adapter, gate, ls.logits, ls.weights, ls.indices, removed, "zero")
    new = dense_weights(w, i, 16)
    assert torch.equal(new[~removed], old[~removed]) and (new[removed] == 0).all()
    w, i = apply_mode(adapter, gate, ls.logits, ls.weights, ls.indices, removed, "renormalize")
    torch.testing.assert_close(w.sum(-1), ls.weights.sum(-1))
    assert (dense_weights(w, i, 16)[removed] == 0).all()
    w, i = apply_mode(adapter, gate, ls.logits, ls.weights, ls.indices, removed, "reroute")
    assert not (i == ls.indices[:, :1]).any()  # the removed expert is never chosen again
    # rerouting picks the next-best expert: the survivors plus the 5th-ranked
    ranked = torch.softmax(ls.logits, -1).argsort(-1, descending=True)
    assert torch.equal(i.sort(-1).values, ranked[:, 1:5].sort(-1).values)
    # OLMoE has no renormalisation: weights are the softmax over the 15 remaining experts
    probs = torch.softmax(ls.logits.masked_fill(removed, float("-inf")), -1)
    torch.testing.assert_close(w, probs.gather(1, i))


def test_hooks_removed_after_exception():
    model = cached_tiny("olmoe")
    adapter = adapter_for(model)
    gate = router(model, 0, adapter)
    with pytest.raises(RuntimeError, match="routing override expected 3 tokens"), \
            override_routing(adapter, gate, torch.zeros(3, 16, dtype=torch.bool), "zero"), torch.no_grad():
        model(random_ids(10)[None])
    assert not gate._forward_hooks
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize(
    ("ablation", "match"),
    [
        (Ablation(9, 3, (1,)), r"layer 9 is out of range: the model has 4 decoder layers \(0..3\); MoE layers are 1, 2, 3"),
        (Ablation(0, 3, (1,)), "layer 0 is a dense layer with no experts to ablate; MoE layers are 1, 2, 3"),
        (Ablation(1, 19, (1,)), r"position 19 is out of range: a next-token loss exists at positions 0..18"),
        (Ablation(1, -1, (1,)), "position -1 is out of range"),
        (Ablation(1, 3, (16,)), r"expert id\(s\) \[16\] out of range: layer 1 has routed experts 0..15\. id\(s\) "
                                r"\[16\] would be the model's shared expert\(s\).*shared experts cannot be ablated"),
        (Ablation(1, 3, (40,)), r"\[40\] out of range: layer 1 has routed experts 0..15\. shared experts cannot be "),
        (Ablation(-1, 3, (1,)), r"layer -1 is out of range \(negative indices are not accepted"),
        (Ablation(1, 3, ()), "experts is empty"),
        (Ablation(1, 3, (1,), scope="global"), "scope='global' is not valid; choose one of token, sequence"),
    ],
)
def test_bad_ablations(ablation, match):
    model = cached_tiny("deepseek_v2")
    with pytest.raises(ValueError, match=match):
        ablate(model, random_ids(20), [ablation])


def test_bad_inputs():
    model = cached_tiny("olmoe")
    with pytest.raises(ValueError, match="must be one unpadded sequence"):
        ablate(model, random_ids(20)[None], [Ablation(0, 1, (1,))])
    with pytest.raises(ValueError, match="mode='drop' is not valid"):
        ablate(model, random_ids(20), [Ablation(0, 1, (1,))], mode="drop")
    with pytest.raises(ValueError, match="engine='fastest' is not valid.*Did you mean 'fast'"):
        ablate(model, random_ids(20), [Ablation(0, 1, (1,))], engine="fastest")


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_fast_engine_is_as_accurate_as_naive_in_bfloat16(family):
    """Half precision adds rounding noise to every ΔL (about 0.01 nats on these models, in either engine); measured
    against the same weights in float32, the fast engine's error must not exceed the naive engine's by much."""
    import copy

    import numpy as np

    m16 = tiny_model(family, seed=0, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    ids = random_ids(48, seed=0, vocab=m16.config.vocab_size)
    layer = describe(m16).moe_layers[0]
    state = SequenceAblator(m32, ids, engine="naive").state.moe[layer]
    abls = [Ablation(layer, p, (int(state.indices[p][0]),)) for p in range(5, 45, 2)]

    def deltas(model, engine):
        return np.array([r.delta_loss for r in SequenceAblator(model, ids, engine=engine).run(abls, "zero")])

    truth = deltas(m32, "naive")
    err_naive = np.abs(deltas(m16, "naive") - truth).mean()
    err_fast = np.abs(deltas(m16, "fast") - truth).mean()
    assert np.abs(truth).mean() > 0.05  # the ablations matter, so the comparison means something
    assert err_fast <= 1.5 * err_naive + 1e-3, (err_fast, err_naive)


def test_layers_argument_is_checked():
    """Dense, out-of-range and negative layers are refused with the MoE layers named (not an AttributeError)."""
    from moeaudit.intervene import clean_state

    model = cached_tiny("deepseek_v2")  # layer 0 is dense
    ids = random_ids(20)
    for layers, match in (([0], "layer 0 is a dense layer with no experts to ablate; MoE layers are 1, 2, 3"),
                          ([99], r"layer 99 is out of range: the model has 4 decoder layers \(0..3\)"),
                          ([-1], r"layer -1 is out of range \(negative indices are not accepted"),
                          ([1.0], "layer must be an integer, got 1.0"),
                          ([], "layers is empty")):
        with pytest.raises(ValueError, match=match):
            SequenceAblator(model, ids, layers=layers)
        if layers:
            with pytest.raises(ValueError, match=match):
                clean_state(model, ids, layers=layers)
    assert sorted(SequenceAblator(model, ids, layers=[3, 1, 3]).state.moe) == [1, 3]


def test_ids_must_be_integers():
    import numpy as np

    with pytest.raises(ValueError, match=r"expert id must be an integer, got 1.7 \(float\)"):
        Ablation(1, 3, (1.7,))
    with pytest.raises(ValueError, match="expert id must be an integer, got 2.0"):
        Ablation(1, 3, 2.0)
    with pytest.raises(ValueError, match="expert id must be an integer, got the bool True"):
        Ablation(1, 3, (True,))
    with pytest.raises(ValueError, match="layer must be an integer, got 1.5"):
        Ablation(1.5, 3, (1,))
    with pytest.raises(ValueError, match="position must be an integer"):
        Ablation(1, torch.tensor(3.0), (1,))
    exact = Ablation(1, 3, (4, 5))
    assert Ablation(np.int64(1), torch.tensor(3), np.array([4, 5])) == exact
    assert Ablation(1, 3, torch.tensor([4, 5])) == exact and Ablation(1, 3, 4).experts == (4,)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_query_tokens_is_checked(bad):
    model = cached_tiny("olmoe")
    ids = random_ids(20)
    with pytest.raises(ValueError, match="max_query_tokens"):
        SequenceAblator(model, ids, max_query_tokens=bad)
    with pytest.raises(ValueError, match="max_query_tokens"):
        ablate(model, ids, [Ablation(1, 3, (1,))], max_query_tokens=bad)


def test_shared_experts_are_named():
    """Models with shared experts say they cannot be ablated; models without keep the plain range error."""
    ids = random_ids(20)
    with pytest.raises(ValueError, match=r"\[12\] would be the model's shared expert\(s\).*this model's 1 shared"):
        ablate(cached_tiny("qwen2_moe"), ids, [Ablation(2, 3, (12,))])
    with pytest.raises(ValueError, match=r"out of range: layer 1 has routed experts 0..15\.$"):
        ablate(cached_tiny("olmoe"), ids, [Ablation(1, 3, (16,))])


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_strict_refuses_unrouted_experts(engine):
    """By default an expert the router did not choose gives ΔL = 0; strict=True refuses it, naming the routed
    experts at that position. Sequence scope counts any routing at or before the position."""
    model = cached_tiny("olmoe")
    ids = random_ids(30, seed=2)
    ls = SequenceAblator(model, ids).state.moe[1]
    t = 20
    routed = sorted(ls.indices[t].tolist())
    idle = next(e for e in range(16) if e not in routed)
    (lenient,) = ablate(model, ids, [Ablation(1, t, (idle,))], engine=engine)
    assert lenient.delta_loss == 0.0
    with pytest.raises(ValueError, match=rf"strict: expert\(s\) \[{idle}\] of layer 1 are not routed at position "
                                         rf"{t}, .*Routed at position {t}: {re.escape(str(routed))}\."):
        ablate(model, ids, [Ablation(1, t, (idle,))], engine=engine, strict=True)
    both = Ablation(1, t, (routed[0],))
    assert ablate(model, ids, [both], engine=engine, strict=True) == ablate(model, ids, [both], engine=engine)
    earlier = set(ls.indices[:t].flatten().tolist()) - set(routed)
    never = set(range(16)) - set(ls.indices[: t + 1].flatten().tolist())
    if earlier:  # routed before t only: it changes the prefix, so sequence scope accepts it
        ablate(model, ids, [Ablation(1, t, (min(earlier),), scope="sequence")], engine=engine, strict=True)
    if never:
        with pytest.raises(ValueError, match="not routed at any position 0..20"):
            ablate(model, ids, [Ablation(1, t, (min(never),), scope="sequence")], engine=engine, strict=True)
