"""Per-document sufficient statistics of the observational metrics (``observe(..., per_document=True)``): any set
of documents aggregates exactly to the metric table ``observe`` would compute on those documents alone, so random
half-splits of a corpus need no second pass through the model.

Per (document, layer, expert) and per-token criterion the state is (n, total, M2): the count of values, their sum
and the sum of squared deviations from the document's own mean. Documents combine by the parallel formula of
Chan, Golub & LeVeque (1979): for a set S, N = Σ n_d, T = Σ t_d, and
M2 = Σ M2_d + Σ n_d (t_d / n_d − T / N)², exact in real arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moeaudit.observation._weights import weight_only_values

_BLOCK_ELEMENTS = 1 << 22


def document_moments(values: torch.Tensor, groups: torch.Tensor | None, token_doc: torch.Tensor, n_docs: int,
                     n_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, total, M2), each float64 [n_docs, n_experts], of one batch's per-token values.

    Args:
        values: [P] per routed pair (``groups`` = expert of each pair) or [T, n_experts] per token and expert
            (``groups`` None: every token counts for every expert).
        groups: [P] expert of each pair, or None.
        token_doc: [P] document (row of the batch) of each pair, or [T] of each token when ``groups`` is None.
    """
    v = values.double()
    if groups is None:
        n_tok = torch.bincount(token_doc, minlength=n_docs).double()
        total = torch.zeros(n_docs, n_experts, dtype=torch.float64, device=v.device).index_add(0, token_doc, v)
        mean = total / n_tok.clamp_min(1)[:, None]
        m2 = torch.zeros_like(total).index_add(0, token_doc, (v - mean[token_doc]).pow(2))
        n = n_tok[:, None].expand(n_docs, n_experts)
    else:
        flat = token_doc * n_experts + groups
        size = n_docs * n_experts
        n = torch.bincount(flat, minlength=size).double()
        total = torch.zeros(size, dtype=torch.float64, device=v.device).index_add(0, flat, v)
        mean = total / n.clamp_min(1)
        m2 = torch.zeros(size, dtype=torch.float64, device=v.device).index_add(0, flat, (v - mean[flat]).pow(2))
        n, total, m2 = (t.reshape(n_docs, n_experts) for t in (n, total, m2))
    return tuple(t.cpu().numpy().copy() for t in (n, total, m2))


