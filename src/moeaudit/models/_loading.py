"""Loading checkpoints (hub id, local directory, or ``builtin:NAME``) as plain transformers objects."""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from moeaudit.errors import ModelSourceError, UnsupportedModelError
from moeaudit.models._checkpoint import ModelSource, locate_model

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


@contextmanager
def materialized(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, the weights of ``module`` and every submodule that accelerate offloaded (to CPU RAM or
    disk: ``meta`` until a forward) sit on their execution device, as during a forward; a no-op for a model
    without offloading. For reading weights outside a forward (weight-only criteria, slicing)."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # accelerate absent: nothing can be offloaded
        yield
        return
    with ExitStack() as stack:
        for sub in module.modules():
            if has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub))
        yield


def check_device(device: str | torch.device) -> str:
    """Refuse a device this torch cannot use, before anything is loaded onto it; return its name.

    Raises:
        ValueError: Not a device name, or a CUDA / MPS device this machine or torch build does not have.
    """
    name = str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; valid: cpu, cuda, cuda:N, mps (or auto in a run "
                         "configuration).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise ValueError(f"device={name!r} but no CUDA GPU is usable here ({build}); use device=cpu (or auto), "
                             "or install a CUDA build of torch on a machine with a GPU.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={name!r} but this machine has {count} CUDA device(s) (cuda:0 to "
                             f"cuda:{count - 1}); pick one of those.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={name!r} but Apple's MPS backend is not available here; use device=cpu.")
    elif dev.type != "cpu":
        raise ValueError(f"device={name!r}: moeaudit runs on cpu, cuda, cuda:N or mps.")
    return name


def load_tokenizer(name_or_path: str | Path | ModelSource, *, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint (see :func:`load_model` for the names accepted)."""
    from transformers import AutoTokenizer

    source = name_or_path if isinstance(name_or_path, ModelSource) else locate_model(str(name_or_path))
    with _load_errors(source, trust_remote_code):
        return AutoTokenizer.from_pretrained(source.load_path, trust_remote_code=trust_remote_code,
                                             local_files_only=source.local_files_only)


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
        device: Where to put the model (``cpu``, ``cuda``, ``cuda:1``, ``mps``); checked before loading. Ignored
            with ``device_map``.
        trust_remote_code: Run modelling code shipped with the checkpoint. Off unless asked for.
        attn_implementation: Passed to transformers (``sdpa``, ``eager``, ...); ``None`` keeps its default.
        device_map: Spread the layers over several devices with accelerate (``pip install 'moeaudit[accelerate]'``)
            for checkpoints larger than one device: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``
            (GPUs first, then CPU RAM, then disk), or a manual ``{module: device}`` map (a dict or a ``.json``
            file). The engines move hidden states, masks, rotary embeddings and cached keys/values to each layer's
            device.
        offload_folder: Where accelerate puts weights that fit on no device (``device_map`` only). Default: a new
            temporary directory (under ``$TMPDIR``), deleted with the model; MoE checkpoints need one whenever a
            layer goes to ``disk``, since their fused expert weights are re-saved there.

    Returns:
        model_and_tokenizer (tuple[PreTrainedModel, PreTrainedTokenizerBase]): ``(model, tokenizer)`` as plain transformers objects.

    Raises:
        ModelSourceError: No such directory, a hub id that cannot be reached or is not cached, or weights that
            torch's safe loader refuses (a pickle that would run code).
        UnsupportedModelError: The checkpoint needs its own modelling code and ``trust_remote_code`` is off.
        ValueError: A device this machine cannot use, or an unknown dtype.
    """
    torch_dtype = resolve_dtype(dtype)
    device_map = resolve_device_map(device_map)
    if device_map is None:
        check_device(device)
    source = locate_model(str(name_or_path))
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_weights(source, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code,
                         attn_implementation=attn_implementation, device_map=device_map,
                         offload_folder=offload_folder)
    return model, tokenizer


def load_weights(source: ModelSource, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, attn_implementation: str | None = None,
                 device_map: str | dict | None = None, offload_folder: str | Path | None = None):
    """The model of a located checkpoint, on ``device`` (or spread by ``device_map``), in eval mode
    (:func:`load_model` without the tokenizer)."""
    from transformers import AutoModelForCausalLM

    device_map = resolve_device_map(device_map)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code,
              "local_files_only": source.local_files_only}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ImportError("device_map needs accelerate: pip install 'moeaudit[accelerate]' (or pip install "
                              "accelerate), or load the model on one device with device=...") from None
        kwargs["device_map"] = device_map
        temporary = None
        if offload_folder is None:  # MoE checkpoints' fused experts are re-saved when offloaded to disk
            temporary = tempfile.mkdtemp(prefix="moeaudit-offload-")
        kwargs["offload_folder"] = str(offload_folder or temporary)
    with _load_errors(source, trust_remote_code):
        try:
            model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
        except BaseException:
            if device_map is not None and temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
    if device_map is None:
        model.to(device)
    elif temporary is not None:
        _remove_with(model, temporary)
    model.eval()
    return model


def _remove_with(model: torch.nn.Module, folder: str) -> None:
    """Delete ``folder`` (weights accelerate offloaded to disk) when ``model`` is garbage-collected, or at exit; an
    empty folder (nothing went to disk) is deleted at once."""
    if not any(Path(folder).iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
        return
    weakref.finalize(model, shutil.rmtree, folder, True)


@contextmanager
def _load_errors(source: ModelSource, trust_remote_code: bool) -> Iterator[None]:
    """transformers' and torch's refusals as one-line :mod:`moeaudit.errors` messages."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(exc))
        what = f"it asks to run {blocked.group(1)}" if blocked else "it holds objects that are not plain tensors"
        raise ModelSourceError(
            f"model {source.name!r}: torch's safe loader refused a pickled weight file ({what}; loading it "
            "unrestricted could execute code). moeaudit never loads pickles unrestricted: use a .safetensors "
            "checkpoint of this model from a source you trust.") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise UnsupportedModelError(
                f"model {source.name!r} needs its own modelling code (shipped with the checkpoint). moeaudit does "
                "not run remote code unless asked: pass trust_remote_code=True if you trust this checkpoint."
            ) from None
        raise
    except OSError as exc:
        if isinstance(exc, ModelSourceError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"could not load model {source.name!r}: {first}") from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # safetensors' own class, not importable under a stable name
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ModelSourceError(f"model {source.name!r}: a .safetensors weight file is damaged ({reason}); download "
                               "or copy the checkpoint again.") from None
