"""Embedded, offline assets: the built-in corpus and two checkpoints, ``builtin:tiny-moe`` (OLMoE, 16 experts,
top-4) and ``builtin:tiny-mixtral`` (Mixtral, 8 experts, top-2; same corpus and tokenizer).

Nothing heavy happens at import time (no torch / transformers import, no corpus build).

- ``BUILTIN_MODELS``: name -> checkpoint directory (a standard Hugging Face directory: config.json,
  model.safetensors, tokenizer files, README.md model card, training_log.csv, eval.json).
- ``builtin_model_path(name)``: the directory for ``name`` (``"tiny-moe"``, ``"tiny-mixtral"``; a ``"builtin:"`` prefix is
  accepted).
- ``builtin_documents(split)``: the built-in corpus, ``"train"`` / ``"heldout"`` (``"heldout_docs"`` is a
  Python-version-dependent diagnostic split); see :mod:`moeaudit.builtin.corpus`.
"""

from __future__ import annotations

from pathlib import Path

from .corpus import DOMAINS, SPLITS, build_documents, build_labelled_documents

__all__ = [
    "BUILTIN_MODELS",
    "DOMAINS",
    "SPLITS",
    "builtin_documents",
    "builtin_labelled_documents",
    "builtin_model_path",
]

_HERE = Path(__file__).resolve().parent

BUILTIN_MODELS: dict[str, Path] = {"tiny-moe": _HERE / "tiny-moe", "tiny-mixtral": _HERE / "tiny-mixtral"}


def builtin_model_path(name: str) -> Path:
    """Return the checkpoint directory of the embedded model ``name`` (e.g. ``"tiny-moe"`` or ``"builtin:tiny-moe"``)."""
    key = name[len("builtin:") :] if name.startswith("builtin:") else name
    if key not in BUILTIN_MODELS:
        valid = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; valid names: {valid} (use 'builtin:<name>')")
    path = BUILTIN_MODELS[key]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"built-in model {key!r} is missing its files at {path} (broken installation?)")
    return path


def builtin_documents(split: str) -> list[str]:
    """Documents of the built-in corpus split ``"train"`` or ``"heldout"`` (deterministic, built on the fly)."""
    return build_documents(split)


def builtin_labelled_documents(split: str) -> list[tuple[str, str]]:
    """``[(domain, text), ...]`` of the built-in corpus split (see :func:`builtin_documents`)."""
    return build_labelled_documents(split)
