"""The embedded low-redundancy checkpoint ``builtin:tiny-mixtral`` (Mixtral, 8 experts, top-2): files, shared
tokenizer, offline loading, ``describe``, and its quality bar recomputed here (not read from eval.json)."""

from __future__ import annotations

import json
import math

import pytest
from test_builtin import _cv, _measure

from moeaudit.builtin import BUILTIN_MODELS, builtin_model_path
from moeaudit.builtin import corpus as C

CKPT = BUILTIN_MODELS["tiny-mixtral"]
OLMOE = BUILTIN_MODELS["tiny-moe"]


def test_checkpoint_files_size_and_config():
    assert builtin_model_path("builtin:tiny-mixtral") == builtin_model_path("tiny-mixtral") == CKPT
    names = {p.name for p in CKPT.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                     "training_log.csv", "eval.json"):
        assert required in names, required
    assert sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file()) <= 20 * 1024 * 1024
    cfg = json.loads((CKPT / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["sliding_window"] is None and cfg["router_jitter_noise"] == 0.0
    assert not cfg.get("output_router_logits", False)
    # the same active expert width per token as tiny-moe: 2 x 128 = 4 x 64
    moe = json.loads((OLMOE / "config.json").read_text())
    assert (cfg["num_experts_per_tok"] * cfg["intermediate_size"]
            == moe["num_experts_per_tok"] * moe["intermediate_size"])
    assert cfg["num_local_experts"] * cfg["intermediate_size"] == moe["num_experts"] * moe["intermediate_size"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        assert cfg[key] == moe[key], key


def test_tokenizer_is_tiny_moes_and_training_is_recorded():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (CKPT / name).read_bytes() == (OLMOE / name).read_bytes(), name
    ev = json.loads((CKPT / "eval.json").read_text())
    assert ev["args"]["family"] == "mixtral" and isinstance(ev["args"]["seed"], int)
    assert "--family mixtral" in ev["command"]
    card = (CKPT / "README.md").read_text()
    assert "--family mixtral" in card and f"Seed {ev['args']['seed']}" in card and "MixtralForCausalLM" in card


@pytest.fixture(scope="module")
def loaded():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        torch = pytest.importorskip("torch")
        import moeaudit

        torch.set_num_threads(min(2, torch.get_num_threads()))
        model, tok = moeaudit.load_model("builtin:tiny-mixtral")
    finally:
        mp.undo()
    held = C.build_labelled_documents("heldout")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, t in held]
    return model.eval(), tok, ids, [d for d, _ in held]


@pytest.mark.slow
def test_loads_offline_and_describe_reports_mixtral(loaded):
    from transformers import MixtralForCausalLM

    import moeaudit

    model, tok, _, _ = loaded
    assert isinstance(model, MixtralForCausalLM)
    desc = moeaudit.describe(model)
    assert (desc.family, desc.n_experts, desc.top_k, desc.n_shared_experts) == ("mixtral", 8, 2, 0)
    assert desc.norm_topk_prob and desc.moe_layers == tuple(range(8))
    assert tok.eos_token_id == model.config.eos_token_id and len(tok) == model.config.vocab_size


@pytest.mark.slow
def test_quality_bar_and_learned_routing(loaded):
    import torch
    from transformers import MixtralForCausalLM

    model, _, ids, labels = loaded
    ce, targets, counts, _, router_entropy = _measure(model, ids, labels)
    n = sum(targets.values())
    h_unigram = -sum(c / n * math.log(c / n) for c in targets.values())
    assert ce <= 0.6 * h_unigram, (ce, h_unigram)
    assert (_cv(counts) > 0.1).all(), _cv(counts)
    torch.manual_seed(0)
    rand = MixtralForCausalLM(model.config).eval()
    sub = slice(0, None, 4)
    r_ent = _measure(rand, ids[sub], labels[sub])[4]
    t_ent = _measure(model, ids[sub], labels[sub])[4]
    assert t_ent.mean() < r_ent.mean() - 0.1, (t_ent, r_ent)
