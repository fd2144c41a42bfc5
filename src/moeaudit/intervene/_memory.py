"""Memory of the fast engine: the per-chunk estimate, the device's free memory, chunk sizing and out-of-memory back-off.

A chunk pushes ``Q`` query tokens through the decoder layers after the ablated one, attending over ``K`` keys (the
``T`` clean ones, the keys a split block carries from its earlier pieces, and the chunk's own ``Q``). Its peak is
bounded by :func:`chunk_memory_bytes`; :func:`auto_query_tokens` picks the largest ``Q`` whose estimate fits a
share of the free memory, and the engine halves ``Q`` and retries when an allocation fails anyway.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch import nn

from moeaudit.models import (
    FAMILIES,
    MoEDescription,
    attention_dims,
    decoder_layers,
    describe,
    execution_device,
    moe_block,
)

#: Upper bound of an automatically sized chunk (query tokens). Past ~1k tokens per layer call a CPU gains nothing and a
#: GPU's matrix units are already saturated at the widths of the paper's models.
AUTO_MAX_QUERY_TOKENS = 1024
#: Share of the free memory one chunk may plan to use (the rest is headroom for the allocator and other work).
MEMORY_FRACTION = 0.5
#: Free memory assumed where the platform reports none (non-Linux CPU without psutil).
FALLBACK_FREE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class ChunkGeometry:
    """What a chunk's memory depends on, for the layers after an ablated layer.

    Attributes:
        n_heads: Attention heads (queries and, after GQA expansion or MLA decompression, keys/values).
        key_dim: Per-head key width (``head_dim``; MLA: ``qk_nope_head_dim + qk_rope_head_dim``).
        value_dim: Per-head value width.
        cache_width: Cached elements per token per layer (keys + values; MLA: the compressed latent).
        d_model: Hidden size.
        n_experts: Routed experts.
        top_k: Experts per token.
        expert_width: Intermediate width of one expert (``moe_intermediate_size``).
        shared_width: Total intermediate width of the shared expert(s) (0 without).
        vocab_size: Output vocabulary.
        n_layers_after: Decoder layers a query passes (after the ablated layer).
        itemsize: Bytes per element of the model's dtype.
    """

    n_heads: int
    key_dim: int
    value_dim: int
    cache_width: int
    d_model: int
    n_experts: int
    top_k: int
    expert_width: int
    shared_width: int
    vocab_size: int
    n_layers_after: int
    itemsize: int


def chunk_geometry(model: nn.Module, layer: int, cache_width: int, *, desc: MoEDescription | None = None,
                   ) -> ChunkGeometry:
    """The :class:`ChunkGeometry` of queries ablated at MoE ``layer`` (``cache_width``: from the clean cache)."""
    desc = desc or describe(model)
    adapter = FAMILIES[desc.family]
    heads, key_dim, value_dim = attention_dims(model.config)
    block = moe_block(model, layer)
    # Parameters of one expert ~ 3 x d_model x width (gate, up, down projections) in every family.
    expert_params = sum(p.numel() for p in block.experts.parameters()) // desc.n_experts
    shared = getattr(block, adapter.shared_attr, None) if adapter.shared_attr else None
    shared_params = sum(p.numel() for p in shared.parameters()) if shared is not None else 0
    dtype = next(model.parameters()).dtype
    return ChunkGeometry(
        n_heads=heads, key_dim=key_dim, value_dim=value_dim, cache_width=cache_width, d_model=desc.d_model,
        n_experts=desc.n_experts, top_k=desc.top_k, expert_width=max(1, expert_params // (3 * desc.d_model)),
        shared_width=shared_params // (3 * desc.d_model), vocab_size=desc.vocab_size,
        n_layers_after=desc.n_layers - 1 - layer, itemsize=torch.empty((), dtype=dtype).element_size(),
    )


def chunk_memory_bytes(g: ChunkGeometry, query_tokens: int, key_tokens: int, carried_tokens: int = 0) -> int:
    """Upper estimate of the bytes one chunk allocates beyond the model and the clean state.

    With ``Q`` = ``query_tokens``, ``K`` = ``key_tokens`` (clean + carried + own keys), ``H`` heads, itemsize ``s``
    and float32 (4 bytes) where the engine or the model computes in float32:

    - persistent while the chunk runs: the additive masks ``2 Q K s`` (at most one full and one windowed), the hidden
      states ``Q d s``, and the keys/values a split block carries ``L_after C m s`` (``m`` carried tokens, ``C``
      cached elements per token per layer);
    - the largest transient of one step, the maximum of
        * attention: scores, float32 softmax and its cast back ``H Q K (2 s + 4)``, the keys/values concatenated
          with the cache ``K C s`` and expanded to every head with one copy ``2 H K (d_k + d_v) s`` (GQA's repeat,
          MLA's decompression), projections ``Q (4 d + 2 H (d_k + d_v)) s``;
        * MoE dispatch: router scores ``2 Q E 4``, gathered token copies and expert activations
          ``Q k (2 d + 3 w) s``, shared experts ``3 Q w_s s``;
        * the deltas at the ablated layer: dense old/new/difference weights ``3 Q E 4``, expert outputs
          ``2 Q k d 4`` and the delta ``Q d 4``;
        * the LM head: logits, their float32 copy and the cross-entropy's float32 log-softmax ``Q V (s + 8)``.

    The attention term is what grows with the sequence: ``H x Q x (T + Q)``.
    """
    q, k, s, f32 = query_tokens, key_tokens, g.itemsize, 4
    d, h = g.d_model, g.n_heads
    persistent = 2 * q * k * s + q * d * s + g.n_layers_after * g.cache_width * carried_tokens * s
    attention = (h * q * k * (2 * s + f32) + k * g.cache_width * s + 2 * h * k * (g.key_dim + g.value_dim) * s
                 + q * (4 * d + 2 * h * (g.key_dim + g.value_dim)) * s)
    moe = 2 * q * g.n_experts * f32 + q * g.top_k * (2 * d + 3 * g.expert_width) * s + 3 * q * g.shared_width * s
    deltas = 3 * q * g.n_experts * f32 + 2 * q * g.top_k * d * f32 + q * d * f32
    head = q * g.vocab_size * (s + 2 * f32)
    return persistent + max(attention, moe, deltas, head)


def auto_query_tokens(g: ChunkGeometry, seq_len: int, budget_bytes: int, *, split: bool = False,
                      ceiling: int = AUTO_MAX_QUERY_TOKENS) -> int:
    """The largest ``Q <= ceiling`` whose :func:`chunk_memory_bytes` fits ``budget_bytes`` (at least 1).

    Packed chunks attend over ``T + Q`` keys; pieces of a split block (``split=True``) also carry up to ``T`` keys
    of their block's earlier pieces, so they attend over up to ``2 T + Q``.
    """

    def cost(q: int) -> int:
        carried = seq_len if split else 0
        return chunk_memory_bytes(g, q, seq_len + carried + q, carried)

    lo, hi = 1, max(1, ceiling)
    if cost(hi) <= budget_bytes:
        return hi
    while lo < hi:  # cost is increasing in q: the last q that fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's ``mem_get_info``; MPS: the recommended maximum minus what the driver holds; for the CPU, Linux's ``MemAvailable`` (psutil elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
    return FALLBACK_FREE_BYTES


def layer_devices(model: nn.Module, first: int) -> list[torch.device]:
    """Distinct execution devices of decoder layers ``first..N-1`` and the LM head."""
    layers = decoder_layers(model)
    devices = [execution_device(layers[i]) for i in range(first, len(layers))]
    devices.append(execution_device(model.get_output_embeddings()))
    return list(dict.fromkeys(devices))


@dataclass
class QueryBudget:
    """Query tokens per chunk, shared by the runs of one :class:`~moeaudit.SequenceAblator`.

    Attributes:
        cap: A hard cap given by the user (``None``: sized per layer from free memory).
        halvings: How often an out-of-memory error halved the chunk; every later chunk starts from the reduced size.
    """

    cap: int | None = None
    halvings: int = 0

    def tokens(self, g: ChunkGeometry, seq_len: int, devices: list[torch.device]) -> tuple[int, int]:
        """``(packed, split)``: query tokens of a packed chunk and of a piece of a split block."""
        return self.shrunk(self.sized(g, seq_len, devices))

    def sized(self, g: ChunkGeometry, seq_len: int, devices: list[torch.device]) -> tuple[int, int]:
        """``(packed, split)`` before out-of-memory halvings: the cap, or sized from the free memory now."""
        if self.cap is not None:
            return self.cap, self.cap
        budget = int(MEMORY_FRACTION * min(free_memory_bytes(d) for d in devices))
        return auto_query_tokens(g, seq_len, budget), auto_query_tokens(g, seq_len, budget, split=True)

    def shrunk(self, sizes: tuple[int, int]) -> tuple[int, int]:
        """``sizes`` halved once per out-of-memory error so far (at least 1)."""
        shrink = 2 ** self.halvings
        return max(1, sizes[0] // shrink), max(1, sizes[1] // shrink)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's ``OutOfMemoryError`` or a failed CPU allocation)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_memory(devices: list[torch.device]) -> None:
    """Return cached blocks after an out-of-memory error so the retry starts from a clean allocator."""
    gc.collect()
    if any(d.type == "cuda" for d in devices) and torch.cuda.is_available():
        torch.cuda.empty_cache()
