"""The verification suite (the paper's Appendix B plus an engine check) that gates every data collection."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moeaudit.errors import VerificationError
from moeaudit.intervene import Ablation, ExpertMeans, SequenceAblator
from moeaudit.intervene._spec import MODES
from moeaudit.models import describe, model_device


@dataclass(frozen=True)
class CheckResult:
    """One verification check: what was measured against which threshold."""

    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


@dataclass(frozen=True)
class VerificationReport:
    """All checks; ``passed`` only when every check passed."""

    checks: tuple[CheckResult, ...]
    dtype: str
    n_sequences: int
    seed: int
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "dtype": self.dtype, "n_sequences": self.n_sequences, "seed": self.seed,
                "checks": [asdict(c) for c in self.checks], **self.extra}

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationError` naming the failed checks."""
        failed = [c for c in self.checks if not c.passed]
        if failed:
            lines = "; ".join(f"{c.name}: {c.detail}" for c in failed)
            raise VerificationError(f"verification failed, no data collected: {lines}", report=self)


def _as_ids(sequences: Iterable, tokenizer) -> list[torch.Tensor]:
    out = []
    for s in sequences:
        if isinstance(s, str):
            s = torch.tensor(tokenizer(s)["input_ids"], dtype=torch.long)
        s = getattr(s, "input_ids", s)
        s = torch.as_tensor(s)
        if s.dim() != 1 or s.numel() < 3:
            raise ValueError(f"verify needs 1-D sequences of at least 3 tokens, got shape {tuple(s.shape)}.")
        out.append(s.long())
    if not out:
        raise ValueError("verify needs at least one sequence.")
    return out


def _half(model: nn.Module) -> bool:
    return next(model.parameters()).dtype in (torch.float16, torch.bfloat16)


#: engines_agree tolerance per dtype: (max |fast - naive|, mean |fast - naive|) over the sampled ablations (loss and
#: gap norm). Half precision rounds every ΔL by ~1e-3 (float16) / ~1e-2 (bfloat16) nats in either engine (measured
#: against float32 on tiny models of all 7 families, max over 12 ablations up to 2.2e-3 / 8.1e-2), while broken engine
#: logic (a leaky attention mask) is off by 0.2-2.4 nats there. Checking the logic exactly needs float32.
ENGINE_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 5e-3),
    torch.bfloat16: (1.5e-1, 4e-2),
}


