"""The benchmark runs end to end on small geometries of each preset's family, its engines agree, it measures memory,
and the presets carry the checkpoints' published shapes (no timing asserts)."""

from __future__ import annotations

import pytest

from moeaudit.bench import BENCH_PRESETS, BenchConfig, build_model, format_result, run_bench
from moeaudit.bench.__main__ import main
from moeaudit.models import describe

SMALL = {
    "olmoe-1b-7b": ("hidden_size=32", "intermediate_size=16", "num_attention_heads=4", "num_key_value_heads=4",
                    "vocab_size=256", "num_experts=8"),
    "qwen1.5-moe-a2.7b": ("hidden_size=32", "intermediate_size=32", "moe_intermediate_size=16",
                          "shared_expert_intermediate_size=32", "num_attention_heads=4", "num_key_value_heads=4",
                          "vocab_size=256", "num_experts=8"),
    "deepseek-v2-lite": ("hidden_size=32", "intermediate_size=32", "moe_intermediate_size=16", "kv_lora_rank=16",
                         "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "num_attention_heads=4",
                         "num_key_value_heads=4", "vocab_size=256", "n_routed_experts=8"),
}


@pytest.mark.parametrize("preset", sorted(SMALL))
def test_bench_presets_at_small_width(preset):
    cfg = BenchConfig(preset=preset, num_hidden_layers=3, set=SMALL[preset], seq_len=40, n_ablations=10,
                      naive_sample=2, repeats=1)
    result = run_bench(cfg)
    assert result.family == BENCH_PRESETS[preset][0] and result.n_layers == 3
    assert result.max_abs_diff < 1e-4
    assert result.naive_rate > 0 and result.fast_rate > 0 and result.floor_per_ablation_s > 0
    assert result.speedup == result.naive_per_ablation_s / result.fast_per_ablation_s
    assert result.peak_memory_bytes is not None and result.clean_state_bytes > 0
    assert 0 < result.ablation_tensor_peak_bytes <= result.chunk_estimate_bytes
    text = format_result(result)
    assert "ablations/s" in text and "fast / floor" in text and "tensor peak" in text


def test_presets_carry_the_published_shapes():
    family, values = BenchConfig(preset="deepseek-v2-lite", num_hidden_layers=4).model_config()
    assert family == "deepseek_v2" and values["num_hidden_layers"] == 4
    assert (values["n_routed_experts"], values["n_shared_experts"], values["num_experts_per_tok"]) == (64, 2, 6)
    assert (values["kv_lora_rank"], values["first_k_dense_replace"], values["hidden_size"]) == (512, 1, 2048)
    assert BENCH_PRESETS["qwen1.5-moe-a2.7b"][1]["num_experts"] == 60
    assert BENCH_PRESETS["olmoe-1b-7b"][1]["num_experts_per_tok"] == 8
    # the structure survives at small width: a dense first layer and two shared experts
    small = build_model(BenchConfig(preset="deepseek-v2-lite", num_hidden_layers=3, set=SMALL["deepseek-v2-lite"]))
    desc = describe(small)
    assert desc.dense_layers == (0,) and desc.n_shared_experts == 2 and desc.top_k == 6


def test_bench_command_line(capsys):
    assert main(["--num-hidden-layers", "2", "--seq-len", "24", "--n-ablations", "4", "--naive-sample", "1",
                 "--layers", "0,1", "--repeats", "1", "--no-measure-memory", "--max-query-tokens", "2",
                 *[a for kv in SMALL["olmoe-1b-7b"] for a in ("--set", kv)], "--preset", "olmoe-1b-7b",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert '"speedup"' in out and '"query_tokens_per_chunk": 2' in out
    with pytest.raises(Exception, match="--set 'hidden_size': write KEY=VALUE"):
        BenchConfig(set=("hidden_size",))


def test_attribution_bench_at_small_width():
    from moeaudit.bench._attribution import format_attribution, run_attribution_bench

    cfg = BenchConfig(preset="olmoe-1b-7b", num_hidden_layers=2, set=SMALL["olmoe-1b-7b"], seq_len=24,
                      n_ablations=6, repeats=1, attribution=True)
    r = run_attribution_bench(cfg)
    assert r.estimates == 23 * 8 * 2 and r.forward_s > 0 and r.attribution_s > 0
    assert r.exact_s == r.exact_clean_s + r.exact_per_ablation_s * r.estimates
    assert "forward + backward" in format_attribution(r)
