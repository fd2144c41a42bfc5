"""Bounded memory of the fast engine: a hard cap on query tokens (long blocks split, carrying their keys/values),
deltas per chunk, the memory estimate against measured tensor peaks, sizing from free memory, out-of-memory back-off,
one host transfer per chunk, and the clean state's size."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from conftest import cached_tiny, random_ids

from moeaudit import Ablation, SequenceAblator, ablate, describe
from moeaudit.bench import LiveTensorBytes
from moeaudit.intervene import (
    ChunkGeometry,
    OutOfMemoryEvenForOneToken,
    QueryBudget,
    _fast,
    _incremental,
    _memory,
    auto_query_tokens,
    chunk_geometry,
    chunk_memory_bytes,
)
from moeaudit.intervene._incremental import Context, mask_capable_attention
from moeaudit.models import adapter_for
from moeaudit.testing import tiny_model

ATOL = 1e-4


def long_blocks(model, ids, n: int, seed: int) -> list[Ablation]:
    """Sequence-scope ablations of an expert routed at position 0 or 1, so every block is ~T tokens long; plus a
    few token-scope ones."""
    desc = describe(model)
    state = SequenceAblator(model, ids).state
    rng = random.Random(seed)
    out = []
    for k in range(n):
        layer = rng.choice(desc.moe_layers)
        t = rng.randrange(len(ids) // 2, len(ids) - 1)
        early = int(state.moe[layer].indices[k % 2, rng.randrange(desc.top_k)])
        out.append(Ablation(layer, t, (early,), scope="sequence"))
    out += [Ablation(layer, t, (int(state.moe[layer].indices[t, 0]),)) for layer, t in ((desc.moe_layers[0], 5),
                                                                                         (desc.moe_layers[-1], 20))]
    return out


def spy(monkeypatch, module, name: str, record: list, measure):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        record.append(measure(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2", "gpt_oss"])
def test_long_blocks_are_split_under_the_cap(family, monkeypatch):
    """A hard cap of 4 query tokens: ~30-token sequence-scope blocks run in pieces that attend to their earlier
    pieces' keys (MLA latents for DeepSeek, sliding windows and sinks for GPT-OSS); results equal the naive engine.
    """
    model = cached_tiny(family)
    ids = random_ids(40, seed=3)
    ablations = long_blocks(model, ids, 6, seed=1)
    naive = ablate(model, ids, ablations, engine="naive")
    chunks, deltas = [], []
    spy(monkeypatch, _fast, "_run_chunk", chunks,
        lambda ctx, layer, chunk, *a: (sum(p.last - p.first + 1 for p in chunk), chunk[0].first - chunk[0].block.start))
    spy(monkeypatch, _fast, "_chunk_deltas", deltas, lambda ctx, layer, pos, *a: len(pos))
    fast = ablate(model, ids, ablations, max_query_tokens=4)
    assert max(q for q, _ in chunks) <= 4 and max(deltas) <= 4  # bounded by construction, deltas included
    assert max(carried for _, carried in chunks) >= 20  # later pieces attended to 20+ carried keys
    for f, n in zip(fast, naive):
        assert f.ablated_loss == pytest.approx(n.ablated_loss, abs=ATOL)
        assert f.gap_norm == pytest.approx(n.gap_norm, abs=ATOL)
        assert f.final_gap_norm == pytest.approx(n.final_gap_norm, abs=ATOL)
    assert max(abs(r.delta_loss) for r in naive) > 100 * ATOL
    # The check can fail: pieces that see blank keys/values for their block's earlier positions are off.
    monkeypatch.setattr(_incremental.PrefixCache, "__init__", _forgetful_init)
    forgetful = ablate(model, ids, ablations, max_query_tokens=4)
    assert max(abs(f.ablated_loss - n.ablated_loss) for f, n in zip(forgetful, naive)) > 1e-3


_real_init = _incremental.PrefixCache.__init__


def _forgetful_init(self, clean_cache, carried=None, record=False):
    blank = {layer: (torch.zeros_like(k), torch.zeros_like(v)) for layer, (k, v) in (carried or {}).items()}
    _real_init(self, clean_cache, blank, record)


def _inject_oom(monkeypatch, limit: int, error: Exception) -> list:
    """``propagate`` fails like an allocator when a chunk has more than ``limit`` query tokens."""
    sizes: list = []
    real = _fast.propagate

    def propagate(ctx, layer, hidden, *args, **kwargs):
        sizes.append(hidden.shape[0])
        if hidden.shape[0] > limit:
            raise error
        return real(ctx, layer, hidden, *args, **kwargs)

    monkeypatch.setattr(_fast, "propagate", propagate)
    return sizes


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 8589934592 bytes")])
def test_out_of_memory_halves_the_chunk_and_retries(error, monkeypatch):
    model = cached_tiny("qwen2_moe")
    ids = random_ids(40, seed=2)
    ablations = long_blocks(model, ids, 4, seed=2)
    naive = ablate(model, ids, ablations, engine="naive")
    sizes = _inject_oom(monkeypatch, 5, error)
    ablator = SequenceAblator(model, ids, max_query_tokens=16)
    fast = ablator.run(ablations)
    assert ablator.budget.halvings == 2 and max(sizes) == 16  # 16 -> 8 -> 4 fits
    for f, n in zip(fast, naive):
        assert f.ablated_loss == pytest.approx(n.ablated_loss, abs=ATOL)
    sizes.clear()
    ablator.run(ablations)
    assert max(sizes) <= 4  # later runs start from the reduced size
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_out_of_memory_for_one_token_and_other_errors_surface(monkeypatch):
    model = cached_tiny("olmoe")
    ids = random_ids(20, seed=2)
    state = SequenceAblator(model, ids).state
    ab = Ablation(1, 10, (int(state.moe[1].indices[10, 0]),))
    _inject_oom(monkeypatch, 0, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(OutOfMemoryEvenForOneToken, match="single query token after layer 1"):
        ablate(model, ids, [ab])
    _inject_oom(monkeypatch, 0, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not memory: no retry, no masking
        ablate(model, ids, [ab])


def _geometry(**changes) -> ChunkGeometry:
    base = dict(n_heads=16, key_dim=128, value_dim=128, cache_width=4096, d_model=2048, n_experts=64, top_k=8,
                expert_width=1024, shared_width=0, vocab_size=50304, n_layers_after=15, itemsize=4)
    return ChunkGeometry(**{**base, **changes})


def test_chunk_memory_estimate_terms():
    """The formula's terms at OLMoE-1B-7B's geometry (float32), worked by hand, and its growth."""
    g = _geometry()
    q, t = 256, 512
    k = t + q
    persistent = 2 * q * k * 4 + q * 2048 * 4
    attention = 16 * q * k * 12 + k * 4096 * 4 + 2 * 16 * k * 256 * 4 + q * (4 * 2048 + 2 * 16 * 256) * 4
    head = q * 50304 * 12
    assert chunk_memory_bytes(g, q, k) == persistent + max(attention, head)
    carried = chunk_memory_bytes(g, q, k + t, t) - chunk_memory_bytes(g, q, k + t)
    assert carried == 15 * 4096 * t * 4  # a split block's carried keys/values in the 15 later layers
    for q in (1, 64, 1024):
        assert chunk_memory_bytes(g, q, t + q) < chunk_memory_bytes(g, q + 1, t + q + 1)
        assert chunk_memory_bytes(g, q, t + q) < chunk_memory_bytes(g, q, 2 * t + q)
    assert chunk_memory_bytes(_geometry(itemsize=2), 256, k) < chunk_memory_bytes(g, 256, k)


def test_auto_query_tokens_is_the_largest_that_fits():
    g = _geometry()
    for budget in (2**20, 50 * 2**20, 300 * 2**20, 2**40):
        q = auto_query_tokens(g, 512, budget, ceiling=1024)
        fits = [n for n in range(1, 1025) if chunk_memory_bytes(g, n, 512 + n) <= budget]
        assert q == (max(fits) if fits else 1), budget
        q_split = auto_query_tokens(g, 512, budget, split=True, ceiling=1024)
        assert q_split <= q


@pytest.mark.parametrize(("family", "attn"), [("olmoe", "eager"), ("deepseek_v2", "eager"), ("qwen2_moe", "sdpa")])
def test_estimate_bounds_the_measured_tensor_peak(family, attn):
    """Tensors a real chunk allocates (counted exactly by a dispatch-mode tracker) stay under the estimate, which
    is not loose either (within 3x)."""
    model = tiny_model(family, hidden_size=128, attn_implementation=attn)
    ids = random_ids(96, seed=1)
    desc = describe(model)
    state = SequenceAblator(model, ids).state
    layer = desc.moe_layers[0]
    ctx = Context.build(model, state, desc, adapter_for(model))
    cache = state.cache.layers[layer + 1]
    g = chunk_geometry(model, layer, cache.keys[0, :, 0].numel() + cache.values[0, :, 0].numel())
    for q in (8, 48):
        ablations = [Ablation(layer, t, (int(state.moe[layer].indices[t, 0]),)) for t in range(q)]
        blocks = _fast._plan_blocks(ctx, layer, ablations, list(range(q)), [None] * q)
        chunk = _fast._next_chunk(blocks, q, q)
        with mask_capable_attention(model, ctx.adapter), torch.no_grad(), LiveTensorBytes() as tracked:
            _fast._run_chunk(ctx, layer, chunk, ablations, "zero")
        estimate = chunk_memory_bytes(g, q, 96 + q)
        assert tracked.peak <= estimate <= 3 * tracked.peak, (q, tracked.peak, estimate)


def test_chunks_sized_from_free_memory(monkeypatch):
    """With little free memory the automatic size is small, every chunk respects it, and results are unchanged."""
    model = cached_tiny("olmoe")
    ids = random_ids(40, seed=6)
    ablations = long_blocks(model, ids, 4, seed=4)
    naive = ablate(model, ids, ablations, engine="naive")
    state = SequenceAblator(model, ids).state
    cache = state.cache.layers[1]
    g = chunk_geometry(model, 0, cache.keys[0, :, 0].numel() + cache.values[0, :, 0].numel())
    free = 2 * chunk_memory_bytes(g, 5, 45)  # half of it is the budget: 5 query tokens
    monkeypatch.setattr(_memory, "free_memory_bytes", lambda device: free)
    packed, split = QueryBudget().tokens(g, 40, [torch.device("cpu")])
    assert packed == 5 and 1 <= split <= packed
    sizes: list = []
    spy(monkeypatch, _fast, "_run_chunk", sizes, lambda ctx, layer, chunk, *a: sum(p.last - p.first + 1
                                                                                  for p in chunk))
    fast = ablate(model, ids, ablations)
    assert max(sizes) <= 5
    for f, n in zip(fast, naive):
        assert f.ablated_loss == pytest.approx(n.ablated_loss, abs=ATOL)


def test_no_host_synchronisation_per_ablation(monkeypatch):
    """Reading a device scalar (``float()``, ``int()``, ``.item()``, ``bool()``) from the engine's own code happens
    nowhere; device-to-host copies from it happen once per chunk (plus one routing / loss copy per layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    engine_files = ("intervene/_fast.py", "intervene/_incremental.py", "intervene/_routing.py")

    def from_engine() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if "/torch/" not in name and "/transformers/" not in name:
                return name.endswith(engine_files)
            frame = frame.f_back
        return False

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and from_engine():
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    copies = []
    real_cpu = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        if from_engine():
            copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    model = cached_tiny("mixtral")
    ids = random_ids(40, seed=7)
    ablator = SequenceAblator(model, ids)
    ablations = long_blocks(model, ids, 12, seed=7) * 3
    chunks: list = []
    spy(monkeypatch, _fast, "_run_chunk", chunks, lambda ctx, layer, chunk, *a: len(chunk))
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    with ScalarReads():
        ablator.run(ablations)
    assert ScalarReads.count == 0
    assert len(copies) == len(chunks) and len(chunks) < len(ablations)
    assert all(shape[1] == 3 for shape in copies)  # (ablated loss, gap, final gap) per finished ablation


def test_clean_state_nbytes_counts_every_tensor():
    """OLMoE tiny model (4 layers, d_model 64, 16 experts, top-4, 4 heads of 16): hand count of the state's bytes."""
    model = cached_tiny("olmoe")
    T, d, n_layers, n_experts, top_k = 30, 64, 4, 16, 4
    state = SequenceAblator(model, random_ids(T, seed=1)).state
    per_moe_layer = T * d * 4 * 2 + T * n_experts * 4 + T * top_k * (4 + 8)  # x, moe_out, logits, weights, indices
    expected = (T * 8 + (T - 1) * 4 + n_layers * T * d * 4 + n_layers * per_moe_layer
                + n_layers * 2 * T * d * 4  # keys and values of every layer (4 kv heads x 16)
                + 2 * T * 16 * 4)  # rotary cos and sin
    assert state.nbytes == expected
    assert SequenceAblator(model, random_ids(2 * T, seed=1)).state.nbytes == pytest.approx(2 * expected, rel=0.01)
