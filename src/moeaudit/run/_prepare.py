"""Loading what a run computes on, each refusal right after what it needs: the tokenizer and the corpus first (the
positions bound needs no weights), then the model (its layers, its hub identity), all before observing or
ablating. The checks themselves live in :mod:`moeaudit.run._preflight`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeaudit.errors import RunDirectoryError
from moeaudit.models._checkpoint import hub_identity
from moeaudit.run._preflight import (
    Positions,
    Preflight,
    check_documents,
    check_identity,
    check_layers,
    check_positions,
)
from moeaudit.run._provenance import corpus_fingerprint
from moeaudit.run.execution import Execution
from moeaudit.rundir import RunDirectory

if TYPE_CHECKING:
    from moeaudit.run._progress import ProgressSink, StageTimer


@dataclass(frozen=True)
class RunOptions:
    """The per-call choices of :func:`moeaudit.run.pipeline.run_audit` that are not configuration."""

    trust_remote_code: bool
    allow_fewer: bool
    device: str
    execution: Execution


@dataclass
class Loaded:
    """What a run computes on, loaded and checked."""

    model: Any
    tokenizer: Any
    sequences: list
    layers: tuple[int, ...]
    positions: dict[str, Positions]
    #: Domain of each sequence (index = seq_id) when the corpus labels its documents, else ``None``.
    domains: list[str] | None = None


def load_for_run(plan: Preflight, run_dir: RunDirectory, manifest: dict, session: dict, timer: StageTimer,
                 progress: ProgressSink, options: RunOptions) -> Loaded:
    """Tokenizer and corpus first (the positions check needs no weights), then the model and the layers check;
    every refusal here comes before observing or ablating."""
    from moeaudit.corpus import load_corpus
    from moeaudit.models import check_finite, describe, load_tokenizer, load_weights

    config = plan.config
    progress.stage(f"loading the tokenizer of {config.model}", None)
    with timer("load_tokenizer"):
        tokenizer = load_tokenizer(plan.source, trust_remote_code=options.trust_remote_code)
    n_docs = max(config.n_docs, config.n_docs_progressive if "progressive" in config.experiments else 0)
    progress.stage(f"tokenising {config.corpus}", None)
    with timer("load_corpus"):
        sequences = load_corpus(config.corpus, tokenizer, n_samples=n_docs, max_length=config.max_length,
                                min_length=config.min_length, text_field=config.text_field,
                                encoding=config.encoding, documents=plan.documents)
    fingerprint = corpus_fingerprint(sequences)
    stored = manifest.get("corpus", {}).get("sha256")
    if stored is not None and stored != fingerprint:
        raise RunDirectoryError(f"the corpus {config.corpus!r} tokenises differently from when "
                                f"{str(run_dir.path)!r} was started (its contents or the tokenizer changed); the "
                                "stored cells would not match new ones. Run into another directory (out=).")
    check_documents(config, len(sequences), allow_fewer=options.allow_fewer, message=progress.message)
    kinds = {}
    if any(e != "progressive" for e in config.ablation_experiments):
        kinds["single"] = [len(s) for s in sequences[: config.n_docs]]
    if "progressive" in config.experiments:
        kinds["progressive"] = [len(s) for s in sequences[: config.n_docs_progressive]]
    positions = check_positions(config, kinds, allow_fewer=options.allow_fewer)
    for kind, p in positions.items():
        if p.n < p.requested:
            key = "n" if kind == "single" else "n_progressive"
            progress.message(f"the corpus has {p.available} valid positions for {key}={p.requested}; running with "
                             f"{p.n} (allow_fewer=True)")

    progress.stage(f"loading {config.model}", None)
    with timer("load_model"):
        model = load_weights(plan.source, dtype=config.dtype, device=options.device,
                             trust_remote_code=options.trust_remote_code, device_map=config.device_map)
    desc = describe(model)
    layers = check_layers(config, desc)  # before any observation or ablation
    progress.stage("checking for NaN / inf", None)
    check_finite(model, sequences[0].input_ids, n_experts=desc.n_experts)
    if plan.source.kind == "hub":
        identity = hub_identity(plan.source, getattr(model.config, "_commit_hash", None))
        check_identity(run_dir, manifest, identity)
        manifest["model_identity"] = identity
    placement = getattr(model, "hf_device_map", None) if config.device_map else None
    session.update(device=options.device if placement is None else f"device_map={config.device_map}",
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    if placement is not None:
        session["device_map"] = {k: str(v) for k, v in placement.items()}
    manifest["model"] = {"family": desc.family, "n_layers": desc.n_layers, "moe_layers": list(desc.moe_layers),
                         "n_experts": desc.n_experts, "top_k": desc.top_k,
                         "revision": getattr(model.config, "_commit_hash", None)}
    manifest["corpus"] = {"source": config.corpus, "n_sequences": len(sequences), "sha256": fingerprint,
                          "n_tokens": int(sum(len(s) for s in sequences))}
    domains = None if plan.domains is None else [plan.domains[s.doc_index] for s in sequences]
    if domains is not None:
        manifest["corpus"]["domains"] = domains
        manifest["corpus"]["domain_field"] = config.domain_field or "builtin"
    manifest["positions"] = {kind: p.to_dict() for kind, p in positions.items()}
    run_dir.write_manifest(manifest)
    return Loaded(model, tokenizer, sequences, layers, positions, domains)
