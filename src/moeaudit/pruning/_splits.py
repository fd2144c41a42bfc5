"""Which documents calibrate and which evaluate: a seeded shuffle, stratified by a document label where the corpus
has one, dealt into cross-fitting folds (torch-free, pure).

Rules:

- The pool is the corpus's documents that pass the length filter, visited in the order of a permutation seeded by
  ``split_seed`` (the first ``n_docs + n_docs_eval`` of that order), so the corpus's own order (often by domain or
  source) never decides the split.
- Stratification: the pool is grouped by label (labels in order of first appearance, each label's documents in
  shuffled order) and assigned systematically along that order, so each label's documents are dealt over the splits
  in turn and every split gets each label in proportion (within one document per label).
- ``folds = K >= 2``: the document at grouped position p belongs to fold p mod K; fold k evaluates its own
  documents with criteria calibrated on the other folds', so every document is evaluated exactly once.
- ``folds = 1``: one split; position p calibrates when floor((p + 1) c / N) > floor(p c / N) with c = ``n_docs``
  of N = ``n_docs + n_docs_eval`` documents, else it evaluates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeaudit.errors import ConfigError, CorpusError


@dataclass(frozen=True)
class Fold:
    """One calibration / evaluation pair of document ids (indices in the corpus's own order)."""

    fold: int
    calibration: tuple[int, ...]
    evaluation: tuple[int, ...]


def grouped(labels: Sequence[str]) -> np.ndarray:
    """Positions of ``labels`` (already in shuffled order) grouped by label, labels in order of first appearance,
    each label's documents kept in order (a stable sort); without labels (all equal) the order is unchanged."""
    order = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    return np.array(sorted(range(len(labels)), key=lambda p: (order[labels[p]], p)), dtype=np.int64)


def make_folds(doc_ids: Sequence[int], labels: Sequence[str] | None, *, folds: int, n_calibration: int) -> list[Fold]:
    """Deal the pool ``doc_ids`` (in shuffled order, with their ``labels`` or ``None``) into folds (module
    docstring). ``n_calibration`` is used for ``folds == 1`` only."""
    ids = np.asarray(doc_ids, dtype=np.int64)
    order = ids[grouped(list(labels) if labels is not None else [""] * len(ids))]
    if folds == 1:
        n, c = len(order), n_calibration
        cal = np.array([(p + 1) * c // n > p * c // n for p in range(n)])
        return [Fold(0, tuple(sorted(order[cal].tolist())), tuple(sorted(order[~cal].tolist())))]
    member = np.arange(len(order)) % folds
    return [Fold(k, tuple(sorted(order[member != k].tolist())), tuple(sorted(order[member == k].tolist())))
            for k in range(folds)]


def document_labels(source: str, field: str | None, text_field: str, encoding: str) -> list[str] | None:
    """One label per document of ``source`` (in :func:`moeaudit.corpus.read_documents` order) to stratify by: the
    builtin corpus's domains, a ``.jsonl`` / ``.parquet`` corpus's ``field``; ``None`` when there is none.

    Raises:
        ConfigError: ``field`` named for a corpus that cannot carry one, or missing from it.
    """
    if source in ("builtin", "builtin:heldout", "builtin:train"):
        if field is not None:
            raise ConfigError(f"stratify_field={field!r}: the builtin corpus is stratified by its domains; leave "
                              "stratify_field= unset.")
        from moeaudit.builtin import builtin_labelled_documents

        return [d for d, _ in builtin_labelled_documents("train" if source == "builtin:train" else "heldout")]
    if field is None:
        return None
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        import json

        rows = [json.loads(line) for line in path.read_text(encoding=encoding).splitlines() if line.strip()]
    elif suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        raise ConfigError(f"stratify_field={field!r} needs a .jsonl or .parquet corpus with that field; "
                          f"{source!r} has no fields. Leave stratify_field= unset.")
    rows = [r for r in rows if str(r.get(text_field, "")).strip()]  # read_documents drops blank documents
    missing = [i for i, r in enumerate(rows) if field not in r]
    if missing:
        raise CorpusError(f"stratify_field={field!r}: document {missing[0]} of {source!r} has no such field "
                          f"({len(missing)} documents lack it); name a field every document has.")
    return [str(r[field]) for r in rows]


def composition(doc_ids: Sequence[int], labels: Sequence[str] | None) -> dict[str, int]:
    """Documents per label among ``doc_ids`` (``{"all": n}`` without labels)."""
    if labels is None:
        return {"all": len(doc_ids)}
    out: dict[str, int] = {}
    for d in doc_ids:
        out[labels[d]] = out.get(labels[d], 0) + 1
    return dict(sorted(out.items()))


def stratified_sample(labels: Sequence[str], n: int) -> list[int]:
    """Positions of ``n`` of the documents (``labels`` in shuffled order) drawn in proportion to their labels:
    systematic selection along the label-grouped order (position p of M kept when floor((p + 1) n / M) >
    floor(p n / M)), so each label gets n x its share within one document."""
    order = grouped(list(labels))
    M = len(order)
    return sorted(int(order[p]) for p in range(M) if (p + 1) * n // M > p * n // M)
