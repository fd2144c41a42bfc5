"""The benchmark runs end to end on a small geometry and its fast and naive engines agree (no timing asserts)."""

from __future__ import annotations

from moeaudit.bench import BenchConfig, format_result, main, run_bench


def test_bench_small_geometry(capsys):
    cfg = BenchConfig(seq_len=48, n_ablations=12, naive_sample=3, layers=(0, 2, 3), num_hidden_layers=4,
                      num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, num_attention_heads=4,
                      vocab_size=256, repeats=1)
    result = run_bench(cfg)
    assert result.max_abs_diff < 1e-4
    assert result.naive_rate > 0 and result.fast_rate > 0 and result.floor_per_ablation_s > 0
    assert result.speedup == result.naive_per_ablation_s / result.fast_per_ablation_s
    text = format_result(result)
    assert "ablations/s" in text and "fast / floor" in text
    assert main(["--seq-len", "32", "--n-ablations", "4", "--naive-sample", "1", "--layers", "0", "1",
                 "--num-hidden-layers", "2", "--num-experts", "4", "--top-k", "2", "--hidden-size", "32",
                 "--intermediate-size", "16", "--num-attention-heads", "4", "--vocab-size", "64", "--repeats", "1",
                 "--json"]) == 0
    assert '"speedup"' in capsys.readouterr().out
