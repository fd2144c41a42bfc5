"""Attribution estimates against per-position autograd on plain full forwards (float64, every family, config variants).

The reference here shares no code with the attribution pass: for each position ``t`` one plain ``model(ids)`` forward
with grad, a backward of ``L_t`` alone (``∂L_t/∂y_t^(l)`` read at every decoder layer's output), and the change of the
MoE block's output obtained by running the block itself on ``x_t`` with its router's weights edited by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids
from test_engine_configs import WINDOWED, _rope_cases

from moeaudit import describe
from moeaudit.intervene import clean_state
from moeaudit.intervene._attribution import attribute, attribute_sequence, own_loss_gradients
from moeaudit.models import adapter_for, decoder_layers, moe_block, router
from moeaudit.testing import TINY_FAMILIES, tiny_model

MODES = ("zero", "renormalize", "reroute")


def f64(family: str, **overrides):
    return tiny_model(family, dtype=torch.float64, experts_implementation="eager", **overrides)


def reference_gradients(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: [T-1, d_model]} ∂L_t/∂(output of layer at t), one forward + one backward of L_t alone per t."""
    out = {layer: [] for layer in layers}
    for t in range(len(ids) - 1):
        store, handles = {}, []
        for layer in layers:
            def hook(module, args, output, layer=layer, store=store):
                store[layer] = output[0] if isinstance(output, tuple) else output
            handles.append(decoder_layers(model)[layer].register_forward_hook(hook))
        try:
            logits = model(input_ids=ids[None]).logits[0]
        finally:
            for h in handles:
                h.remove()
        loss = F.cross_entropy(logits[t:t + 1].double(), ids[t + 1:t + 2])
        for layer, g in zip(layers, torch.autograd.grad(loss, [store[layer] for layer in layers])):
            out[layer].append(g[0, t])
    return {layer: torch.stack(v) for layer, v in out.items()}


def block_change(model, layer: int, x: torch.Tensor, expert: int, mode: str) -> torch.Tensor:
    """[d_model] change of the MoE block's output at one token ``x`` when ``expert`` is removed in ``mode``: the
    block run twice, its router's weights edited by hand (renormalize: the kept weights rescaled to the old sum;
    reroute: the family's rule re-applied without the expert)."""
    gate = router(model, layer)
    adapter = adapter_for(model)

    def edit(module, args, output):
        logits, weights, indices = output[:3]
        hit = indices == expert
        if mode == "zero":
            weights = weights.masked_fill(hit, 0)
        elif mode == "renormalize":
            kept = weights.masked_fill(hit, 0)
            weights = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
        else:
            removed = torch.zeros_like(logits, dtype=torch.bool)
            removed[:, expert] = True
            new_w, new_i = adapter.select(module, logits, removed)
            weights, indices = new_w.to(weights.dtype), new_i.to(indices.dtype)
        return (logits, weights, indices, *output[3:])

    block = moe_block(model, layer)
    with torch.no_grad():
        clean = block(x[None, None])
        handle = gate.register_forward_hook(edit)
        try:
            ablated = block(x[None, None])
        finally:
            handle.remove()
    clean, ablated = (o[0] if isinstance(o, tuple) else o for o in (clean, ablated))
    return (ablated - clean).reshape(-1)


