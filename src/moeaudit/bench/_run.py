"""Running the benchmark: both engines and the floor on the same ablations, timed, with the fast engine's peak memory.

The floor is the unavoidable part of a token-scope ablation: pushing its one query token through the remaining
layers and the LM head, in the same chunks the fast engine uses.

Memory, in untimed runs: the peak of a whole fast run (clean pass + ablations) as the process sees it
(:class:`~moeaudit.bench.PeakMemory`), and the peak of the tensors the ablations alone create, counted exactly
(:class:`~moeaudit.bench.LiveTensorBytes`), next to the engine's own per-chunk bound
(:func:`moeaudit.intervene.chunk_memory_bytes`) it must stay under.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch

from moeaudit.bench._config import BenchConfig
from moeaudit.bench._peak import LiveTensorBytes, PeakMemory


@dataclass(frozen=True)
class BenchResult:
    """Measured figures (seconds; rates in ablations/second; bytes)."""

    config: BenchConfig
    device_name: str
    torch_threads: int
    family: str
    n_layers: int
    layers: tuple[int, ...]
    n_parameters: int
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
    query_tokens_per_chunk: int
    clean_state_bytes: int
    peak_memory_bytes: int | None
    peak_memory_method: str
    ablation_tensor_peak_bytes: int | None
    chunk_estimate_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(cfg: BenchConfig):
    """The randomly initialised model of ``cfg`` (its preset's family and shapes), in eval mode on ``cfg.device``."""
    import transformers

    from moeaudit.models import FAMILIES, resolve_dtype

    family, values = cfg.model_config()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # random weights: no special tokens needed
        values.setdefault(key, None)
    config = transformers.AutoConfig.for_model(FAMILIES[family].model_types[0], **values)
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.dtype))
    return model.eval()


#: Clocks a benchmark can time with: wall-clock seconds, or the process's CPU seconds (all its threads), which a
#: shared machine does not inflate (with one thread, CPU time is the wall time an idle machine would show).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _best(fn, repeats: int, device: str, clock: str = "wall") -> tuple[float, object]:
    """``(best time of repeats, fn's last result)``."""
    best, now, result = float("inf"), CLOCKS[clock], None
    for _ in range(repeats):
        _sync(device)
        start = now()
        result = fn()
        _sync(device)
        best = min(best, now() - start)
    return best, result


