"""observe(): every column against an independent brute force on every family; definitions; registry; bad input."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cached_tiny

from moeaudit.models import adapter_for, decoder_layers, describe, moe_block
from moeaudit.observation._observe import BUILTIN_METRICS, METRICS, observe, register_metric, unregister_metric
from moeaudit.testing import TINY_FAMILIES

LENGTHS = (5, 9, 13)
CORPUS_COLUMNS = ["utilization_rate", "mean_routing_weight_when_active", "activation_norm", "activation_std",
                  "soft_utilization", "reap", "frequency_weighted", "ean", "msan", "easy_ep", "easy_ep_mean"]
WEIGHT_COLUMNS = ["router_norm", "weight_norm", "stable_rank"]
RTOL, ATOL = 1e-5, 1e-5  # float32 forward; sums (ean) of ~100 values of ~5 keep ~1e-6 relative error


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in LENGTHS]


def _olmoe_expert(experts, e: int, x: np.ndarray) -> np.ndarray:
    """OLMoE's expert MLP from its weights: W_down (silu(W_gate x) * W_up x)."""
    gate_up = experts.gate_up_proj[e].detach().double().numpy() @ x
    gate, up = np.split(gate_up, 2)
    return experts.down_proj[e].detach().double().numpy() @ (gate / (1 + np.exp(-gate)) * up)


def _probs(family: str, logits: np.ndarray) -> np.ndarray:
    if family == "deepseek_v3":
        s = 1 / (1 + np.exp(-logits))
        return s / s.sum(axis=-1, keepdims=True)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@functools.cache
def brute_force(family: str) -> dict:
    """Per MoE layer: routed pairs (expert, weight, norm, change around the MoE sub-layer, change from the routed
    output alone) and per-token logits/probs, by plain loops."""
    model, desc, adapter = cached_tiny(family), describe(cached_tiny(family)), adapter_for(cached_tiny(family))
    layers = {layer: {"pairs": [], "logits": []} for layer in desc.moe_layers}
    seen: dict = {}
    handles = []
    for layer in desc.moe_layers:
        decoder = decoder_layers(model)[layer]
        gate = getattr(decoder.mlp, adapter.router_attr)
        handles += [
            gate.register_forward_hook(lambda m, a, o, k=layer: seen.__setitem__((k, "route"), (a[0], o))),
            decoder.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, k=layer: seen.__setitem__((k, "pre"), a[0])),
            decoder.register_forward_hook(
                lambda m, a, o, k=layer: seen.__setitem__((k, "post"), o[0] if isinstance(o, tuple) else o)),
        ]
    try:
        for seq in _sequences():
            with torch.no_grad():
                model(input_ids=seq[None])
            for layer in desc.moe_layers:
                x, (logits, weights, indices) = seen[layer, "route"]
                x = x.reshape(-1, x.shape[-1]).detach()
                pre = seen[layer, "pre"].reshape(len(seq), -1).double().numpy()
                post = seen[layer, "post"].reshape(len(seq), -1).double().numpy()
                experts = moe_block(model, layer).experts
                layers[layer]["logits"].append(logits.reshape(len(seq), -1).double().numpy())
                for t in range(len(seq)):
                    change = 1 - pre[t] @ post[t] / (np.linalg.norm(pre[t]) * np.linalg.norm(post[t]))
                    outs = []
                    for j in range(desc.top_k):
                        e = int(indices[t, j])
                        with torch.no_grad():
                            out = experts(x[t:t + 1], torch.tensor([[e]]), torch.ones(1, 1)).double().numpy()[0]
                        if family == "olmoe":
                            np.testing.assert_allclose(out, _olmoe_expert(experts, e, x[t].double().numpy()),
                                                       rtol=1e-4, atol=1e-5)
                        outs.append((e, float(weights[t, j]), out))
                    after = pre[t] + sum(w * out for _, w, out in outs)  # the routed experts' output only
                    routed_change = 1 - pre[t] @ after / (np.linalg.norm(pre[t]) * np.linalg.norm(after))
                    for e, w, out in outs:
                        layers[layer]["pairs"].append((e, w, np.linalg.norm(out), change, routed_change))
    finally:
        for h in handles:
            h.remove()
    return {"desc": desc, "layers": layers}


