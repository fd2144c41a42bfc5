"""The engine benchmark: ablations/second of the naive and fast engines at the paper's geometry, and the floor.

Run ``moeaudit bench`` or ``python -m moeaudit.bench``. The model is a randomly initialised OLMoE-architecture
model with OLMoE-1B-7B's layout (16 layers, 64 experts, top-8); its width is reduced by default so the benchmark
runs on a laptop CPU (``--hidden-size 2048 --intermediate-size 1024 --vocab-size 50304`` gives the real size on a
GPU). The floor is the unavoidable part of a token-scope ablation: pushing its one query token through the
remaining layers and the LM head, in the same batches the fast engine uses.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

import torch

from moeaudit.intervene import Ablation, SequenceAblator
from moeaudit.intervene._fast import _mask_capable_attention, _run_chunk, run_fast
from moeaudit.intervene._naive import run_naive
from moeaudit.models import describe


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark geometry (defaults: the paper's sequence length and OLMoE's layout at reduced width)."""

    seq_len: int = 512
    n_ablations: int = 400
    naive_sample: int = 8
    layers: tuple[int, ...] = (0, 4, 7, 11, 15)
    num_hidden_layers: int = 16
    num_experts: int = 64
    top_k: int = 8
    hidden_size: int = 256
    intermediate_size: int = 128
    num_attention_heads: int = 8
    vocab_size: int = 50304
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    repeats: int = 3


@dataclass(frozen=True)
class BenchResult:
    """Measured figures (seconds; rates in ablations/second)."""

    config: BenchConfig
    device_name: str
    naive_per_ablation_s: float
    fast_per_ablation_s: float
    fast_marginal_per_ablation_s: float
    clean_pass_s: float
    floor_per_ablation_s: float
    naive_rate: float
    fast_rate: float
    speedup: float
    marginal_over_floor: float
    amortized_over_floor: float
    max_abs_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model(cfg: BenchConfig):
    from moeaudit.models import resolve_dtype
    from moeaudit.testing import tiny_model

    model = tiny_model("olmoe", seed=cfg.seed, num_hidden_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts,
                       num_experts_per_tok=cfg.top_k, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_attention_heads, vocab_size=cfg.vocab_size,
                       initializer_range=0.02, max_position_embeddings=max(4096, cfg.seq_len))
    return model.to(device=cfg.device, dtype=resolve_dtype(cfg.dtype))


def _best(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def run_bench(cfg: BenchConfig = BenchConfig()) -> BenchResult:
    """Time both engines on the same ablations; report rates, the speed-up and the ratio to the floor."""
    model = _model(cfg)
    desc = describe(model)
    layers = [layer for layer in cfg.layers if layer in desc.moe_layers]
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, cfg.vocab_size, (cfg.seq_len,), generator=gen).to(cfg.device)
    rng = random.Random(cfg.seed)
    probe = SequenceAblator(model, ids, layers=layers)
    ablations = []
    for _ in range(cfg.n_ablations):
        layer = rng.choice(layers)
        t = rng.randrange(cfg.seq_len - 1)
        ablations.append(Ablation(layer, t, (int(probe.state.moe[layer].indices[t, rng.randrange(cfg.top_k)]),)))

    def fast_all():
        ablator = SequenceAblator(model, ids, layers=layers)
        return ablator.run(ablations)

    fast_total = _best(fast_all, cfg.repeats, cfg.device)
    clean = _best(lambda: SequenceAblator(model, ids, layers=layers), cfg.repeats, cfg.device)
    marginal = _best(lambda: run_fast(model, probe.state, ablations, "zero"), cfg.repeats, cfg.device)

    # Floor: the same query tokens, unchanged, through the remaining layers + LM head, in the same batches.
    by_layer: dict[int, list[int]] = {}
    for i, ab in enumerate(ablations):
        by_layer.setdefault(ab.layer, []).append(i)

    def floor():
        with _mask_capable_attention(model):
            for layer, idxs in by_layer.items():
                out = probe.state.layer_out[layer]
                blocks = [(k, torch.tensor([ablations[i].position], device=ids.device),
                           out[ablations[i].position][None], 0.0, 0.0) for k, i in enumerate(idxs)]
                results = [None] * len(idxs)
                sub = [ablations[i] for i in idxs]
                for start in range(0, len(blocks), 1024):
                    _run_chunk(model, probe.state, desc, layer, desc.n_layers - 1, blocks[start:start + 1024],
                               sub, list(range(len(idxs))), results)

    floor_total = _best(floor, cfg.repeats, cfg.device)
    sample = ablations[: cfg.naive_sample]
    naive_total = _best(lambda: run_naive(model, ids, sample, "zero"), 1, cfg.device)
    # run_naive includes one clean forward; per-ablation cost is one full forward.
    naive_per = naive_total / (len(sample) + 1)
    fast_results = fast_all()
    naive_results = run_naive(model, ids, sample, "zero")
    diff = max(abs(f.ablated_loss - n.ablated_loss) for f, n in zip(fast_results, naive_results))
    fast_per = fast_total / len(ablations)
    floor_per = floor_total / len(ablations)
    device_name = (torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda")
                   else f"CPU x{torch.get_num_threads()} threads")
    return BenchResult(
        config=cfg, device_name=device_name, naive_per_ablation_s=naive_per, fast_per_ablation_s=fast_per,
        fast_marginal_per_ablation_s=marginal / len(ablations), clean_pass_s=clean,
        floor_per_ablation_s=floor_per, naive_rate=1 / naive_per, fast_rate=1 / fast_per,
        speedup=naive_per / fast_per, marginal_over_floor=(marginal / len(ablations)) / floor_per,
        amortized_over_floor=fast_per / floor_per, max_abs_diff=diff,
    )


def format_result(r: BenchResult) -> str:
    c = r.config
    return "\n".join([
        f"moeaudit bench: OLMoE layout {c.num_hidden_layers} layers x {c.num_experts} experts (top-{c.top_k}), "
        f"d_model {c.hidden_size}, vocab {c.vocab_size}, T={c.seq_len}, {c.n_ablations} token-scope ablations "
        f"over layers {list(c.layers)}, {c.dtype} on {r.device_name}",
        f"  naive engine : {r.naive_rate:10.1f} ablations/s  ({r.naive_per_ablation_s * 1e3:.2f} ms each)",
        f"  fast engine  : {r.fast_rate:10.1f} ablations/s  ({r.fast_per_ablation_s * 1e3:.3f} ms each, clean pass "
        f"{r.clean_pass_s * 1e3:.1f} ms included)",
        f"  speed-up     : {r.speedup:10.1f}x  (target >= 100x)",
        f"  floor        : {r.floor_per_ablation_s * 1e3:.3f} ms per ablation (query token through the remaining "
        "layers + LM head)",
        f"  fast / floor : {r.marginal_over_floor:.2f}x marginal (target <= 2x), {r.amortized_over_floor:.2f}x with "
        "the clean pass amortised",
        f"  fast vs naive: max |loss difference| {r.max_abs_diff:.2e}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeaudit bench", description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    args["layers"] = tuple(args["layers"])
    result = run_bench(BenchConfig(**args))
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
