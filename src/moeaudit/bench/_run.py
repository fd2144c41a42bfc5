"""Running the benchmark: both engines and the floor on the same ablations, timed, with the fast engine's peak memory.

The floor is the unavoidable part of a token-scope ablation: pushing its one query token through the remaining
layers and the LM head, in the same chunks the fast engine uses. Peak memory is measured in one extra, untimed run
of the fast engine (clean pass included): on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
before; on the CPU the peak resident set size (sampled every millisecond from ``/proc/self/statm``) above the
resident size before.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass

import torch

from moeaudit.bench._config import BenchConfig


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
    config = transformers.AutoConfig.for_model(FAMILIES[family].model_types[0], **values)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a --set vocab_size may leave them outside
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, key, None)
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.dtype))
    return model.eval()


def _best(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class PeakMemory:
    """Peak memory above the level at entry, while the block runs (see module docstring for the method)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before"
            return self
        _trim_heap()
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.method = "peak resident set size above the size before (sampled every 1 ms)"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss_bytes()) - self._base


def _rss_bytes() -> int:
    import os
    import resource

    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime maximum (a delta still shows growth)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so the baseline is what is really in use (glibc only)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@torch.no_grad()
def run_bench(cfg: BenchConfig = BenchConfig()) -> BenchResult:
    """Time both engines on the same ablations; report rates, the speed-up, the ratio to the floor, peak memory."""
    from moeaudit.intervene import Ablation, QueryBudget, SequenceAblator, chunk_geometry
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

    fast_total = _best(fast_all, cfg.repeats, cfg.device)
    clean = _best(lambda: SequenceAblator(model, ids, layers=layers), cfg.repeats, cfg.device)
    marginal = _best(lambda: run_fast(model, probe.state, ablations, "zero", max_query_tokens=cfg.max_query_tokens),
                     cfg.repeats, cfg.device)

    # Floor: the same query tokens, unchanged, through the remaining layers + LM head, in the same chunk sizes.
    ctx = Context.build(model, probe.state, desc, adapter_for(model))
    by_layer: dict[int, list[int]] = {}
    for ab in ablations:
        by_layer.setdefault(ab.layer, []).append(ab.position)
    cache = probe.state.cache.layers[-1]
    width = cache.keys[0, :, 0].numel() + cache.values[0, :, 0].numel()
    budget = QueryBudget(cap=cfg.max_query_tokens)
    chunk_tokens = {layer: budget.tokens(chunk_geometry(model, layer, width), cfg.seq_len,
                                         layer_devices(model, layer))[0] for layer in by_layer}

    def floor():
        with mask_capable_attention(model, ctx.adapter):
            for layer, positions in by_layer.items():
                size = chunk_tokens[layer]
                for lo in range(0, len(positions), size):
                    pos = torch.tensor(positions[lo: lo + size], device=ctx.devices[layer])
                    hidden = probe.state.layer_out[layer][pos]
                    final, _ = propagate(ctx, layer, hidden, pos, pos, torch.arange(len(pos), device=pos.device))
                    head_losses(ctx, final, probe.state.input_ids[(pos + 1).to(probe.state.input_ids.device)]).cpu()

    floor_total = _best(floor, cfg.repeats, cfg.device)
    sample = ablations[: cfg.naive_sample]
    naive_total = _best(lambda: run_naive(model, ids, sample, "zero"), 1, cfg.device)
    naive_per = naive_total / (len(sample) + 1)  # run_naive includes one clean forward
    peak = PeakMemory(cfg.device)
    if cfg.measure_memory:
        with peak:
            fast_results = fast_all()
    else:
        fast_results = fast_all()
    naive_results = run_naive(model, ids, sample, "zero")
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
    )


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def format_result(r: BenchResult) -> str:
    """The result as the few lines ``moeaudit bench`` prints."""
    c = r.config
    return "\n".join([
        f"moeaudit bench: preset {c.preset} ({r.family}), {r.n_layers} layers, {r.n_parameters / 1e6:,.1f}M "
        f"parameters, T={c.seq_len}, {c.n_ablations} token-scope ablations over layers {list(r.layers)}, {c.dtype} "
        f"on {r.device_name}",
        f"  naive engine : {r.naive_rate:10.2f} ablations/s  ({r.naive_per_ablation_s * 1e3:.1f} ms each)",
        f"  fast engine  : {r.fast_rate:10.1f} ablations/s  ({r.fast_per_ablation_s * 1e3:.3f} ms each, clean pass "
        f"{r.clean_pass_s * 1e3:.1f} ms included)",
        f"  speed-up     : {r.speedup:10.1f}x",
        f"  floor        : {r.floor_per_ablation_s * 1e3:.3f} ms per ablation (query token through the remaining "
        "layers + LM head)",
        f"  fast / floor : {r.marginal_over_floor:.2f}x marginal, {r.amortized_over_floor:.2f}x with the clean pass "
        "amortised",
        f"  memory       : peak {_mib(r.peak_memory_bytes)} for clean pass + {c.n_ablations} ablations "
        f"({r.peak_memory_method}); clean state {_mib(r.clean_state_bytes)}; {r.query_tokens_per_chunk} query tokens "
        "per chunk",
        f"  fast vs naive: max |loss difference| {r.max_abs_diff:.2e}",
    ])
