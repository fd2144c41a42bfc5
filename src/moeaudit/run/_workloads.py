"""How ``run``, ``map``, ``prune-eval`` and ``attribute`` count their work for a dry run
(:class:`moeaudit.run.estimate.Workload`),
following the configuration the way the commands compute it: the same documents (the first that pass the length
filter), the same sampled positions (:func:`moeaudit.experiments.candidate_positions`), one ablation per active
expert at each single-expert position, k = 1..top_k-1 experts per arm at each progressive position."""

from __future__ import annotations

from typing import Any

from moeaudit.run.estimate import Workload

#: Full forwards the verification suite runs on its 2 sequences in one mode (its checks' clean passes and
#: reference ablations, counted on the embedded model).
VERIFICATION_FORWARDS = 12
#: Bytes one attribution row takes on disk, in its document's part and in attribution.parquet (measured on the
#: ``attribute demo`` run: 10.3 MB for 178,016 rows with two modes, 58 bytes each).
ATTRIBUTION_ROW_BYTES = 60


def document_lengths(config, n_docs: int) -> tuple[list[int] | None, str]:
    """Token counts of the first ``n_docs`` documents of ``config.corpus`` that pass the length filter, tokenised
    as the run will, or ``None`` when the tokenizer or the corpus is not on this machine (then each document is
    assumed ``max_length`` tokens); and a note saying which."""
    from moeaudit.corpus import load_corpus
    from moeaudit.models import load_tokenizer
    from moeaudit.models._checkpoint import locate_model

    try:
        tokenizer = load_tokenizer(locate_model(config.model, probe_timeout=3.0))
        sequences = load_corpus(config.corpus, tokenizer, n_samples=n_docs, max_length=config.max_length,
                                min_length=config.min_length, text_field=config.text_field, encoding=config.encoding)
    except Exception:  # offline hub, uncached tokenizer or corpus: count from the configuration alone
        return None, (f"documents assumed {config.max_length} tokens each: the corpus {config.corpus!r} or the "
                      f"tokenizer of {config.model!r} is not on this machine (the counts of documents are then "
                      "those asked for)")
    return [len(s) for s in sequences], f"documents tokenised: {config.corpus}"


def _distinct_documents(lengths: list[int], n: int, seed: int, min_context: int) -> int:
    from moeaudit.experiments import candidate_positions

    return len(set(candidate_positions(lengths, seed, min_context)[:n, 0].tolist()))


def _lengths(config, n_docs: int, notes: list[str]) -> list[int]:
    lengths, note = document_lengths(config, n_docs)
    notes.append(note)
    if lengths is None:
        return [config.max_length] * n_docs
    if len(lengths) < n_docs:
        notes.append(f"the corpus has {len(lengths)} documents that pass min_length, fewer than the {n_docs} asked "
                     "for: the run refuses unless --allow-fewer")
    return lengths


def run_workload(config, geometry) -> Workload:
    """The plan of ``moeaudit run`` (:class:`moeaudit.RunConfig`)."""
    notes: list[str] = []
    layers = list(config.layers or geometry.moe_layers)
    k, n_metrics = geometry.top_k, len(config.metrics)
    single = [e for e in config.ablation_experiments if e != "progressive"]
    progressive = "progressive" in config.experiments
    n_docs = max(config.n_docs, config.n_docs_progressive if progressive else 0)
    lengths = _lengths(config, n_docs, notes)
    single_lengths, prog_lengths = lengths[: config.n_docs], lengths[: config.n_docs_progressive]
    ablations, records, touched = {}, 0, set()
    per_position = (k + (2 * n_metrics if "audit" in single else 0) + (2 if "control" in single else 0)
                    + (k * (n_metrics + 1) if "rank_validity" in single else 0)
                    + (k if "redistribution" in single else 0))
    arms = len(config.progressive_arms)
    from moeaudit.run.execution import canonical_cells

    cells = [c.name for c in canonical_cells(layers, single=bool(single), progressive=progressive)]
    for layer in layers:
        if single:
            ablations[layer] = ablations.get(layer, 0) + config.n * k
            records += config.n * per_position
        if progressive:
            ablations[layer] = ablations.get(layer, 0) + config.n_progressive * arms * (k - 1)
            records += config.n_progressive * arms * (k - 1)
    if single:
        touched.add(_distinct_documents(single_lengths, config.n, config.seed, config.min_context))
    if progressive:
        touched.add(_distinct_documents(prog_lengths, config.n_progressive, config.seed, config.min_context))
    clean = max(touched, default=0) + VERIFICATION_FORWARDS
    observed = len(single_lengths) * (2 if "stability" in config.experiments else 1)
    if progressive and arms > 1:
        notes.append("progressive ablations are counted per arm; a set two arms remove alike is ablated once")
    return Workload("run", cells, documents=len(lengths), tokens=int(sum(lengths)), clean_passes=clean,
                    ablations=ablations, records=records, observed=observed, query_tokens=_query_tokens(config),
                    notes=notes)