def expected_frame(family: str) -> pd.DataFrame:
    bf = brute_force(family)
    desc, rows = bf["desc"], []
    for layer, data in bf["layers"].items():
        pairs = np.array(data["pairs"])  # [P, 5]: expert, weight, norm, change, routed change
        logits = np.concatenate(data["logits"])
        probs = _probs(desc.family, logits)
        for e in range(desc.n_experts):
            mine = pairs[pairs[:, 0] == e]
            w, a, c, rc = mine[:, 1], mine[:, 2], mine[:, 3], mine[:, 4]
            n = len(mine)
            mean = (lambda v: v.mean()) if n else (lambda v: np.nan)
            rows.append({
                "layer": layer, "expert": e, "routed_count": n, "utilization_rate": n / len(logits),
                "mean_routing_weight_when_active": mean(w), "activation_norm": mean(a),
                "activation_std": np.std(a, ddof=1) if n > 1 else np.nan,
                "soft_utilization": probs[:, e].mean(), "reap": mean(w * a), "frequency_weighted": w.sum(),
                "ean": a.sum(), "msan": mean(a**2),
                "easy_ep": (w * a * np.maximum(rc, 0)).sum(), "easy_ep_mean": mean(w * a * c),
            })
    return pd.DataFrame(rows)


@functools.cache
def observed(family: str) -> pd.DataFrame:
    return observe(cached_tiny(family), _sequences())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_corpus_column_matches_brute_force(family):
    got, want = observed(family), expected_frame(family)
    assert list(got.columns[:3]) == ["layer", "expert", "routed_count"]
    np.testing.assert_array_equal(got[["layer", "expert", "routed_count"]].to_numpy(),
                                  want[["layer", "expert", "routed_count"]].to_numpy())
    for column in CORPUS_COLUMNS:
        np.testing.assert_allclose(got[column], want[column], rtol=RTOL, atol=ATOL, err_msg=column)
    # The tiny corpus must exercise the NaN path or the test would not cover it; at least check it is consistent.
    assert got["activation_std"].isna().equals(got["routed_count"] < 2)


def test_columns_order_and_dtypes():
    df = observed("olmoe")
    assert list(df.columns) == ["layer", "expert", "routed_count", *CORPUS_COLUMNS, *WEIGHT_COLUMNS]
    assert list(BUILTIN_METRICS) == [*CORPUS_COLUMNS, *WEIGHT_COLUMNS]
    assert set(BUILTIN_METRICS) <= set(METRICS) and all(METRICS[name] for name in BUILTIN_METRICS)
    assert all(df[c].dtype == np.int64 for c in ("layer", "expert", "routed_count"))
    assert all(df[c].dtype == np.float64 for c in df.columns[3:])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_utilization_sums_to_top_k_and_soft_utilization_to_one(family):
    df, desc = observed(family), describe(cached_tiny(family))
    per_layer = df.groupby("layer")
    np.testing.assert_allclose(per_layer["utilization_rate"].sum(), desc.top_k, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per_layer["soft_utilization"].sum(), 1.0, rtol=0, atol=1e-6)
    assert (per_layer["routed_count"].sum() == desc.top_k * sum(LENGTHS)).all()


