"""Timing attribution (``moeaudit attribute``) at a bench geometry: every (token, active expert) estimate of one
sequence against one clean forward, one forward + backward, and the exact map at equal coverage.

Equal coverage means every (token, active expert) pair of every MoE layer ablated once: ``(T - 1) x top_k x layers``
fast-engine ablations. That many are not run: the exact cost is one clean pass plus the fast engine's measured
marginal cost per ablation (timed on ``n_ablations`` of them) times the coverage, and the output says so.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from moeaudit.bench._config import BenchConfig
from moeaudit.bench._run import _best, build_model


@dataclass(frozen=True)
class AttributionBench:
    """Measured seconds for one sequence of ``seq_len`` tokens (best of ``repeats``)."""

    device_name: str
    seq_len: int
    n_layers: int
    layers: tuple[int, ...]
    top_k: int
    estimates: int  # (T - 1) x top_k x layers
    forward_s: float  # one clean forward, no grad
    forward_backward_s: float  # forward + backward of the summed loss (parameter gradients, as in training)
    attribution_s: float  # clean pass + own-loss gradients + zero-mode estimates, every layer
    exact_per_ablation_s: float  # fast engine, marginal per ablation (clean pass excluded)
    exact_clean_s: float  # the fast engine's clean pass
    exact_s: float  # exact_clean_s + exact_per_ablation_s x estimates (extrapolated)
    exact_sampled: int  # ablations timed to get exact_per_ablation_s
    max_query_tokens: int

    @property
    def over_forward(self) -> float:
        return self.attribution_s / self.forward_s

    @property
    def over_forward_backward(self) -> float:
        return self.attribution_s / self.forward_backward_s

    @property
    def speedup_over_exact(self) -> float:
        return self.exact_s / self.attribution_s

    def to_dict(self) -> dict:
        return {**asdict(self), "over_forward": self.over_forward,
                "over_forward_backward": self.over_forward_backward, "speedup_over_exact": self.speedup_over_exact}


def run_attribution_bench(cfg: BenchConfig, max_query_tokens: int = 256) -> AttributionBench:
    """Time attribution against a forward, a forward + backward and the exact map at equal coverage."""
    from moeaudit.intervene import Ablation, SequenceAblator
    from moeaudit.intervene._attribution import attribute_sequence
    from moeaudit.intervene._fast import run_fast
    from moeaudit.models import describe

    model = build_model(cfg)
    desc = describe(model)
    layers = [layer for layer in (cfg.layer_list() or desc.moe_layers) if layer in desc.moe_layers]
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, desc.vocab_size, (cfg.seq_len,), generator=gen).to(cfg.device)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids[None]).logits

    def forward_backward():
        logits = model(input_ids=ids[None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)

    def attribution():
        return attribute_sequence(model, ids, layers=layers, modes=("zero",), max_query_tokens=max_query_tokens)

    t_fwd, _ = _best(forward, cfg.repeats, cfg.device, cfg.clock)
    t_fb, _ = _best(forward_backward, cfg.repeats, cfg.device, cfg.clock)
    t_attr, _ = _best(attribution, cfg.repeats, cfg.device, cfg.clock)
    t_clean, probe = _best(lambda: SequenceAblator(model, ids, layers=layers), cfg.repeats, cfg.device, cfg.clock)
    rng = random.Random(cfg.seed)
    sample = []
    for _ in range(cfg.n_ablations):
        layer, t = rng.choice(layers), rng.randrange(cfg.seq_len - 1)
        sample.append(Ablation(layer, t, (int(probe.state.moe[layer].indices[t, rng.randrange(desc.top_k)]),)))
    t_sample, _ = _best(lambda: run_fast(model, probe.state, sample, "zero"), cfg.repeats, cfg.device, cfg.clock)
    n_est = (cfg.seq_len - 1) * desc.top_k * len(layers)
    per = t_sample / len(sample)
    device_name = (torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda")
                   else f"CPU x{torch.get_num_threads()} threads")
    return AttributionBench(device_name, cfg.seq_len, desc.n_layers, tuple(layers), desc.top_k, n_est, t_fwd, t_fb,
                            t_attr, per, t_clean, t_clean + per * n_est, len(sample), max_query_tokens)


def format_attribution(r: AttributionBench) -> str:
    """The lines ``moeaudit bench --attribution`` prints."""
    return "\n".join([
        f"attribution ({r.estimates:,} zero-mode estimates: every token x active expert of layers {list(r.layers)}, "
        f"T={r.seq_len}, on {r.device_name})",
        f"  forward           : {r.forward_s * 1e3:10.1f} ms",
        f"  forward + backward: {r.forward_backward_s * 1e3:10.1f} ms",
        f"  attribution       : {r.attribution_s * 1e3:10.1f} ms  = {r.over_forward:.2f}x a forward, "
        f"{r.over_forward_backward:.2f}x a forward + backward",
        f"  exact map, same coverage: {r.exact_s:.1f} s (clean pass {r.exact_clean_s * 1e3:.0f} ms + "
        f"{r.exact_per_ablation_s * 1e3:.2f} ms per ablation, timed on {r.exact_sampled} and extrapolated)",
        f"  speed-up over the exact map: {r.speedup_over_exact:,.0f}x",
    ])