@torch.no_grad()
def run_bench(cfg: BenchConfig = BenchConfig()) -> BenchResult:
    """Time both engines on the same ablations; report rates, the speed-up, the ratio to the floor, peak memory."""
    from moeaudit.intervene import Ablation, QueryBudget, SequenceAblator, chunk_geometry, chunk_memory_bytes
    from moeaudit.intervene._fast import run_fast
    from moeaudit.intervene._incremental import Context, head_losses, mask_capable_attention, propagate
    from moeaudit.intervene._memory import layer_devices
    from moeaudit.intervene._naive import run_naive
    from moeaudit.models import adapter_for, describe

    model = build_model(cfg)
    desc = describe(model)
    wanted = cfg.layer_list()
    layers = [layer for layer in (wanted or desc.moe_layers) if layer in desc.moe_layers]
    if not layers:
        from moeaudit.errors import ConfigError

        raise ConfigError(f"none of layers {list(wanted or [])} is an MoE layer of this {desc.n_layers}-layer "
                          f"model; MoE layers are {list(desc.moe_layers)}.")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, desc.vocab_size, (cfg.seq_len,), generator=gen).to(cfg.device)
    rng = random.Random(cfg.seed)
    probe = SequenceAblator(model, ids, layers=layers, max_query_tokens=cfg.max_query_tokens)
    ablations = []
    for _ in range(cfg.n_ablations):
        layer = rng.choice(layers)
        t = rng.randrange(cfg.seq_len - 1)
        ablations.append(Ablation(layer, t, (int(probe.state.moe[layer].indices[t, rng.randrange(desc.top_k)]),)))

    def fast_all():
        return SequenceAblator(model, ids, layers=layers, max_query_tokens=cfg.max_query_tokens).run(ablations)

    fast_total, fast_results = _best(fast_all, cfg.repeats, cfg.device, cfg.clock)
    clean, _ = _best(lambda: SequenceAblator(model, ids, layers=layers), cfg.repeats, cfg.device, cfg.clock)
    marginal, _ = _best(lambda: run_fast(model, probe.state, ablations, "zero",
                                         max_query_tokens=cfg.max_query_tokens), cfg.repeats, cfg.device, cfg.clock)

    # Floor: the same query tokens, unchanged, through the remaining layers + LM head, in the same chunk sizes.
    ctx = Context.build(model, probe.state, desc, adapter_for(model))
    by_layer: dict[int, list[int]] = {}
    for ab in ablations:
        by_layer.setdefault(ab.layer, []).append(ab.position)
    cache = probe.state.cache.layers[-1]
    width = cache.keys[0, :, 0].numel() + cache.values[0, :, 0].numel()
    budget = QueryBudget(cap=cfg.max_query_tokens)
    geometries = {layer: chunk_geometry(model, layer, width) for layer in by_layer}
    chunk_tokens = {layer: budget.tokens(geometries[layer], cfg.seq_len, layer_devices(model, layer))[0]
                    for layer in by_layer}
    estimate = max(chunk_memory_bytes(geometries[layer], q, cfg.seq_len + q)
                   for layer, q in ((layer, min(chunk_tokens[layer], len(by_layer[layer]))) for layer in by_layer))

    def floor():
        with mask_capable_attention(model, ctx.adapter):
            for layer, positions in by_layer.items():
                size = chunk_tokens[layer]
                for lo in range(0, len(positions), size):
                    pos = torch.tensor(positions[lo: lo + size], device=ctx.devices[layer])
                    hidden = probe.state.layer_out[layer][pos]
                    final, _ = propagate(ctx, layer, hidden, pos, pos, torch.arange(len(pos), device=pos.device))
                    head_losses(ctx, final, probe.state.input_ids[(pos + 1).to(probe.state.input_ids.device)]).cpu()

    floor_total, _ = _best(floor, cfg.repeats, cfg.device, cfg.clock)
    sample = ablations[: cfg.naive_sample]
    naive_total, naive_results = _best(lambda: run_naive(model, ids, sample, "zero"), 1, cfg.device, cfg.clock)
    naive_per = naive_total / (len(sample) + 1)  # run_naive includes one clean forward
    peak, tensors = PeakMemory(cfg.device), LiveTensorBytes()
    if cfg.measure_memory:
        with peak:
            fast_all()
        with tensors:
            run_fast(model, probe.state, ablations, "zero", max_query_tokens=cfg.max_query_tokens)
    diff = max(abs(f.ablated_loss - n.ablated_loss) for f, n in zip(fast_results, naive_results))
    fast_per = fast_total / len(ablations)
    floor_per = floor_total / len(ablations)
    device_name = (torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda")
                   else f"CPU x{torch.get_num_threads()} threads")
    return BenchResult(
        config=cfg, device_name=device_name, torch_threads=torch.get_num_threads(), family=desc.family,
        n_layers=desc.n_layers, layers=tuple(layers), n_parameters=sum(p.numel() for p in model.parameters()),
        naive_per_ablation_s=naive_per, fast_per_ablation_s=fast_per,
        fast_marginal_per_ablation_s=marginal / len(ablations), clean_pass_s=clean,
        floor_per_ablation_s=floor_per, naive_rate=1 / naive_per, fast_rate=1 / fast_per,
        speedup=naive_per / fast_per, marginal_over_floor=(marginal / len(ablations)) / floor_per,
        amortized_over_floor=fast_per / floor_per, max_abs_diff=diff,
        query_tokens_per_chunk=min(chunk_tokens.values()), clean_state_bytes=probe.state.nbytes,
        peak_memory_bytes=peak.peak, peak_memory_method=peak.method if cfg.measure_memory else "not measured",
        ablation_tensor_peak_bytes=tensors.peak if cfg.measure_memory else None, chunk_estimate_bytes=estimate,
    )


def _mib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**10:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def format_result(r: BenchResult) -> str:
    """The result as the few lines ``moeaudit bench`` prints."""
    c = r.config
    return "\n".join([
        f"moeaudit bench: preset {c.preset} ({r.family}), {r.n_layers} layers, {r.n_parameters / 1e6:,.1f}M "
        f"parameters, T={c.seq_len}, {c.n_ablations} token-scope ablations over layers {list(r.layers)}, {c.dtype} "
        f"on {r.device_name}, {c.clock}-clock seconds",
        f"  naive engine : {r.naive_rate:10.2f} ablations/s  ({r.naive_per_ablation_s * 1e3:.1f} ms each)",
        f"  fast engine  : {r.fast_rate:10.1f} ablations/s  ({r.fast_per_ablation_s * 1e3:.3f} ms each, clean pass "
        f"{r.clean_pass_s * 1e3:.1f} ms included)",
        f"  speed-up     : {r.speedup:10.1f}x",
        f"  floor        : {r.floor_per_ablation_s * 1e3:.3f} ms per ablation (query token through the remaining "
        "layers + LM head)",
        f"  fast / floor : {r.marginal_over_floor:.2f}x marginal, {r.amortized_over_floor:.2f}x with the clean pass "
        "amortised",
        f"  memory       : clean pass + ablations peak {_mib(r.peak_memory_bytes)} ({r.peak_memory_method}); "
        f"clean state {_mib(r.clean_state_bytes)}",
        f"                 ablations alone: tensor peak {_mib(r.ablation_tensor_peak_bytes)} (bound per chunk "
        f"{_mib(r.chunk_estimate_bytes)}, {r.query_tokens_per_chunk} query tokens per chunk)",
        f"  fast vs naive: max |loss difference| {r.max_abs_diff:.2e}",
    ])
