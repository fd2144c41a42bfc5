"""What every command shares: consoles, the one-line error exit, tables and the rich progress sink."""

from __future__ import annotations

import time

import typer


def make_console(stderr: bool = False):
    from rich.console import Console

    quiet_transformers()

    return Console(stderr=stderr)


def quiet_transformers() -> None:
    """transformers' own per-file loading bars would interleave with ours."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as one line and return the exit to raise; ``MOEAUDIT_DEBUG=1`` re-raises with the traceback."""
    import os

    from moeaudit.errors import VerificationError

    if os.environ.get("MOEAUDIT_DEBUG"):
        raise exc

    make_console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True)
    return typer.Exit(1 if isinstance(exc, VerificationError) else 2)


def expected_errors() -> tuple[type[BaseException], ...]:
    from moeaudit.errors import MoEAuditError

    return (MoEAuditError, ValueError, FileNotFoundError, OSError)


def build_config(cls, config: str | None, flags: dict):
    """A config of class ``cls`` from an optional TOML file or preset name and the flags given (``None``: unset),
    in the documented precedence (defaults, preset or file, flags); errors exit with one clear line."""
    flags = {k: v for k, v in flags.items() if v is not None}
    try:
        if config is None:
            return cls.from_mapping(flags, source="flags")
        if config in cls._PRESETS:
            return cls.from_mapping({"preset": config, **flags}, source="flags")
        return cls.from_toml(config).replace(**flags) if flags else cls.from_toml(config)
    except expected_errors() as exc:
        raise fail(exc) from None


def rich_table(title: str, frame, columns: list[str] | None = None):
    from rich.table import Table

    table = Table(title=title)
    frame = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    for col in frame.columns:
        table.add_column(str(col))
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


class RichProgress:
    """A :class:`moeaudit.pipeline.ProgressSink` drawing one rich progress bar (with ETA) per stage."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = None
        self.started = time.perf_counter()

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        self.bar.stop()

    def _finish(self) -> None:
        if self.task is not None:
            task = self.bar.tasks[-1]
            self.bar.update(self.task, total=task.total if task.total is not None else 1,
                            completed=task.total if task.total is not None else 1)

    def stage(self, name: str, total: int | None) -> None:
        self._finish()
        self.task = self.bar.add_task(name, total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def message(self, text: str) -> None:
        self.console.print(text)