def combine(n: np.ndarray, total: np.ndarray, m2: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, ...]:
    """Moments of document sets: ``member`` [S, D] (bool) selects documents of the D-leading arrays [D, ...];
    returns (N, T, M2), each [S, ...]."""
    member = np.asarray(member, dtype=bool)
    flat_shape = n.shape[1:]
    n2, t2, m22 = (a.reshape(a.shape[0], -1) for a in (n, total, m2))
    w = member.astype(float)
    big_n, big_t = w @ n2, w @ t2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(big_n > 0, big_t / np.where(big_n > 0, big_n, 1), 0.0)
        doc_mean = np.where(n2 > 0, t2 / np.where(n2 > 0, n2, 1), 0.0)
    between = np.empty_like(big_n)
    block = max(1, _BLOCK_ELEMENTS // max(1, n2.size))
    for s in range(0, member.shape[0], block):
        dev = (doc_mean[None] - mean[s:s + block, None]) ** 2 * n2[None]  # [s, D, F]
        between[s:s + block] = (w[s:s + block, :, None] * dev).sum(axis=1)
    big_m2 = w @ m22 + between
    shape = (member.shape[0], *flat_shape)
    return big_n.reshape(shape), big_t.reshape(shape), big_m2.reshape(shape)


def reduce_moments(n: np.ndarray, total: np.ndarray, m2: np.ndarray, reduce: str) -> np.ndarray:
    """``mean`` T/N (NaN for N = 0), ``sum`` T, ``std`` sqrt(M2/(N−1)) (ddof = 1; NaN for N < 2)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduce == "sum":
            return total
        if reduce == "mean":
            return np.where(n > 0, total / n, np.nan)
        return np.where(n > 1, np.sqrt(np.maximum(m2, 0.0) / (n - 1)), np.nan)


@dataclass(frozen=True)
class DocumentStats:
    """What ``observe(..., per_document=True)`` returns: the metric table of any subset of the documents.

    Attributes:
        layers: The observed MoE layers.
        n_experts: Routed experts per layer.
        routed_count: [D, L, E] int64 tokens routed to each expert in each document.
        moments: per-token criterion -> (n, total, M2), each float64 [D, L, E].
        reductions: per-token criterion -> ``mean`` / ``sum`` / ``std``.
        weight_only: weight-only criterion -> [L, E] (the same for every document set).
        columns: Metric columns in the order of ``observe``'s frame.
    """

    layers: tuple[int, ...]
    n_experts: int
    routed_count: np.ndarray
    moments: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    reductions: dict[str, str]
    weight_only: dict[str, np.ndarray]
    columns: tuple[str, ...]

    @classmethod
    def from_batches(cls, layers, n_experts: int, doc_counts: dict, doc_state: dict, weight_only: dict,
                     reductions: dict[str, str], columns: tuple[str, ...]) -> DocumentStats:
        """Stack per-batch pieces: ``doc_counts[layer]`` and ``doc_state[layer, metric]`` are lists (one entry per
        batch, in corpus order) of [B, E] counts and of (n, total, M2) triples."""
        def stack(per_layer: list[list[np.ndarray]]) -> np.ndarray:  # per layer, per batch [B, E] -> [D, L, E]
            return np.stack([np.concatenate(p, axis=0) for p in per_layer], axis=1)

        moments = {name: tuple(stack([[batch[i] for batch in doc_state[layer, name]] for layer in layers])
                               for i in range(3)) for name in reductions}
        counts = stack([doc_counts[layer] for layer in layers]).astype(np.int64)
        return cls(tuple(layers), n_experts, counts, moments, dict(reductions), weight_only, tuple(columns))

    @classmethod
    def from_observation(cls, model, layers, n_experts: int, doc_counts: dict, doc_state: dict,
                         chosen) -> DocumentStats:
        """What ``observe`` collected (``chosen``: its registered metrics), weight-only criteria evaluated once."""
        weight_only = {m.name: np.stack([weight_only_values(m, model, layer, n_experts) for layer in layers])
                       for m in chosen if m.weight_only is not None}
        return cls.from_batches(layers, n_experts, doc_counts, doc_state, weight_only,
                                {m.name: m.reduce for m in chosen if m.per_token is not None},
                                tuple(m.name for m in chosen))

    @property
    def n_documents(self) -> int:
        return int(self.routed_count.shape[0])

    def values(self, metric: str, member: np.ndarray) -> np.ndarray:
        """[S, L, E] the metric over each document set of ``member`` [S, D] (bool)."""
        member = np.atleast_2d(np.asarray(member, dtype=bool))
        if member.shape[1] != self.n_documents:
            raise ValueError(f"member has {member.shape[1]} columns; give one per document ({self.n_documents}).")
        if metric in self.weight_only:
            return np.broadcast_to(self.weight_only[metric], (member.shape[0], *self.weight_only[metric].shape))
        if metric not in self.moments:
            raise ValueError(f"metric {metric!r} was not observed; observed: {', '.join(self.columns)}.")
        return reduce_moments(*combine(*self.moments[metric], member), self.reductions[metric])

    def table(self, documents=None) -> pd.DataFrame:
        """The ``observe`` frame over ``documents`` (indices into the observed sequences; default all)."""
        member = np.zeros(self.n_documents, dtype=bool)
        member[np.arange(self.n_documents) if documents is None else np.asarray(documents, dtype=np.int64)] = True
        n_layers = len(self.layers)
        columns: dict[str, np.ndarray] = {
            "layer": np.repeat(np.asarray(self.layers, dtype=np.int64), self.n_experts),
            "expert": np.tile(np.arange(self.n_experts, dtype=np.int64), n_layers),
            "routed_count": self.routed_count[member].sum(axis=0).reshape(-1).astype(np.int64),
        }
        for name in self.columns:
            columns[name] = np.asarray(self.values(name, member[None])[0], dtype=np.float64).reshape(-1)
        return pd.DataFrame(columns)
