"""Loading checkpoints (hub id, local directory, or ``builtin:NAME``) as plain transformers objects."""

from __future__ import annotations

import itertools
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


#: Placement strategies accelerate offers for ``device_map`` (a dict or a ``.json`` file gives a manual map).
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map: str | dict | None) -> str | dict | None:
    """Check a ``device_map``: ``None``, a strategy in :data:`DEVICE_MAPS`, a ``{module: device}`` dict, or the path
    of a ``.json`` file holding such a dict."""
    import json

    if device_map is None or isinstance(device_map, dict):
        return device_map
    text = str(device_map)
    if text in DEVICE_MAPS:
        return text
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"device_map file {text!r} does not exist; give a JSON file mapping module names "
                                    'to devices (e.g. {"model.layers.0": 0, "lm_head": "cpu"}).')
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"device_map file {text} is not valid JSON: {exc}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"device_map file {text} must hold a JSON object {{module: device}}, got "
                             f"{type(mapping).__name__}.")
        return mapping
    from moeaudit.errors import did_you_mean

    raise ValueError(f"device_map={text!r} is not valid; choose one of {', '.join(DEVICE_MAPS)}, or give a .json "
                     f"file mapping module names to devices.{did_you_mean(text, DEVICE_MAPS)}")


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device when it dispatched the module (offloaded
    weights sit on ``meta`` until the forward), else the device of its first parameter or buffer (CPU if none)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):  # lazily: the first one usually answers
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: A hub id (``allenai/OLMoE-1B-7B-0924``), a local checkpoint directory, or
            ``builtin:tiny-moe`` for the checkpoint shipped with moeaudit.
        dtype: ``auto`` (the checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: Where to put the model (``cpu``, ``cuda``, ``cuda:1``, ...). Ignored with ``device_map``.
        trust_remote_code: Run modelling code shipped with the checkpoint. Off unless asked for.
        attn_implementation: Passed to transformers (``sdpa``, ``eager``, ...); ``None`` keeps its default.
        device_map: Spread the layers over several devices with accelerate (``pip install 'moeaudit[accelerate]'``)
            for checkpoints larger than one device: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``
            (GPUs first, then CPU RAM, then disk), or a manual ``{module: device}`` map (a dict or a ``.json``
            file). The engines move hidden states, masks, rotary embeddings and cached keys/values to each layer's
            device.
        offload_folder: Where accelerate may put weights that fit on no device (``device_map`` only; transformers
            asks for it when a map sends modules to ``disk``).

    Returns:
        ``(model, tokenizer)`` as plain transformers objects.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    device_map = resolve_device_map(device_map)
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ImportError("device_map needs accelerate: pip install 'moeaudit[accelerate]' (or pip install "
                              "accelerate), or load the model on one device with device=...") from None
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{local} exists but holds no config.json, so it is not a transformers checkpoint directory. "
            "Pass a directory written by save_pretrained(), or a hub id."
        )
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
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
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer
