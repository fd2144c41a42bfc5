"""A model's geometry without its weights, and the primitive timings of a dry run (:mod:`moeaudit.run.estimate`).

The geometry comes from the checkpoint's ``config.json`` (built-in, local, or cached from the hub) or, for a
checkpoint that cannot be reached, from its published shapes (:data:`KNOWN_GEOMETRIES`); the
model is built on the ``meta`` device to count its parameters and describe it the way a run will. The timings run
on a reduced copy (decoder layers up to two past the first MoE layer, random weights) on the chosen device.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from moeaudit.errors import ModelSourceError

#: Published geometries of checkpoints that are described without downloading anything: hub id -> ``moeaudit
#: bench`` preset (their ``config.json`` shapes, :data:`moeaudit.bench.BENCH_PRESETS`) and the precision their
#: weights are published in (``torch_dtype`` of their ``config.json``).
KNOWN_GEOMETRIES = {"allenai/OLMoE-1B-7B-0924": ("olmoe-1b-7b", "float32"),
                    "Qwen/Qwen1.5-MoE-A2.7B": ("qwen1.5-moe-a2.7b", "bfloat16"),
                    "deepseek-ai/DeepSeek-V2-Lite": ("deepseek-v2-lite", "bfloat16")}


@dataclass(frozen=True)
class Timings:
    """Seconds of the primitive operations, measured on the reduced model (see the module docstring).

    Attributes:
        layer: One decoder layer over one document of ``seq_len`` tokens (a clean pass).
        head: Embedding, final norm and LM head over one document.
        ablation: ``c``: an ablation at the last layer (its layer's delta and the LM head).
        query_layer: ``q``: one ablation's query tokens through one later decoder layer.
        seq_len: Tokens of the timed document.
        gradient: Attribution's forward and backward of every position's own loss from the first MoE layer to the
            LM head (:func:`moeaudit.intervene.own_loss_gradients`) over the timed document; 0 when not timed.
        estimate: One attribution estimate ``g . delta y`` (one position, active expert and mode), 0 when not
            timed.
        gradient_layers: Decoder layers the timed gradient pass ran through (the first MoE layer to the last).
    """

    layer: float
    head: float
    ablation: float
    query_layer: float
    seq_len: int
    gradient: float = 0.0
    estimate: float = 0.0
    gradient_layers: int = 0

    def clean_pass(self, n_layers: int, tokens: float) -> float:
        return (self.head + n_layers * self.layer) * tokens / self.seq_len

    def ablations(self, n_layers: int, counts: dict[int, int], query_tokens: float) -> float:
        return sum(n * (self.ablation + self.query_layer * query_tokens * (n_layers - 1 - layer))
                   for layer, n in counts.items())

    def attribution(self, n_layers: int, first: int, tokens: float, n_estimates: int) -> float:
        """Attribution's gradient passes over ``tokens`` query tokens from layer ``first`` on (the timed pass scaled
        by the forward cost of the layers it runs through) and its ``n_estimates`` estimates."""
        if not self.gradient_layers:
            return 0.0
        scale = (self.head + (n_layers - first) * self.layer) / (self.head + self.gradient_layers * self.layer)
        return self.gradient * scale * tokens / self.seq_len + self.estimate * n_estimates


#: Tokens of the document a dry run times on the CPU (longer documents are scaled from it).
CPU_TIMED_TOKENS = 128


@dataclass(frozen=True)
class Geometry:
    """What the estimates need to know about a model (no weights).

    Attributes:
        name: The model as given.
        config: Its transformers configuration.
        family, n_layers, moe_layers, n_experts, top_k, d_model: As :func:`moeaudit.describe` reports them.
        parameters: Every parameter of the full model.
        dtype: The precision a run computes in (``auto`` resolved to the checkpoint's own).
        itemsize: Bytes per parameter in that precision.
        checkpoint_bytes: Size of the checkpoint's weights in its own precision (a download's size).
        needs_download: The checkpoint's weights are not on this machine.
        source: Where the geometry came from (``config.json`` path, or the published shapes).
        kv_width: Cached key + value elements per token per layer.
    """

    name: str
    config: Any
    family: str
    n_layers: int
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    d_model: int
    parameters: int
    dtype: str
    itemsize: int
    checkpoint_bytes: int
    needs_download: bool
    source: str
    kv_width: int

    @property
    def weights_bytes(self) -> int:
        return self.parameters * self.itemsize

    def clean_state_bytes(self, seq_len: int) -> int:
        """One document's clean state: hidden states of every layer, keys and values."""
        return seq_len * (self.n_layers + 1) * self.d_model * self.itemsize \
            + seq_len * self.n_layers * self.kv_width * self.itemsize

    def chunk_bytes(self, seq_len: int, query_tokens: int = 256) -> int:
        """The fast engine's largest chunk (ablations at the first MoE layer, the most later layers)."""
        from moeaudit.intervene import chunk_geometry, chunk_memory_bytes

        with torch.device("meta"):
            model = _build(self.config, self.dtype)
        g = chunk_geometry(model, self.moe_layers[0], self.kv_width)
        return chunk_memory_bytes(g, query_tokens, seq_len + query_tokens)