def block_inputs(model, ids, layers) -> dict[int, torch.Tensor]:
    store, handles = {}, []
    for layer in layers:
        def pre(module, args, kwargs, layer=layer):
            h = args[0] if args else kwargs["hidden_states"]
            store[layer] = h.reshape(-1, h.shape[-1]).detach()
        handles.append(moe_block(model, layer).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return store


def check_against_reference(model, ids, *, modes=MODES, n_check: int = 6, chunk: int = 5, tag: str = ""):
    desc = describe(model)
    layers = list(desc.moe_layers)
    state = clean_state(model, ids, layers=layers)
    ref = reference_gradients(model, ids, layers)
    got = own_loss_gradients(model, state, layers, max_query_tokens=chunk)
    for layer in layers:
        scale = float(ref[layer].abs().max())
        assert scale > 1e-3, (tag, layer)  # the positions' own losses depend on the layer
        # Exact to float64 except routers that score in float32 (DeepSeek): their rounding depends on batch shape.
        assert torch.allclose(got[layer], ref[layer], rtol=0, atol=1e-6 * scale), (tag, layer)
    table = attribute_sequence(model, ids, layers=layers, modes=modes, max_query_tokens=chunk)
    inputs = block_inputs(model, ids, layers)
    rng = np.random.default_rng(0)
    rows = table.iloc[rng.choice(len(table), size=min(n_check, len(table)), replace=False)]
    for row in rows.itertuples():
        for mode in modes:
            delta = block_change(model, row.layer, inputs[row.layer][row.position], row.expert, mode)
            expected = float(ref[row.layer][row.position] @ delta)
            got_value = getattr(row, f"estimate_{mode}")
            assert got_value == pytest.approx(expected, rel=1e-5, abs=1e-7), (tag, mode, row)
    return table


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_estimates_equal_per_position_autograd(family):
    model = f64(family)
    table = check_against_reference(model, random_ids(12, seed=3), tag=family)
    desc = describe(model)
    assert len(table) == 11 * desc.top_k * len(desc.moe_layers)
    assert (table["estimate_zero"] != 0).mean() > 0.9


def test_sum_of_losses_gradient_is_a_different_quantity():
    """The own-loss gradient differs from the gradient of the summed loss (which mixes later positions' losses in
    through attention): the check above could fail if the pass leaked between positions."""
    model = f64("olmoe")
    ids = random_ids(12, seed=3)
    store = {}
    handle = decoder_layers(model)[1].register_forward_hook(lambda m, a, o: store.setdefault("y", o[0] if
                                                                                               isinstance(o, tuple) else o))
    try:
        logits = model(input_ids=ids[None]).logits[0]
    finally:
        handle.remove()
    mixed = torch.autograd.grad(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"), store["y"])[0][0, :-1]
    own = own_loss_gradients(model, clean_state(model, ids), [1])[1]
    assert float((mixed - own).abs().max()) > 1e-2 * float(own.abs().max())
    assert torch.allclose(mixed[-1], own[-1])  # the last position's loss is the only one it enters


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_windows(family):
    model = f64(family, **WINDOWED[family])
    check_against_reference(model, random_ids(20, seed=5), modes=("zero",), chunk=7, tag=family)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope", "linear"])
def test_rotary_types(rope_type):
    family = _rope_cases(16)[rope_type][0]
    rotary_dim = 8 if family.startswith("deepseek") else 16
    _, params, extra = _rope_cases(rotary_dim)[rope_type]
    model = f64(family, rope_parameters={"rope_theta": 10000.0, **params}, **extra)
    check_against_reference(model, random_ids(20, seed=6), modes=("zero",), chunk=32, tag=rope_type)


def test_group_limited_routing_and_shared_experts():
    model = f64("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    check_against_reference(model, random_ids(12, seed=8), tag="v2 groups")


def test_public_attribute_rows_and_refusals():
    model = tiny_model("olmoe")
    seqs = [random_ids(9, seed=1), random_ids(7, seed=2)]
    table = attribute(model, seqs, layers=[2], modes=("zero", "renormalize"))
    assert list(table.columns[-2:]) == ["estimate_zero", "estimate_renormalize"]
    assert len(table) == (8 + 6) * describe(model).top_k
    assert set(table["doc_id"]) == {0, 1} and set(table["layer"]) == {2}
    state = clean_state(model, seqs[0], layers=[2])
    weights = state.moe[2].weights[:8].reshape(-1).numpy()
    np.testing.assert_allclose(table.loc[table["doc_id"] == 0, "weight"].to_numpy(), weights)
    for bad, match in ((dict(modes=()), "modes is empty"), (dict(modes=("mean-ish",)), "mode"),
                       (dict(layers=[99]), "layer")):
        with pytest.raises(ValueError, match=match):
            attribute(model, seqs, **{"layers": [2], **bad})
    with pytest.raises(ValueError, match="at least 2 tokens"):
        attribute(model, [torch.tensor([5])])
    assert isinstance(table, pd.DataFrame)


def test_out_of_memory_halves_the_chunk_with_the_same_gradients(monkeypatch):
    from moeaudit.intervene import _attribution

    model = f64("qwen2_moe")
    ids = random_ids(15, seed=4)
    state = clean_state(model, ids)
    layers = list(describe(model).moe_layers)
    whole = own_loss_gradients(model, state, layers, max_query_tokens=64)
    real, sizes = _attribution._chunk_gradients, []

    def fussy(ctx, first, layers, lo, hi):
        sizes.append(hi - lo)
        if hi - lo > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, first, layers, lo, hi)

    monkeypatch.setattr(_attribution, "_chunk_gradients", fussy)
    halved = own_loss_gradients(model, state, layers, max_query_tokens=64)
    assert sizes[:4] == [14, 7, 3, 3] and max(sizes[3:]) <= 3
    for layer in layers:
        assert torch.allclose(halved[layer], whole[layer], rtol=0, atol=1e-12)