def map_workload(config, geometry, *, command: str = "map") -> Workload:
    """The plan of ``moeaudit map`` (:class:`moeaudit.pruning.MapConfig`): one pool cell per layer."""
    notes: list[str] = []
    layers = list(config.layers or geometry.moe_layers)
    lengths = _lengths(config, config.n_docs, notes)
    k = geometry.top_k
    cells = [f"L{layer}-single" for layer in layers]
    from moeaudit.pruning._positions import positions_per_layer

    n, how = positions_per_layer(config.n, lengths, min_context=config.min_context, n_layers=len(layers), top_k=k)
    if config.n is None:
        notes.append(f"n unset: {n} positions per layer ({how})")
    touched = _distinct_documents(lengths, n, config.seed, config.min_context)
    return Workload(command, cells, documents=len(lengths), tokens=int(sum(lengths)),
                    clean_passes=touched + VERIFICATION_FORWARDS, ablations={layer: n * k for layer in layers},
                    records=n * k * len(layers), query_tokens=_query_tokens(config), notes=notes)


def prune_workload(config, geometry) -> Workload:
    """The plan of ``moeaudit prune-eval`` (:class:`moeaudit.pruning.PruneConfig`): the importance map when
    ``causal`` is a criterion, the observe table when a metric is, then one evaluation of every pruned model
    (unpruned first; per criterion, fraction, random seed and method; per layer too with ``per_layer``); the
    importance map also for ``protect_top``."""
    from moeaudit.pruning._units import CAUSAL, RANDOM, resolve_criteria

    criteria = resolve_criteria(config.criteria)
    layers = list(config.layers or geometry.moe_layers)
    need_map = CAUSAL in criteria or int(getattr(config, "protect_top", 0) or 0) > 0
    base = map_workload(config, geometry, command="prune-eval") if need_map else \
        Workload("prune-eval", [], 0, 0, 0, {}, 0, notes=[])
    notes = list(base.notes)
    seeds = sum(config.random_seeds if c == RANDOM else 1 for c in criteria)
    allocations = tuple(getattr(config, "allocation", ("uniform",)))
    folds = max(1, int(getattr(config, "folds", 1) or 1)) if not config.eval_corpus else 1
    methods = len(tuple(getattr(config, "method", ("delete",))))  # each method evaluates the same removals
    per_fold = 1 + len(config.fractions) * seeds * methods * (
        len(allocations) + (len(layers) if config.per_layer and "uniform" in allocations else 0))
    units = folds * per_fold
    if folds > 1 or getattr(config, "reference", "") == "loo":
        notes.append(f"{folds} folds, each with its own importance map and evaluation; leave-one-out references "
                     "(reference=loo) add ablations not counted here: counts for prune-eval are approximate")
    eval_config = _Eval(config)
    eval_lengths = _lengths(eval_config, config.n_docs_eval, notes) if config.eval_corpus else \
        _lengths(config, config.n_docs + config.n_docs_eval, notes)[config.n_docs:]
    observe = config.n_docs if [c for c in criteria if c not in (CAUSAL, RANDOM)] else 0
    calibration = base.documents or config.n_docs
    tokens_eval = int(sum(eval_lengths))
    notes.append(f"{units} pruned models (the unpruned one included), each evaluated on {len(eval_lengths)} "
                 "documents")
    return Workload("prune-eval", base.cells, documents=calibration + len(eval_lengths),
                    tokens=base.tokens + tokens_eval, clean_passes=base.clean_passes * folds,
                    observed=observe * folds, ablations={k: v * folds for k, v in base.ablations.items()},
                    records=base.records * folds, full_forwards=units * len(eval_lengths),
                    query_tokens=base.query_tokens, notes=list(dict.fromkeys(notes)))


def attribute_workload(config, geometry) -> Workload:
    """The plan of ``moeaudit attribute`` (:class:`moeaudit.run.attribution.AttributeConfig`): every predicted position
    of the ``n_docs`` documents attributed at every layer (one forward+backward per chunk of at most
    :data:`moeaudit.intervene._attribution.DEFAULT_ATTRIBUTION_TOKENS` positions, one estimate per active expert
    and mode), and the exact single-expert pool of ``n_exact`` positions per (layer, mode), one cell each."""
    from moeaudit.intervene._attribution import DEFAULT_ATTRIBUTION_TOKENS

    notes: list[str] = []
    layers, modes, k = list(config.layers or geometry.moe_layers), list(config.modes), geometry.top_k
    lengths = _lengths(config, config.n_docs, notes)
    positions = int(sum(n - 1 for n in lengths))
    chunks = int(sum(-(-(n - 1) // DEFAULT_ATTRIBUTION_TOKENS) for n in lengths))
    notes.append("peak memory counts the ablation engine's chunk; attribution's backward keeps a chunk's "
                 "activations through every later layer (halved on out-of-memory), not estimated here")
    return Workload("attribute", [f"L{layer:03d}-{mode}" for layer in layers for mode in modes],
                    documents=len(lengths), tokens=int(sum(lengths)),
                    clean_passes=len(lengths) + VERIFICATION_FORWARDS * len(modes),
                    ablations={layer: config.n_exact * k * len(modes) for layer in layers},
                    records=positions * len(layers) * k, positions=positions,
                    estimates=positions * len(layers) * k * len(modes), gradient_chunks=chunks,
                    record_bytes=ATTRIBUTION_ROW_BYTES, notes=notes)


class _Eval:
    """A prune-eval configuration seen as its evaluation corpus (for :func:`document_lengths`)."""

    def __init__(self, config) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return self._config.eval_corpus if name == "corpus" else getattr(self._config, name)


def _query_tokens(config) -> float:
    """Tokens one ablation sends through the later layers: 1 (token scope), about half a document (sequence)."""
    return 1.0 if config.scope == "token" else config.max_length / 2
