"""The seam between a run and where its cells are computed: the job every executor gets, and the local executor."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from moeaudit.run.execution._spec import Cell

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class CellJob:
    """What computing any cell of a run needs, besides the model.

    Attributes:
        settings: The :class:`moeaudit.ExperimentSettings` of the run.
        single_experiments: The single-expert experiments the single cells record (audit, control, ...).
        metric_table: The observe table ranking the experts.
        sequences: [T_i] int64 token ids of every sequence the run loaded.
        n_docs: The single-expert cells use ``sequences[:n_docs]``.
        n_docs_progressive: The progressive cells use ``sequences[:n_docs_progressive]`` (both are prefixes, so a
            clean pass serves both).
        layers: Every layer the run audits (what each clean pass captures).
    """

    settings: Any
    single_experiments: tuple[str, ...]
    metric_table: pd.DataFrame | None
    sequences: tuple[torch.Tensor, ...]
    n_docs: int
    n_docs_progressive: int
    layers: tuple[int, ...]

    def positions(self, cell: Cell) -> int:
        """Positions the cell samples (its share of the progress bar)."""
        return self.settings.n if cell.kind == "single" else self.settings.n_progressive


@dataclass(frozen=True)
class CellResult:
    """One computed cell: its records and the seconds its worker spent on it."""

    cell: Cell
    frame: pd.DataFrame
    seconds: float


OnResult = Callable[[CellResult], None]


class CellExecutor(Protocol):
    """Computes cells and hands each result to ``on_result`` as it finishes (the caller writes it to disk)."""

    def run(self, job: CellJob, cells: Sequence[Cell], on_result: OnResult,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Compute ``cells``; return what the manifest should record about the execution."""


def compute_cell(model: nn.Module, job: CellJob, states, cell: Cell,
                 progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The records of one cell (``states``: the worker's :class:`moeaudit.experiments.CleanStates`)."""
    from moeaudit.experiments._run import collect_progressive, collect_single

    if cell.kind == "single":
        return collect_single(model, job.sequences[: job.n_docs], job.metric_table, job.settings, cell.layer,
                              experiments=job.single_experiments, progress=progress, states=states)
    return collect_progressive(model, job.sequences[: job.n_docs_progressive], job.settings, cell.layer,
                               progress=progress, states=states)


class LocalExecutor:
    """Every cell in this process, in order, one clean pass per sequence shared by all of them."""

    def __init__(self, model: nn.Module, *, clean_cache_bytes: int | None = None,
                 before_cell: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.clean_cache_bytes = clean_cache_bytes
        self.before_cell = before_cell

    def run(self, job: CellJob, cells: Sequence[Cell], on_result: OnResult,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        from moeaudit.experiments._states import CleanStates

        states = CleanStates(self.model, job.sequences, layers=job.layers, budget_bytes=self.clean_cache_bytes)
        for cell in cells:
            if self.before_cell is not None:
                self.before_cell(cell.name)
            start = time.perf_counter()
            frame = compute_cell(self.model, job, states, cell, progress)
            on_result(CellResult(cell, frame, time.perf_counter() - start))
        return {"executor": "local", "clean_states": states.stats()}