def test_definitions_follow_the_paper_not_the_public_scripts():
    """Utilisation from routed top-k, routing weight from the model's weights; not from raw logits."""
    df = observed("olmoe")
    logits = np.concatenate(brute_force("olmoe")["layers"][0]["logits"])
    layer0 = df[df.layer == 0]
    active = layer0[layer0.routed_count > 0]
    assert ((active.mean_routing_weight_when_active > 0) & (active.mean_routing_weight_when_active <= 1)).all()
    assert (logits.mean(axis=0) < 0).any()  # a logit-based "weight" would be negative somewhere
    # top-k membership: each token counts once for each of its k experts, so the rates are multiples of 1/N
    n_tokens = sum(LENGTHS)
    np.testing.assert_allclose(layer0.utilization_rate * n_tokens, np.round(layer0.utilization_rate * n_tokens),
                               atol=1e-9)
    argmax_rate = np.bincount(logits.argmax(axis=1), minlength=16) / n_tokens
    assert not np.allclose(layer0.utilization_rate, argmax_rate)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weight_only_metrics_match_numpy(family):
    model, desc, df = cached_tiny(family), describe(cached_tiny(family)), observed(family)
    for layer in desc.moe_layers:
        block = moe_block(model, layer)
        router = getattr(block, adapter_for(model).router_attr).weight.detach().double().numpy()
        params = {n: p.detach().double().numpy() for n, p in block.experts.named_parameters()}
        rows = df[df.layer == layer].set_index("expert")
        for e in range(desc.n_experts):
            squares = sum((p[e] ** 2).sum() for p in params.values())
            s = np.linalg.svd(params["down_proj"][e], compute_uv=False)
            assert rows.loc[e, "router_norm"] == pytest.approx(np.linalg.norm(router[e]), rel=1e-6)
            assert rows.loc[e, "weight_norm"] == pytest.approx(np.sqrt(squares), rel=1e-9)
            assert rows.loc[e, "stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-4)
    if family == "gpt_oss":  # biases belong to the expert
        assert {"gate_up_proj_bias", "down_proj_bias"} <= set(params)


def test_generator_is_consumed_once_and_batching_masks_padding():
    model, seqs = cached_tiny("qwen2_moe"), _sequences()
    consumed, calls = [], []

    def stream():
        for s in seqs:
            consumed.append(len(s))
            yield s

    gen = stream()
    df = observe(model, gen, progress=calls.append)
    assert consumed == list(LENGTHS) and calls == [1, 2, 3] and next(gen, None) is None
    pd.testing.assert_frame_equal(df, observed("qwen2_moe"))
    batched = observe(model, seqs, batch_size=2)
    np.testing.assert_array_equal(batched.routed_count, df.routed_count)
    for column in CORPUS_COLUMNS:
        np.testing.assert_allclose(batched[column], df[column], rtol=1e-5, atol=1e-5, err_msg=column)


def test_registering_a_criterion_adds_a_column_with_the_right_values():
    bf = brute_force("mixtral")
    register_metric("weight_sq_sum", per_token=lambda b: b.weight**2, reduce="sum", doc="sum over A_e of g^2")
    register_metric("mean_logit", per_token=lambda b: b.logits.float(), over="all", doc="mean logit, all tokens")
    register_metric("down_max", weight_only=lambda model, layer, experts: [
        float(moe_block(model, layer).experts.down_proj[e].abs().max()) for e in experts], doc="max |W_down|")
    try:
        assert "weight_sq_sum" in METRICS
        df = observe(cached_tiny("mixtral"), _sequences(), metrics=["weight_sq_sum", "mean_logit", "down_max"])
    finally:
        for name in ("weight_sq_sum", "mean_logit", "down_max"):
            unregister_metric(name)
    assert list(df.columns) == ["layer", "expert", "routed_count", "weight_sq_sum", "mean_logit", "down_max"]
    assert "weight_sq_sum" not in METRICS
    model = cached_tiny("mixtral")
    for layer, data in bf["layers"].items():
        pairs, rows = np.array(data["pairs"]), df[df.layer == layer]
        want = [(pairs[pairs[:, 0] == e, 1] ** 2).sum() for e in range(8)]
        np.testing.assert_allclose(rows.weight_sq_sum, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rows.mean_logit, np.concatenate(data["logits"]).mean(axis=0), atol=1e-6)
        down = moe_block(model, layer).experts.down_proj.detach().numpy()
        np.testing.assert_allclose(rows.down_max, np.abs(down).max(axis=(1, 2)), rtol=1e-7)


def test_registry_rejects_bad_definitions():
    with pytest.raises(ValueError, match="exactly one of"):
        register_metric("x", doc="", per_token=None)
    with pytest.raises(ValueError, match="mean, sum, std"):
        register_metric("x", doc="", per_token=lambda b: b.weight, reduce="median")
    with pytest.raises(ValueError, match="routed, all"):
        register_metric("x", doc="", per_token=lambda b: b.weight, over="everything")
    with pytest.raises(ValueError, match="already registered"):
        register_metric("reap", doc="", per_token=lambda b: b.weight)
    with pytest.raises(ValueError, match="built-in"):
        unregister_metric("reap")
    assert "x" not in METRICS


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_bad_input_raises_clear_errors_and_leaves_model_clean():
    model = cached_tiny("deepseek_v2")  # layer 0 is dense
    ids = torch.randint(3, 128, (6,))
    with pytest.raises(ValueError, match="no sequences"):
        observe(model, [])
    with pytest.raises(ValueError, match="pass 1-D sequences"):
        observe(model, [ids[None]])
    with pytest.raises(ValueError, match="empty sequence"):
        observe(model, [ids[:0]])
    with pytest.raises(ValueError, match="must be integers"):
        observe(model, [ids.float()])
    with pytest.raises(ValueError, match=r"valid MoE layers: \[1, 2, 3\] \(0 are dense\)"):
        observe(model, [ids], layers=[0])
    with pytest.raises(ValueError, match=r"layers=\[99\]"):
        observe(model, [ids], layers=[1, 99])
    with pytest.raises(ValueError, match="batch_size"):
        observe(model, [ids], batch_size=0)
    with pytest.raises(ValueError, match=r"unknown metric 'rep'.*Did you mean 'reap'"):
        observe(model, [ids], metrics=["rep"])
    before = _hooks(model)
    with pytest.raises(IndexError):
        observe(model, [torch.tensor([5, 100_000])])  # fails inside the forward, under the hooks
    assert _hooks(model) == before


def test_layer_and_metric_subsets():
    model = cached_tiny("deepseek_v2")
    df = observe(model, _sequences(), layers=[3], metrics=["reap", "stable_rank"])
    assert list(df.columns) == ["layer", "expert", "routed_count", "reap", "stable_rank"]
    full = observed("deepseek_v2")
    pd.testing.assert_frame_equal(df.reset_index(drop=True),
                                  full[full.layer == 3][df.columns].reset_index(drop=True))