def _build(config, dtype: str):
    import transformers

    from moeaudit.models import resolve_dtype

    resolved = resolve_dtype(dtype)
    return transformers.AutoModelForCausalLM.from_config(
        config, dtype=resolved if isinstance(resolved, torch.dtype) else torch.float32).eval()


def _config(model: str, trust_remote_code: bool) -> tuple[Any, str, bool]:
    """``(config, where it came from, whether the weights need downloading)``."""
    import transformers

    from moeaudit.models._checkpoint import hub_snapshot, looks_like_path, resolve_model_name

    name = resolve_model_name(model)
    if name.startswith("builtin:") or looks_like_path(name):
        from moeaudit.models._checkpoint import locate_model

        directory = locate_model(name).directory
        return (transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code),
                str(directory / "config.json"), False)
    snapshot, _ = hub_snapshot(name)
    if snapshot is not None and (snapshot / "config.json").is_file():
        weights = any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))
        return (transformers.AutoConfig.from_pretrained(snapshot, trust_remote_code=trust_remote_code),
                str(snapshot / "config.json"), not weights)
    if name in KNOWN_GEOMETRIES:
        from moeaudit.bench._config import BenchConfig
        from moeaudit.models import FAMILIES

        preset, published = KNOWN_GEOMETRIES[name]
        family, values = BenchConfig(preset=preset).model_config()
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            values.setdefault(key, None)
        config = transformers.AutoConfig.for_model(FAMILIES[family].model_types[0], **values)
        config.dtype = published
        return config, f"the published config.json shapes of {name} (nothing downloaded)", True
    raise ModelSourceError(
        f"the dry run needs the config.json of {name!r}, which is not in the hub cache; download it alone (a few "
        f"kB: `hf download {name} config.json`) and run the dry run again, or pass a local checkpoint directory.")


