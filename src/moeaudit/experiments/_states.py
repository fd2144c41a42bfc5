"""Clean passes shared by every cell of a run: one clean forward per sequence serves every layer and experiment.

Each (layer, kind) cell of a run walks its own seeded sample of positions over the corpus and needs the clean
pass (:class:`~moeaudit.intervene.SequenceAblator`) of every sequence it touches. :class:`CleanStates` computes a
sequence's clean pass once, capturing every MoE layer the run audits, and keeps it for the cells that follow,
within a byte budget.

**Memory policy.** A clean pass holds every decoder layer's output, every layer's keys and values and the routing
of the audited layers: ``n_layers * T * (d_model + 2 * kv_width)`` values plus a little, about 230 MB for a
512-token sequence of OLMoE-1B-7B in float32. States are kept in the order they are computed while they fit in
the budget; once it is full, later sequences are computed, used and dropped, and nothing kept is ever evicted.
Every cell scans the corpus in the same order, and for such a cyclic scan over N sequences with room for K, least
recently used eviction would miss on every access (each state is evicted just before it is needed again), while
pinning the first K that fit hits K of N in every later cell, which is the most any policy achieves on a cyclic
scan (Belady's optimal policy also keeps a fixed set). The first sequences are also the ones both kinds of cell
use (the progressive ablation's documents start with the single-expert ones). The default budget is half the free
memory of the model's device (CUDA: ``torch.cuda.mem_get_info``; CPU: the host's available RAM) when the cache is
created, leaving the rest to the engine's batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeaudit.intervene import SequenceAblator, free_memory_bytes
from moeaudit.models import describe
from moeaudit.models._describe import model_device

#: Share of the free memory the clean-state cache may fill by default.
DEFAULT_BUDGET_FRACTION = 0.5


def sequence_ids(sequences: Sequence) -> list[torch.Tensor]:
    """Token ids of ``CorpusSequence`` objects or 1-D tensors, as int64 tensors."""
    return [torch.as_tensor(getattr(s, "input_ids", s)).long() for s in sequences]


def default_budget(device: torch.device) -> int:
    """The default cache budget: :data:`DEFAULT_BUDGET_FRACTION` of the device's free memory
    (:func:`moeaudit.intervene.free_memory_bytes`, the same reading that sizes the engine's batches)."""
    return int(free_memory_bytes(device) * DEFAULT_BUDGET_FRACTION)


class CleanStates:
    """The clean passes of a run's sequences, keyed by sequence index (see the module docstring).

    Args:
        model: The model every cell ablates.
        sequences: The run's sequences; cells index into prefixes of this list.
        layers: Every MoE layer the run audits (each clean pass captures their routing).
        budget_bytes: Bytes of clean states to keep (``None``: :func:`default_budget`; ``0``: keep none, so every
            request runs a clean pass, as each cell did on its own before).

    Attributes:
        clean_passes: Clean forwards run so far.
        reused: Requests served from a kept state.
        used_bytes: Bytes of the kept states.
    """

    def __init__(self, model: nn.Module, sequences: Sequence, *, layers: Sequence[int],
                 budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes}: give a number of bytes >= 0 (0 keeps no clean state), "
                             "or None for the default.")
        self.model = model
        self.ids = sequence_ids(sequences)
        self.layers = sorted({int(layer) for layer in layers})
        moe = set(describe(model).moe_layers)
        bad = [layer for layer in self.layers if layer not in moe]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers of this model; MoE layers: {sorted(moe)}.")
        self.budget_bytes = default_budget(model_device(model)) if budget_bytes is None else int(budget_bytes)
        self._kept: dict[int, SequenceAblator] = {}
        self.clean_passes = 0
        self.reused = 0
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kept(self) -> int:
        """Number of sequences whose clean state is kept."""
        return len(self._kept)

    def check_sequences(self, ids_list: Sequence[torch.Tensor]) -> None:
        """Refuse sequences that are not a prefix of the run's (a cell's ``seq_id`` must mean the same sequence)."""
        same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(ids_list, self.ids))
        if len(ids_list) > len(self.ids) or not same:
            raise ValueError("the sequences passed to the cell are not a prefix of the sequences the clean states "
                             "were built for; build CleanStates over the run's whole sequence list.")

    def ablator(self, seq_id: int) -> SequenceAblator:
        """The :class:`SequenceAblator` of sequence ``seq_id`` (its clean pass computed now, or kept from before)."""
        kept = self._kept.get(seq_id)
        if kept is not None:
            self.reused += 1
            return kept
        ablator = SequenceAblator(self.model, self.ids[seq_id], layers=self.layers)
        self.clean_passes += 1
        if self.budget_bytes > 0:
            size = ablator.state.nbytes
            if self.used_bytes + size <= self.budget_bytes:
                self._kept[seq_id] = ablator
                self.used_bytes += size
        return ablator

    def stats(self) -> dict[str, int]:
        """Counters for the run's manifest."""
        return {"clean_passes": self.clean_passes, "reused": self.reused, "kept": self.kept,
                "kept_bytes": self.used_bytes, "budget_bytes": self.budget_bytes}
