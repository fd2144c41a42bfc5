"""The checks a run makes before it does any work, each refusing with one line naming the problem and the fix.

- :func:`preflight`: what the configuration, the file system, the corpus's text and the run directory's own files
  tell (paths, model source, encoding, another configuration or model, damaged files), before torch is imported.
- :func:`check_metrics`, :func:`check_device`: metric names and the device, which need torch imported but nothing
  loaded.
- :func:`check_positions`, :func:`check_layers`: what needs the tokenised corpus or the loaded model; the pipeline
  calls them right after those load, before observing or ablating, and removes a refused fresh run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeaudit.config import BEFORE_KEY_EXISTED, CORPUS_SOURCES, SUMMARY_KEYS, RunConfig
from moeaudit.errors import ConfigError, RunDirectoryError, did_you_mean
from moeaudit.models._checkpoint import ModelSource, identity_changes, locate_model, manifest_identity, model_identity
from moeaudit.rundir import RUN_TOOL, RunDirectory


def check_device(device: str) -> str:
    """Refuse a device this machine's torch cannot use (:func:`moeaudit.models.check_device`) as a config error."""
    from moeaudit.models import check_device as check

    try:
        return check(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, ``mps`` on Apple silicon, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_metrics(metrics: tuple[str, ...]) -> None:
    """Refuse metric names the observe table will not have, before any model is loaded."""
    from moeaudit.observation._observe import METRICS

    valid = list(METRICS)
    for m in metrics:
        if m not in valid:
            raise ConfigError(f"metrics={m!r} is not an observational metric; valid: {', '.join(valid)}."
                              f"{did_you_mean(m, valid)}")


@dataclass(frozen=True)
class Preflight:
    """What the checks found, handed to the run.

    Attributes:
        config: The configuration with its local paths resolved (what the run directory stores).
        source: Where the model is (built-in, a local directory, a hub id).
        identity: The model's identity (:func:`moeaudit.models._checkpoint.model_identity`); for a hub id only its name
            and commit (its files are fingerprinted once loading has cached them).
        documents: A corpus file's documents, read and decoded (``None`` for named corpora).
        domains: Each document's domain (:func:`moeaudit.corpus.read_domains`), or ``None`` when the corpus has
            none.
    """

    config: RunConfig
    source: ModelSource
    identity: dict[str, Any]
    documents: list[str] | None
    domains: list[str] | None = None


def preflight(config: RunConfig, out: str | Path) -> Preflight:
    """Check ``config`` and ``out`` without importing torch; see the module docstring.

    Raises:
        RunDirectoryError: ``out`` is a file, or holds a run that cannot be resumed with ``config`` (another
            configuration, another model, damaged files).
        ModelSourceError: The model cannot be found (no such directory, hub unreachable and not cached).
        CorpusError: A corpus file that does not exist or does not decode.
    """
    from moeaudit.corpus import read_documents, read_domains

    config = config.with_resolved_paths()
    run_dir = RunDirectory(out)
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise RunDirectoryError(f"out={str(run_dir.path)!r} is an existing file, not a directory; pass a directory "
                                "for the run (a new one, or a run directory to resume).")
    source = locate_model(config.model)
    documents = None
    if config.corpus not in CORPUS_SOURCES or config.corpus == "wikitext-2":  # offline: refused in seconds
        documents = read_documents(config.corpus, text_field=config.text_field, encoding=config.encoding)
    domains = read_domains(config.corpus, domain_field=config.domain_field, text_field=config.text_field,
                           encoding=config.encoding)
    identity = model_identity(source)
    if source.kind == "hub":  # its cached files may be incomplete before loading: the commit decides until then
        identity["files"] = None
    plan = Preflight(config, source, identity, documents, domains)
    check_resumable(run_dir, plan)
    return plan


def check_resumable(run_dir: RunDirectory, plan: Preflight) -> bool:
    """When ``run_dir`` holds a run, check that ``plan`` may resume it (same configuration, same model, intact
    files); return whether it holds one.

    Raises:
        RunDirectoryError: Naming what differs or which file is damaged, and the fix.
    """
    if not run_dir.exists():
        return False
    manifest = run_dir.manifest()
    if run_dir.restartable(manifest) and manifest.get("tool", RUN_TOOL) == RUN_TOOL:
        return True  # failed before its first cell: the run starts afresh (RunDirectory.claim)
    run_dir.check_config(manifest, plan.config.to_dict(), defaults={**RunConfig().to_dict(), **BEFORE_KEY_EXISTED},
                         relaxed=SUMMARY_KEYS)
    check_identity(run_dir, manifest, plan.identity)
    run_dir.check_files()
    return True


def check_identity(run_dir: RunDirectory, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume a run directory that was started with another model."""
    stored = manifest_identity(manifest)
    changes = identity_changes(stored, identity) if stored else []
    if changes:
        raise RunDirectoryError(
            f"{str(run_dir.path)!r} was started with another model ({'; '.join(changes)}); resuming would mix cells "
            "of two models. Run into another directory (out=), or restore the checkpoint the run was started with.")


@dataclass(frozen=True)
class Positions:
    """How many positions a kind of cell asks for and how many its corpus has.

    Attributes:
        requested: ``n`` (or ``n_progressive``) of the configuration.
        available: Valid positions of the corpus's sequences (before skipping tokens with one active expert).
        n: What the run uses: ``requested``, or ``available`` when it is smaller and fewer are allowed.
    """

    requested: int
    available: int
    n: int

    def to_dict(self) -> dict[str, int]:
        return {"requested": self.requested, "available": self.available, "n": self.n}


def check_documents(config: RunConfig, available: int, *, allow_fewer: bool, message=None) -> None:
    """Refuse ``n_docs`` / ``n_docs_progressive`` above the documents the corpus has (those of at least
    ``min_length`` tokens), as ``map`` and ``prune-eval`` do, unless ``allow_fewer`` (then ``message`` says so);
    and ranking stability with fewer than 4 documents (two per random half), before the model loads.

    Raises:
        ConfigError: Naming the counts and the fix.
    """
    wanted = [("n_docs", config.n_docs)]
    if "progressive" in config.experiments:
        wanted.append(("n_docs_progressive", config.n_docs_progressive))
    for key, n in wanted:
        if n > available and not allow_fewer:
            raise ConfigError(f"{config.corpus!r} has only {available} documents of at least min_length="
                              f"{config.min_length} tokens, but the run asks for {key}={n}. Lower {key}= or "
                              f"min_length=, use a larger corpus, or pass allow_fewer=True to run with {available}.")
        if n > available and message is not None:
            message(f"the corpus has {available} documents for {key}={n}; running with {available} "
                    "(allow_fewer=True)")
    if "stability" in config.experiments and min(config.n_docs, available) < 4:
        raise ConfigError(f"ranking stability compares random halves of the documents and needs at least 4, but the "
                          f"run has {min(config.n_docs, available)} (n_docs={config.n_docs}); raise n_docs=, or "
                          "leave stability out of experiments=.")


def check_positions(config: RunConfig, lengths: dict[str, Sequence[int]], *, allow_fewer: bool) -> dict[str, Positions]:
    """Count each cell kind's valid positions from its sequences' lengths; refuse ``n`` above that count unless
    ``allow_fewer``, and a sample whose positions all lie in one document (the summary's clustered bootstrap
    resamples documents, so it needs two).

    Args:
        config: The run's configuration (``n``, ``n_progressive``, ``min_context``, ``n_docs``, ...).
        lengths: ``{"single": [...], "progressive": [...]}``: token counts of the sequences each kind samples from.
        allow_fewer: Run with the positions there are instead of refusing.

    Raises:
        ConfigError: A kind asks for more positions than its corpus has.
    """
    from moeaudit.corpus import valid_positions

    keys = {"single": ("n", "n_docs", 3), "progressive": ("n_progressive", "n_docs_progressive", 1)}
    out = {}
    for kind, seq_lengths in lengths.items():
        n_key, docs_key, least = keys[kind]
        requested = getattr(config, n_key)
        available = sum(len(valid_positions(int(n), config.min_context)) for n in seq_lengths)
        if requested > available and (not allow_fewer or available < least):
            raise ConfigError(
                f"{n_key}={requested} positions per cell, but the corpus's {len(seq_lengths)} sequences "
                f"({docs_key}={getattr(config, docs_key)}, max_length={config.max_length}, "
                f"min_context={config.min_context}) have only {available} valid positions; lower {n_key}=, use "
                f"more or longer documents ({docs_key}=, max_length=)"
                + (f", or pass allow_fewer=True to run with {available}." if available >= least else "."))
        n = min(requested, available)
        if kind == "single":
            from moeaudit.experiments import candidate_positions

            documents = set(candidate_positions(seq_lengths, config.seed, config.min_context)[:n, 0].tolist())
            if len(documents) < 2:
                raise ConfigError(
                    f"the {n} positions sampled for {n_key}={requested} all lie in one document, and the audit's "
                    "clustered bootstrap needs positions from at least 2 documents; raise n= or n_docs=, or pick "
                    "another seed=.")
        out[kind] = Positions(requested, available, n)
    return out


def check_layers(config: RunConfig, desc) -> tuple[int, ...]:
    """The layers to audit, checked against the loaded model's description (:class:`moeaudit.models.MoEDescription`)
    before anything is observed: layers it does not have, or whose MLP is dense, are refused."""
    if config.layers is None:
        return tuple(desc.moe_layers)
    bad = [layer for layer in config.layers if layer not in desc.moe_layers]
    if bad:
        dense = [layer for layer in bad if layer in desc.dense_layers]
        why = (f"{', '.join(map(str, dense))} dense, " if dense else "") + f"{desc.n_layers} decoder layers in all"
        raise ConfigError(f"layers={','.join(map(str, config.layers))}: {', '.join(map(str, bad))} not MoE "
                          f"layer(s) of {config.model!r} ({why}); pick from its MoE layers "
                          f"{','.join(map(str, desc.moe_layers))}, or leave layers= unset for all of them.")
    return tuple(config.layers)
