"""Non-finite weights and activations, found and named (decoder layer, expert, module) before a run relies on them.

A NaN or inf weight makes every loss it touches NaN, so an audit of such a model would fail late (its verification
reads ``max |logit drift| = nan``) or, worse, compare NaNs; :func:`nonfinite_weights` reads every parameter and
buffer once (weights offloaded to disk are not brought in: they are checked when they are used), and
:func:`first_nonfinite_module` runs one forward with a hook on every module and names the first whose output is
non-finite (a float16 overflow, for instance, with finite weights).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from moeaudit.models._describe import model_device

_LAYER = re.compile(r"\blayers\.(\d+)\.")


def _where(name: str, tensor: torch.Tensor, n_experts: int | None) -> str:
    """``name`` with its decoder layer and, for a fused experts tensor (first dimension = experts), the experts
    holding the non-finite values."""
    layer = _LAYER.search(name)
    parts = [f"layer {layer.group(1)}"] if layer else []
    bad = ~torch.isfinite(tensor.detach())
    if n_experts and "expert" in name and "shared" not in name and tensor.dim() >= 2 and tensor.shape[0] == n_experts:
        experts = torch.nonzero(bad.reshape(n_experts, -1).any(dim=1)).flatten().tolist()
        parts.append(("expert " if len(experts) == 1 else "experts ") + ", ".join(map(str, experts[:8]))
                     + (", ..." if len(experts) > 8 else ""))
    kinds = [k for k, n in (("NaN", int(torch.isnan(tensor).sum())), ("inf", int(torch.isinf(tensor).sum()))) if n]
    return f"{', '.join(parts) + ': ' if parts else ''}{name} ({' and '.join(kinds)})"


def nonfinite_weights(model: nn.Module, n_experts: int | None = None) -> list[str]:
    """Every floating-point parameter or buffer of ``model`` holding NaN or inf, named with its decoder layer and
    (fused expert weights, first dimension ``n_experts``) its experts; empty when all are finite."""
    found = []
    tensors: Iterable[tuple[str, torch.Tensor]] = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor.detach()).all()):
            found.append(_where(name, tensor, n_experts))
    return found


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """The name of the first module (in execution order) whose output holds NaN or inf in one forward of
    ``input_ids`` (shape ``(T,)`` or ``(1, T)``), or ``None`` when every output is finite."""
    found: list[str] = []

    def hook(name: str):
        def check(_module, _inputs, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() \
                    and not bool(torch.isfinite(out).all()):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        model(ids.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_finite(model: nn.Module, input_ids: torch.Tensor | None = None, *, n_experts: int | None = None) -> None:
    """Refuse a model with non-finite weights, or (given ``input_ids``) non-finite activations, naming where.

    Raises:
        ModelSourceError: Naming the tensors (layer, expert) or the first module, and the fix.
    """
    from moeaudit.errors import ModelSourceError

    bad = nonfinite_weights(model, n_experts)
    if bad:
        raise ModelSourceError(
            f"the model's weights hold NaN or inf values in {len(bad)} tensor(s): {'; '.join(bad[:4])}"
            + ("; ..." if len(bad) > 4 else "") + ". Every loss they touch would be NaN; restore those weights "
            "from an intact copy of the checkpoint (or re-download it), then run again.")
    if input_ids is not None:
        module = first_nonfinite_module(model, input_ids)
        if module is not None:
            layer = _LAYER.search(module + ".")
            raise ModelSourceError(
                f"a forward pass produces NaN or inf first in module {module!r}"
                + (f" (decoder layer {layer.group(1)})" if layer else "") + " although the weights are finite; "
                "in float16 this is usually an overflow: run with dtype=float32 or bfloat16.")
