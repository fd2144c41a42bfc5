"""Loading checkpoints (hub id, local directory, or ``builtin:NAME``) as plain transformers objects."""

from __future__ import annotations

from pathlib import Path

import torch

from moeaudit.errors import UnsupportedModelError

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """Map a dtype name (``auto``, ``float32``, ``bfloat16``, ``float16``, short forms) to what transformers takes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}.") from None


def resolve_model_path(name_or_path: str | Path) -> str:
    """Turn ``builtin:NAME`` into the packaged checkpoint directory; pass other names through."""
    name = str(name_or_path)
    if name.startswith("builtin:"):
        from moeaudit.builtin import builtin_model_path

        return str(builtin_model_path(name.split(":", 1)[1]))
    return name


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: A hub id (``allenai/OLMoE-1B-7B-0924``), a local checkpoint directory, or
            ``builtin:tiny-moe`` for the checkpoint shipped with moeaudit.
        dtype: ``auto`` (the checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: Where to put the model (``cpu``, ``cuda``, ``cuda:1``, ...).
        trust_remote_code: Run modelling code shipped with the checkpoint. Off unless asked for.
        attn_implementation: Passed to transformers (``sdpa``, ``eager``, ...); ``None`` keeps its default.

    Returns:
        ``(model, tokenizer)`` as plain transformers objects.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{local} exists but holds no config.json, so it is not a transformers checkpoint directory. "
            "Pass a directory written by save_pretrained(), or a hub id."
        )
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise UnsupportedModelError(
                f"{path} needs its own modelling code. moeaudit does not run remote code unless asked: pass "
                f"trust_remote_code=True (CLI: --trust-remote-code) if you trust this checkpoint. ({exc})"
            ) from exc
        raise
    except OSError as exc:
        if not local.exists():
            raise OSError(
                f"could not load {path!r}: it is not a local directory and the hub could not provide it "
                f"(offline, or a wrong id?). Download it on a connected machine and pass the local directory. "
                f"({exc})"
            ) from exc
        raise
    model.to(device)
    model.eval()
    return model, tokenizer
