"""Loading a map / prune-eval run once its checks passed (:mod:`moeaudit.run._prune_preflight`): the model, the
calibration split and the disjoint evaluation split, recorded in the run directory (``splits.json``,
``eval_tokens.parquet``) and checked against it on resume."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from moeaudit.corpus import CorpusSequence, load_corpus, read_documents
from moeaudit.errors import CorpusError, RunDirectoryError
from moeaudit.models._checkpoint import hub_identity
from moeaudit.pruning._plan import PruneGeometry, prune_geometry
from moeaudit.pruning._splits import composition, document_labels, make_folds, stratified_sample
from moeaudit.run._preflight import check_identity, check_layers
from moeaudit.run._prune_preflight import MapPlan
from moeaudit.run.pipeline import ProgressSink, corpus_fingerprint
from moeaudit.rundir import RunDirectory


@dataclass
class FoldData:
    """One fold's documents: criteria are computed on ``calibration``, pruned models evaluated on ``evaluation``."""

    fold: int
    calibration: list[CorpusSequence]
    evaluation: list[CorpusSequence]

    @property
    def eval_docs(self) -> np.ndarray:
        """Document id (index in its source) of every predicted token of the evaluation split, in loss order."""
        return np.concatenate([np.full(len(q) - 1, q.doc_index, dtype=np.int64) for q in self.evaluation]) \
            if self.evaluation else np.zeros(0, dtype=np.int64)


@dataclass
class Loaded:
    """The model and the splits of a run (one :class:`FoldData` per cross-fitting fold)."""

    model: nn.Module
    tokenizer: object
    geometry: PruneGeometry
    layers: tuple[int, ...]
    folds: list[FoldData]

    @property
    def calibration(self) -> list[CorpusSequence]:
        return self.folds[0].calibration

    @property
    def evaluation(self) -> list[CorpusSequence]:
        return self.folds[0].evaluation

    @property
    def eval_docs(self) -> np.ndarray:
        return self.folds[0].eval_docs


def _take(source: str, tokenizer, plan: MapPlan, n: int, what: str, shuffle_seed: int | None = None
          ) -> list[CorpusSequence]:
    config = plan.config
    sequences = load_corpus(source, tokenizer, n_samples=n, max_length=config.max_length,
                            min_length=config.min_length, text_field=config.text_field, encoding=config.encoding,
                            documents=plan.documents.get(source), shuffle_seed=shuffle_seed)
    if len(sequences) < n:
        raise CorpusError(f"{source!r} has only {len(sequences)} documents of at least min_length="
                          f"{config.min_length} tokens, but the run asks for {n} ({what}). Lower "
                          f"{' or '.join(re.findall(r'[a-z_]+=', what))} or min_length=, or use a larger corpus.")
    return sequences


def _labels(config, source: str, n_documents: int) -> list[str] | None:
    labels = document_labels(source, getattr(config, "stratify_field", None), config.text_field, config.encoding)
    if labels is not None and len(labels) != n_documents:
        raise CorpusError(f"stratify_field={config.stratify_field!r}: {source!r} reads as {n_documents} documents "
                          f"but has {len(labels)} labelled rows (a WikiText-style export groups rows into "
                          "articles); leave stratify_field= unset for it.")
    return labels


def _prune_folds(config, tokenizer, plan: MapPlan) -> tuple[list[FoldData], list[str] | None, str]:
    """The folds of a prune-eval run (see :mod:`moeaudit.pruning._splits`), the labels and the evaluation source."""
    eval_source = config.eval_corpus or config.corpus
    seed = config.split_seed
    if eval_source != config.corpus:
        calibration = _take(config.corpus, tokenizer, plan, config.n_docs, f"n_docs={config.n_docs}", seed)
        held_out = _take(eval_source, tokenizer, plan, config.n_docs_eval, f"n_docs_eval={config.n_docs_eval}",
                         seed)
        return [FoldData(0, calibration, held_out)], None, eval_source
    n_eval = config.n_docs_eval
    documents = plan.documents.get(config.corpus)
    if documents is None:
        documents = read_documents(config.corpus, text_field=config.text_field, encoding=config.encoding)
    labels = _labels(config, config.corpus, len(documents))
    what = f"n_docs={config.n_docs} + n_docs_eval={n_eval}"
    if labels is None:
        pool = _take(config.corpus, tokenizer, plan, config.n_docs + n_eval, what, seed)
    else:  # every passing document, then a proportional stratified sample of the pool
        every = load_corpus(config.corpus, tokenizer, max_length=config.max_length, min_length=config.min_length,
                            text_field=config.text_field, encoding=config.encoding, documents=documents,
                            shuffle_seed=seed)
        need = config.n_docs + n_eval
        if len(every) < need:
            _take(config.corpus, tokenizer, plan, need, what, seed)  # raises the usual message
        pool = [every[i] for i in sorted(stratified_sample([labels[q.doc_index] for q in every], need))]
    by_id = {q.doc_index: q for q in pool}
    ids = [q.doc_index for q in pool]
    folds = make_folds(ids, None if labels is None else [labels[d] for d in ids], folds=config.folds,
                       n_calibration=config.n_docs)
    return [FoldData(f.fold, [by_id[d] for d in f.calibration], [by_id[d] for d in f.evaluation])
            for f in folds], labels, eval_source