def model_geometry(model: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> Geometry:
    """The :class:`Geometry` of ``model`` (built-in, directory or hub id) in ``dtype``, without loading weights."""
    from moeaudit.models import attention_dims, describe

    config, source, download = _config(model, trust_remote_code)
    own = getattr(config, "dtype", None) or torch.float32
    own = getattr(torch, own) if isinstance(own, str) else own
    run_dtype = str(own).removeprefix("torch.") if dtype == "auto" else dtype
    with torch.device("meta"):
        meta = _build(config, run_dtype)
    desc = describe(meta)
    parameters = sum(p.numel() for p in meta.parameters())
    heads, key_dim, value_dim = attention_dims(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    itemsize = torch.empty((), dtype=getattr(torch, run_dtype)).element_size()
    return Geometry(name=model, config=config, family=desc.family, n_layers=desc.n_layers,
                    moe_layers=tuple(desc.moe_layers), n_experts=desc.n_experts, top_k=desc.top_k,
                    d_model=desc.d_model, parameters=parameters, dtype=run_dtype, itemsize=itemsize,
                    checkpoint_bytes=parameters * torch.empty((), dtype=own).element_size(),
                    needs_download=download, source=source, kv_width=kv_heads * (key_dim + value_dim))


def reduced_config(config, n_layers: int):
    """``config`` with only its first ``n_layers`` decoder layers (per-layer lists cut to match)."""
    reduced = copy.deepcopy(config)
    full = config.num_hidden_layers
    for key, value in list(vars(reduced).items()):
        if isinstance(value, list) and len(value) == full:
            setattr(reduced, key, value[:n_layers])
    reduced.num_hidden_layers = n_layers
    return reduced


@torch.no_grad()
def time_primitives(geometry: Geometry, device: str, seq_len: int, *, n_ablations: int = 32, repeats: int = 2,
                    attribution: bool = False):
    """:class:`Timings` measured on a reduced copy of the model (see the module docstring); with ``attribution``
    also one gradient pass and the estimates of its first MoE layer (``zero`` and ``reroute``)."""
    from moeaudit.intervene import Ablation, SequenceAblator

    first = geometry.moe_layers[0]
    n_reduced = min(geometry.n_layers, first + 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = _build(reduced_config(geometry.config, n_reduced), geometry.dtype)
        for p in model.parameters():  # small random weights: finite, routing spread over the experts
            p.normal_(0.0, 0.02)
    seq_len = max(8, min(seq_len, getattr(geometry.config, "max_position_embeddings", seq_len) or seq_len))
    if device == "cpu":  # a CPU times a shorter document (the costs scale with its tokens): the dry run stays quick
        seq_len = min(seq_len, CPU_TIMED_TOKENS)
    ids = torch.randint(0, geometry.config.vocab_size, (seq_len,), device=device)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    forward = best(lambda: model(ids[None]))
    hidden = torch.zeros(1, seq_len, geometry.d_model, dtype=next(model.parameters()).dtype, device=device)
    head = best(lambda: model.lm_head(model.model.norm(hidden)))
    layer = max(forward - head, 1e-9) / n_reduced
    moe = [m for m in (first, first + 1) if m < n_reduced and m in _moe_layers(model)]
    positions = torch.linspace(1, seq_len - 2, n_ablations).long().tolist()
    per_layer = {}
    for m in moe:
        ablator = SequenceAblator(model, ids, layers=[m])
        routed = ablator.state.moe[m].indices
        ablations = [Ablation(m, p, (int(routed[p][0]),)) for p in positions]
        per_layer[m] = best(lambda a=ablator, abl=ablations: a.run(abl, "zero")) / n_ablations
    last = per_layer.get(n_reduced - 1, min(per_layer.values()))
    if first in per_layer and n_reduced - 1 in per_layer and n_reduced - 1 > first:
        query_layer = max((per_layer[first] - last) / (n_reduced - 1 - first), layer / seq_len)
    else:
        query_layer = layer / seq_len * 4  # one token through a layer, at a small batch's efficiency
    extra = _time_attribution(model, ids, first, n_reduced, best) if attribution else {}
    return Timings(layer=layer, head=head, ablation=last, query_layer=query_layer, seq_len=seq_len, **extra)


def _time_attribution(model, ids, first: int, n_reduced: int, best) -> dict:
    """Seconds of attribution's gradient pass from layer ``first`` and of one estimate, on the reduced model."""
    from moeaudit.intervene import clean_state, own_loss_gradients
    from moeaudit.intervene._attribution import estimates

    for p in model.parameters():  # as in a run: gradients of the activations only
        p.requires_grad_(False)
    state = clean_state(model, ids, layers=[first], keep_cache=True)
    grads: dict = {}
    gradient = best(lambda: grads.update(own_loss_gradients(model, state, [first])))
    modes = ("zero", "reroute")
    rows = (len(ids) - 1) * state.moe[first].indices.shape[1] * len(modes)
    estimate = best(lambda: estimates(model, state, first, grads[first], modes)) / rows
    return {"gradient": gradient, "estimate": estimate, "gradient_layers": n_reduced - first}


def _moe_layers(model) -> tuple[int, ...]:
    from moeaudit.models import moe_layers

    return tuple(moe_layers(model))
