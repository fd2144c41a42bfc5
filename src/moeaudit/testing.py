"""Tiny randomly initialised MoE models of every supported family, for tests and examples (nothing downloads)."""

from __future__ import annotations

from typing import Any

import torch

from moeaudit.errors import did_you_mean

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
    # Weights large enough that attention mixes positions and removing an expert moves the loss visibly;
    # at HF's default 0.02 every effect is ~1e-4 and equivalence tests could not fail.
    "initializer_range": 0.125,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe": ("OlmoeConfig", {"intermediate_size": 32, "num_key_value_heads": 4, "num_experts": 16,
                              "num_experts_per_tok": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 64, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64, "num_key_value_heads": 2,
                                     "num_experts": 12, "num_experts_per_tok": 4, "mlp_only_layers": [1]}),
    "deepseek_v2": ("DeepseekV2Config", {"intermediate_size": 96, "moe_intermediate_size": 32,
                                         "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None,
                                         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                                         "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4,
                                         "first_k_dense_replace": 1, "topk_method": "greedy",
                                         "routed_scaling_factor": 1.0}),
    "deepseek_v3": ("DeepseekV3Config", {"intermediate_size": 96, "moe_intermediate_size": 32,
                                         "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24,
                                         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                                         "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
                                         "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
                                         "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 32, "num_key_value_heads": 2, "num_local_experts": 8,
                                  "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 64, "moe_intermediate_size": 32,
                                     "num_key_value_heads": 2, "head_dim": 16, "num_experts": 16,
                                     "num_experts_per_tok": 4, "norm_topk_prob": True}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 16,
                                 "num_local_experts": 8, "num_experts_per_tok": 4, "sliding_window": 8,
                                 "max_position_embeddings": 131072}),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILY_CONFIGS)

#: Standard deviation of the re-initialised router rows: logits of O(1) so routing is neither uniform nor one-hot.
ROUTER_STD = 0.3


def tiny_config(family: str, **overrides: Any):
    """The transformers config of a tiny model of ``family`` (see :func:`tiny_model`)."""
    import transformers

    if family not in _FAMILY_CONFIGS:
        raise ValueError(
            f"no tiny model for family {family!r}; valid: {', '.join(TINY_FAMILIES)}.{did_you_mean(family, TINY_FAMILIES)}"
        )
    class_name, specific = _FAMILY_CONFIGS[family]
    kwargs = {**_COMMON, **specific, **overrides}
    return getattr(transformers, class_name)(**kwargs)


def tiny_model(family: str, seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Build a randomly initialised causal LM of ``family`` with a few layers and 8-16 experts.

    Args:
        family: One of :data:`TINY_FAMILIES`.
        seed: Seed of the weight initialisation.
        dtype: Parameter dtype.
        **overrides: Config fields to change (``num_hidden_layers=6``, ``norm_topk_prob=True``, ...).

    Returns:
        The model, in eval mode on the CPU.
    """
    from transformers import AutoModelForCausalLM

    from moeaudit.models import adapter_for, moe_block, moe_layers

    config = tiny_config(family, **overrides)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        adapter = adapter_for(model)
        with torch.no_grad():
            for layer in moe_layers(model, adapter=adapter):
                gate = getattr(moe_block(model, layer), adapter.router_attr)
                gate.weight.normal_(0.0, ROUTER_STD)
                if getattr(gate, "bias", None) is not None:
                    gate.bias.normal_(0.0, 0.1)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.normal_(0.0, 0.05)
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(dtype)
    model.eval()
    return model
