"""What a run reports while it works (a :class:`ProgressSink`; the CLI draws rich progress bars from it) and the
wall-clock seconds it spends per stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressSink(Protocol):
    """What the pipeline reports to (the CLI draws rich progress bars from it)."""

    def stage(self, name: str, total: int | None) -> None:
        """A new stage starts; ``total`` units of work (``None``: unknown)."""

    def advance(self, n: int) -> None:
        """``n`` more units of the current stage are done."""

    def message(self, text: str) -> None:
        """A line worth showing the user."""


class SilentProgress:
    """A :class:`ProgressSink` that shows nothing (the library default)."""

    def stage(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class StageTimer:
    """Accumulates wall-clock seconds per named stage (``with timer("observe"): ...``)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 3)