@torch.no_grad()
def verify(model: nn.Module, tokenizer, sequences: Sequence, *, n_engine_checks: int = 8, seed: int = 0,
           modes: Sequence[str] = ("zero",), means: ExpertMeans | None = None) -> VerificationReport:
    """Run the five checks and return a report (use :meth:`VerificationReport.raise_if_failed` to gate).

    1. ``ce_alignment``: mean per-token cross-entropy equals the model's own ``labels=`` loss
       (1e-4 in float32, 1e-2 in half precision).
    2. ``no_stale_state``: baseline, ablated, baseline again: the two baselines agree to 1e-6 and no hook remains.
    3. ``position_diversity``: more than 50% distinct losses over (up to) 100 positions.
    4. ``position_specific``: ablating an expert where it is routed moves the loss more, on average, than ablating
       it where it is not.
    5. ``engines_agree``: the fast engine equals the naive engine on a random sample of ablations, in every mode
       of ``modes`` (1e-4 in float32; in half precision see :data:`ENGINE_TOLERANCE`: rounding there is as large as
       small effects, so only float32 checks the engine's logic exactly).

    Args:
        model: The transformers MoE causal LM to check.
        tokenizer (PreTrainedTokenizerBase): Its tokenizer (used for sequences given as text).
        sequences: Token sequences (``CorpusSequence``, 1-D tensors or arrays of at least 3 tokens) or texts.
        n_engine_checks: Ablations per mode on which the fast and naive engines are compared.
        seed: Seed of the sampled positions, experts and ablations.
        modes: Ablation modes whose engines are compared (``zero``, ``renormalize``, ``reroute``, ``mean``).
        means: The experts' mean outputs for ``mean`` (:func:`moeaudit.expert_means` over ``sequences`` or a
            corpus containing them).
    """
    ids_list = _as_ids(sequences, tokenizer)
    desc = describe(model)
    device = model_device(model)
    half = _half(model)
    tol = 1e-2 if half else 1e-4
    rng = random.Random(seed)
    checks = []

    # 1. CE alignment
    worst = 0.0
    ablators = []
    for ids in ids_list:
        ablator = SequenceAblator(model, ids)
        ablators.append(ablator)
        own = float(model(input_ids=ids[None].to(device), labels=ids[None].to(device)).loss)
        worst = max(worst, abs(float(ablator.state.losses.mean()) - own))
    checks.append(CheckResult("ce_alignment", worst <= tol, worst, tol,
                              f"max |mean per-token CE - model labels= loss| = {worst:.2e} over {len(ids_list)} "
                              "sequences"))

    # 2. No stale state
    first = ablators[0]
    layer = desc.moe_layers[len(desc.moe_layers) // 2]
    t = (len(ids_list[0]) - 1) // 2
    active = first.state.moe[layer].indices[t].tolist()
    ids0 = ids_list[0][None].to(device)
    before = model(input_ids=ids0).logits[0].float()
    SequenceAblator(model, ids_list[0], engine="naive", layers=[layer]).run([Ablation(layer, t, (active[0],))])
    first.run([Ablation(layer, t, (active[0],))])
    after = model(input_ids=ids0).logits[0].float()
    drift = float((before - after).abs().max())
    leftover = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    checks.append(CheckResult("no_stale_state", drift <= 1e-6 and leftover == 0, drift, 1e-6,
                              f"max |logit drift| after an ablation = {drift:.2e}; hooks left: {leftover}"))

    # 3. Position diversity
    losses = torch.cat([a.state.losses for a in ablators])[:100]
    distinct = len({round(float(x), 6) for x in losses}) / max(len(losses), 1)
    checks.append(CheckResult("position_diversity", distinct > 0.5, distinct, 0.5,
                              f"{distinct:.0%} distinct losses over {len(losses)} positions"))

    # 4. Position specific: the same expert, ablated where it is routed vs where it is not.
    routed_effects, idle_effects = [], []
    for ablator in ablators:
        ls = ablator.state.moe[layer]
        n = ablator.state.seq_len - 1
        batch = []
        for pos in rng.sample(range(n), min(n, 20)):
            e = int(ls.indices[pos, 0])
            idle = [p for p in range(n) if not (ls.indices[p] == e).any()]
            batch.append(Ablation(layer, pos, (e,)))
            if idle:
                batch.append(Ablation(layer, rng.choice(idle), (e,)))
        for r in ablator.run(batch):
            routed = r.removed_weight > 0
            (routed_effects if routed else idle_effects).append(abs(r.delta_loss))
    mean_routed = sum(routed_effects) / max(len(routed_effects), 1)
    mean_idle = sum(idle_effects) / max(len(idle_effects), 1)
    checks.append(CheckResult("position_specific", mean_routed > mean_idle, mean_routed, mean_idle,
                              f"mean |delta| where routed {mean_routed:.3g} vs where not routed {mean_idle:.3g} "
                              f"(layer {layer}, {len(routed_effects)} + {len(idle_effects)} ablations)"))

    # 5. Fast engine == naive engine
    diffs: list[float] = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not valid; choose from {', '.join(MODES)}.")
        k = rng.randrange(len(ids_list))
        ids = ids_list[k]
        ls_all = ablators[k].state.moe
        sample = []
        for _ in range(n_engine_checks):
            lay = rng.choice(desc.moe_layers)
            pos = rng.randrange(len(ids) - 1)
            sample.append(Ablation(lay, pos, (int(ls_all[lay].indices[pos, rng.randrange(desc.top_k)]),),
                                   scope=rng.choice(("token", "sequence"))))
        fast = ablators[k].run(sample, mode, means=means)
        naive = SequenceAblator(model, ids, engine="naive").run(sample, mode, means=means)
        for f, nv in zip(fast, naive):
            diffs.append(max(abs(f.ablated_loss - nv.ablated_loss), abs(f.gap_norm - nv.gap_norm)))
    dtype = next(model.parameters()).dtype
    tol_max, tol_mean = ENGINE_TOLERANCE.get(dtype, ENGINE_TOLERANCE[torch.float32])
    worst_engine, mean_engine = max(diffs, default=0.0), sum(diffs) / max(len(diffs), 1)
    checks.append(CheckResult("engines_agree", worst_engine <= tol_max and mean_engine <= tol_mean, worst_engine,
                              tol_max, f"max |fast - naive| over {len(diffs)} ablations = {worst_engine:.2e} "
                              f"(mean {mean_engine:.2e}; tolerance {tol_max:g} max, {tol_mean:g} mean in "
                              f"{str(dtype).removeprefix('torch.')})"))
    return VerificationReport(tuple(checks), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                              n_sequences=len(ids_list), seed=seed)
