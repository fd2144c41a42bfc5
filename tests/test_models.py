"""Adapters, describe/moe_layers, select() against each router, loading round trip, bad models."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_tiny, random_ids

import moeaudit
from moeaudit.errors import ModelSourceError, UnsupportedModelError
from moeaudit.intervene import dense_weights
from moeaudit.intervene._state import clean_state
from moeaudit.models import FAMILIES, adapter_for, describe, moe_layers, router
from moeaudit.testing import TINY_FAMILIES, tiny_config, tiny_model


def _expected(family: str, config) -> dict:
    n = config.num_hidden_layers
    if family == "qwen2_moe":
        moe = [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
        return dict(moe_layers=moe, n_experts=config.num_experts, top_k=config.num_experts_per_tok,
                    n_shared=1, gated=True, norm=config.norm_topk_prob, scale=1.0)
    if family in ("deepseek_v2", "deepseek_v3"):
        return dict(moe_layers=list(range(config.first_k_dense_replace, n)), n_experts=config.n_routed_experts,
                    top_k=config.num_experts_per_tok, n_shared=config.n_shared_experts, gated=False,
                    norm=family == "deepseek_v3" and config.norm_topk_prob, scale=config.routed_scaling_factor)
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    norm = True if family in ("mixtral", "gpt_oss") else config.norm_topk_prob
    return dict(moe_layers=list(range(n)), n_experts=n_experts, top_k=config.num_experts_per_tok, n_shared=0,
                gated=False, norm=norm, scale=1.0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_describe_matches_config(family):
    model = cached_tiny(family)
    desc = describe(model)
    exp = _expected(family, model.config)
    assert desc.family == family
    assert desc.n_layers == model.config.num_hidden_layers
    assert list(desc.moe_layers) == exp["moe_layers"] == moeaudit.moe_layers(model)
    assert set(desc.dense_layers) == set(range(desc.n_layers)) - set(exp["moe_layers"])
    assert desc.n_experts == exp["n_experts"]
    assert desc.top_k == exp["top_k"]
    assert desc.n_shared_experts == exp["n_shared"]
    assert desc.shared_expert_gated == exp["gated"]
    assert desc.norm_topk_prob == bool(exp["norm"])
    assert desc.routed_scaling_factor == pytest.approx(exp["scale"])
    assert desc.d_model == model.config.hidden_size


def test_dense_layers_are_excluded():
    assert describe(cached_tiny("qwen2_moe")).dense_layers == (1,)
    assert describe(cached_tiny("deepseek_v2")).dense_layers == (0,)
    model = tiny_model("deepseek_v3", first_k_dense_replace=2)
    assert moe_layers(model) == [2, 3]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_select_reproduces_router(family):
    """The family's routing rule, applied to the router's own logits, gives the router's own weights."""
    model = cached_tiny(family)
    adapter = adapter_for(model)
    desc = describe(model)
    state = clean_state(model, random_ids(48, seed=1), desc=desc)
    for layer, ls in state.moe.items():
        weights, indices = adapter.select(router(model, layer, adapter), ls.logits, None)
        ours = dense_weights(weights, indices, desc.n_experts)
        theirs = dense_weights(ls.weights, ls.indices, desc.n_experts)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_group_limited_deepseek_v2_select():
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    adapter = adapter_for(model)
    state = clean_state(model, random_ids(40, seed=2))
    for layer, ls in state.moe.items():
        w, i = adapter.select(router(model, layer, adapter), ls.logits, None)
        torch.testing.assert_close(dense_weights(w, i, 16), dense_weights(ls.weights, ls.indices, 16))
        # chosen experts come from at most topk_group groups of 4
        assert int((i // 4).unique(dim=None).numel()) <= 4
        assert all(len(set((row // 4).tolist())) <= 2 for row in i)


def test_dense_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(UnsupportedModelError, match="dense model.*supports the MoE families: deepseek_v2"):
        describe(dense)


def test_unknown_moe_family_is_refused():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**tiny_config("qwen2_moe").to_dict()}))
    model.config.model_type = "my_new_moe"
    with pytest.raises(UnsupportedModelError, match="no adapter for.*To add one.*_families.py"):
        describe(model)


def test_all_dense_layers_of_moe_family_refused():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", mlp_only_layers=[0, 1, 2, 3]))
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        describe(model)


def test_every_family_has_an_adapter_and_tiny_model():
    assert set(FAMILIES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2", "gpt_oss"])
def test_load_model_round_trip(tmp_path, family):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = cached_tiny(family)
    model.save_pretrained(tmp_path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    loaded, tokenizer = moeaudit.load_model(tmp_path, dtype="float32")
    assert not loaded.training
    assert describe(loaded) == describe(model)
    ids = random_ids(20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[None]).logits, model(ids[None]).logits)
    assert tokenizer("w5 w7")["input_ids"] == [5, 7]


def test_load_model_bad_inputs(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        moeaudit.load_model(tmp_path)
    with pytest.raises(ModelSourceError, match="no such directory"):
        moeaudit.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype 'float8' is not supported; valid: auto"):
        moeaudit.load_model(tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="device='banana' is not a device"):
        moeaudit.load_model("builtin:tiny-moe", device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is usable here"):
            moeaudit.load_model("builtin:tiny-moe", device="cuda")
    import shutil

    from moeaudit.builtin import builtin_model_path

    damaged = tmp_path / "damaged"
    shutil.copytree(builtin_model_path("tiny-moe"), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a copy cut short
    with pytest.raises(ModelSourceError, match="a .safetensors weight file is damaged .*download or copy"):
        moeaudit.load_model(damaged)


def test_load_model_unknown_builtin():
    with pytest.raises(ModelSourceError, match="valid: builtin:tiny-moe"):
        moeaudit.load_model("builtin:nope")


def test_tiny_model_unknown_family():
    with pytest.raises(ValueError, match="valid: olmoe.*Did you mean 'mixtral'"):
        tiny_model("mixtrall")


def test_tiny_model_is_deterministic_and_non_degenerate():
    a, b = tiny_model("olmoe", seed=3), tiny_model("olmoe", seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    state = clean_state(a, random_ids(64))
    for ls in state.moe.values():
        # top-1 weight is neither uniform (1/16) nor one-hot
        top = ls.weights.max(dim=-1).values
        assert 0.1 < float(top.mean()) < 0.9
        assert ls.indices.unique().numel() >= 8  # routing is not stuck on a few experts
        assert len({tuple(sorted(row)) for row in ls.indices.tolist()}) >= 16  # tokens route differently
