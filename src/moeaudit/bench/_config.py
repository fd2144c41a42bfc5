"""What the benchmark measures on: :class:`BenchConfig` (one source for the options of ``moeaudit bench``) and the
presets, the public config shapes of the paper's checkpoints (random weights; nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

#: Model geometries: (family, transformers config fields). The three checkpoints' values are their published
#: ``config.json`` shapes; ``olmoe-reduced`` is OLMoE-1B-7B's layout (16 layers, 64 experts, top-8) at 1/8 width.
BENCH_PRESETS: MappingProxyType = MappingProxyType({
    "olmoe-reduced": ("olmoe", {
        "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 16, "num_attention_heads": 8,
        "num_key_value_heads": 8, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
        "max_position_embeddings": 4096, "norm_topk_prob": False}),
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": ("olmoe", {
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "norm_topk_prob": False, "tie_word_embeddings": False}),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 routed experts (top-4) plus one gated shared expert of width 5632
    "qwen1.5-moe-a2.7b": ("qwen2_moe", {
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "vocab_size": 151936,
        "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "norm_topk_prob": False, "qkv_bias": True, "decoder_sparse_step": 1, "use_sliding_window": False,
        "max_window_layers": 21, "tie_word_embeddings": False}),
    # deepseek-ai/DeepSeek-V2-Lite: multi-head latent attention, a dense first layer, 64 routed experts (top-6) and
    # 2 shared experts, YaRN rotary embeddings
    "deepseek-v2-lite": ("deepseek_v2", {
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "norm_topk_prob": False, "vocab_size": 102400, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 0.707, "mscale_all_dim": 0.707},
        "tie_word_embeddings": False}),
})


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings; every field is a ``moeaudit bench`` option (``--seq-len``, ``--set KEY=VALUE``, ...)."""

    preset: str = _opt("olmoe-reduced", f"model geometry: {', '.join(BENCH_PRESETS)}")
    num_hidden_layers: int | None = _opt(None, "decoder layers to build (default: the preset's); fewer layers at "
                                               "real width keep a CPU run short")
    set: tuple[str, ...] = _opt((), "override a config field of the preset, KEY=VALUE (repeatable), e.g. "
                                    "--set hidden_size=512", multiple=True)
    seq_len: int = _opt(512, "tokens per sequence (the paper: 512)")
    n_ablations: int = _opt(400, "token-scope ablations timed with the fast engine and the floor")
    naive_sample: int = _opt(8, "ablations timed with the naive engine (one full forward each)")
    layers: str = _opt("all", "comma-separated MoE layers to ablate, or 'all'")
    max_query_tokens: int | None = _opt(None, "cap on query tokens per chunk (default: sized from free memory)")
    dtype: str = _opt("float32", "float32, bfloat16 or float16")
    device: str = _opt("cpu", "cpu, cuda, cuda:N")
    seed: int = _opt(0, "seed of the weights, the sequence and the ablations")
    repeats: int = _opt(3, "timing repeats (the best is kept)")
    clock: str = _opt("wall", "wall (seconds as they pass) or cpu (the process's CPU seconds: not inflated by other "
                              "jobs on a shared machine; with one thread, what an idle machine's wall clock shows)")
    measure_memory: bool = _opt(True, "measure the fast engine's peak memory in one extra untimed run")
    attribution: bool = _opt(False, "also time attribution (moeaudit attribute): every token x active expert "
                                    "estimate against a forward, a forward + backward and the exact map")

    def __post_init__(self) -> None:
        from moeaudit.errors import ConfigError, did_you_mean

        if self.preset not in BENCH_PRESETS:
            raise ConfigError(f"unknown bench preset {self.preset!r}; valid: {', '.join(BENCH_PRESETS)}."
                              f"{did_you_mean(self.preset, BENCH_PRESETS)}")
        for key in ("seq_len", "n_ablations", "naive_sample", "repeats"):
            if getattr(self, key) < (2 if key == "seq_len" else 1):
                raise ConfigError(f"{key}={getattr(self, key)} is too small.")
        if self.clock not in ("wall", "cpu"):
            raise ConfigError(f"clock={self.clock!r} is not valid; choose wall or cpu.")
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} must be at least 1.")
        if self.max_query_tokens is not None and self.max_query_tokens < 1:
            raise ConfigError(f"max_query_tokens={self.max_query_tokens} must be at least 1 (or unset).")
        object.__setattr__(self, "set", tuple(self.set))
        self.overrides()  # validates KEY=VALUE
        self.layer_list()

    def overrides(self) -> dict[str, Any]:
        """``--set`` values parsed (``int``, ``float``, ``true``/``false``, ``none``, else the string)."""
        from moeaudit.errors import ConfigError

        out: dict[str, Any] = {}
        for item in self.set:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set hidden_size=512.")
            out[key.strip()] = _parse_value(value.strip())
        return out

    def layer_list(self) -> tuple[int, ...] | None:
        """MoE layers to ablate (``None``: every MoE layer)."""
        from moeaudit.errors import ConfigError

        text = str(self.layers).strip()
        if text in ("", "all"):
            return None
        try:
            return tuple(int(v) for v in text.replace(" ", ",").split(",") if v)
        except ValueError:
            raise ConfigError(f"layers={self.layers!r}: give comma-separated integers (e.g. 0,2) or 'all'.") from None

    def model_config(self) -> tuple[str, dict[str, Any]]:
        """``(family, config fields)``: the preset, then ``num_hidden_layers``, then ``--set`` overrides."""
        family, values = BENCH_PRESETS[self.preset]
        values = dict(values)
        if self.num_hidden_layers is not None:
            values["num_hidden_layers"] = self.num_hidden_layers
        values.update(self.overrides())
        values.setdefault("max_position_embeddings", 4096)
        values["max_position_embeddings"] = max(values["max_position_embeddings"], self.seq_len)
        return family, values


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


BENCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BenchConfig))