def _split_record(source: str, sequences: list[CorpusSequence]) -> dict:
    return {"source": source, "n_docs": len(sequences), "doc_ids": [q.doc_index for q in sequences],
            "n_tokens": int(sum(len(q) for q in sequences)),
            "n_predicted_tokens": int(sum(len(q) - 1 for q in sequences)), "sha256": corpus_fingerprint(sequences)}


def load_splits(plan: MapPlan, run_dir: RunDirectory, session, progress: ProgressSink, *,
                evaluation: bool) -> Loaded:
    """Load the model and the splits; write (first session) or check (resume) ``splits.json`` and
    ``eval_tokens.parquet``.

    A map's calibration split is the first ``n_docs`` documents of ``corpus`` that pass the length filter. A
    prune-eval's documents are shuffled with ``split_seed``, stratified and dealt into folds
    (:mod:`moeaudit.pruning._splits`); with ``eval_corpus`` (one fold) the calibration and evaluation documents are
    each a seeded sample of their corpus. Within a fold documents never appear in both.
    """
    from moeaudit.models import check_finite, describe, load_tokenizer, load_weights

    config, device = plan.config, plan.device
    progress.stage(f"loading {config.model}", None)
    with session.timer("load_model"):
        tokenizer = load_tokenizer(plan.source, trust_remote_code=plan.trust_remote_code)
        model = load_weights(plan.source, dtype=config.dtype, device=device,
                             trust_remote_code=plan.trust_remote_code, device_map=config.device_map)
    desc = describe(model)
    geometry = prune_geometry(model)
    layers = tuple(sorted(check_layers(config, desc)))  # refused before anything is computed
    if plan.source.kind == "hub":  # now that its files are cached: bind the run to them
        identity = hub_identity(plan.source, getattr(model.config, "_commit_hash", None))
        check_identity(run_dir, session.manifest, identity)
        session.manifest["model_identity"] = identity
    placement = getattr(model, "hf_device_map", None) if config.device_map else None
    session.entry.update(device=device if placement is None else f"device_map={config.device_map}",
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    if placement is not None:
        session.entry["device_map"] = {k: str(v) for k, v in placement.items()}
    session.manifest["model"] = {"family": desc.family, "n_layers": desc.n_layers,
                                 "moe_layers": list(desc.moe_layers), "n_experts": desc.n_experts,
                                 "top_k": desc.top_k, "n_shared_experts": desc.n_shared_experts,
                                 "revision": getattr(model.config, "_commit_hash", None)}
    progress.stage(f"tokenising {config.corpus}", None)
    with session.timer("load_corpus"):
        if not evaluation:
            folds = [FoldData(0, _take(config.corpus, tokenizer, plan, config.n_docs, f"n_docs={config.n_docs}"),
                              [])]
            labels, eval_source = None, config.corpus
        else:
            folds, labels, eval_source = _prune_folds(config, tokenizer, plan)
    splits = {"calibration": _split_record(config.corpus, folds[0].calibration)}
    if evaluation:
        splits = {"folds": [{"fold": f.fold, "calibration": [q.doc_index for q in f.calibration],
                             "evaluation": [q.doc_index for q in f.evaluation],
                             "composition": {"calibration": composition([q.doc_index for q in f.calibration], labels),
                                             "evaluation": composition([q.doc_index for q in f.evaluation], labels)},
                             "calibration_sha256": corpus_fingerprint(f.calibration),
                             "evaluation_sha256": corpus_fingerprint(f.evaluation)} for f in folds],
                  "split_seed": config.split_seed, "n_folds": len(folds),
                  "stratified_by": None if labels is None else (config.stratify_field or "domain"),
                  "calibration": _split_record(config.corpus, folds[0].calibration),
                  "evaluation": _split_record(eval_source, [q for f in folds for q in f.evaluation]),
                  "disjoint": ("by document: each fold evaluates documents its criteria never saw"
                               if eval_source == config.corpus else "by source (two corpora)")}
    stored = run_dir.read_json("splits.json")
    if stored is not None and stored != splits:
        raise RunDirectoryError(f"the corpus tokenises differently from when {run_dir.path} was started (its "
                                "contents or the tokenizer changed); stored results would not match new ones. Run "
                                "into a new directory.")
    if stored is None:
        run_dir.write_json("splits.json", splits)
        if evaluation:
            rows = [(q.doc_index, f.fold, q.input_ids.tolist()) for f in folds for q in f.evaluation]
            run_dir.write_parquet("eval_tokens.parquet", pd.DataFrame(rows, columns=["doc_id", "fold", "input_ids"]))
    session.manifest["corpus"] = {k: {kk: vv for kk, vv in v.items() if kk != "doc_ids"} if isinstance(v, dict)
                                  else v for k, v in splits.items() if k != "folds"}
    session.write()
    check_finite(model, folds[0].calibration[0].input_ids, n_experts=desc.n_experts)  # NaN / inf weights, activations
    return Loaded(model, tokenizer, geometry, layers, folds)
