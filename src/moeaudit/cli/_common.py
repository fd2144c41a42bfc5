"""What every command shares: consoles, the one-line error exit, flag names in messages, tables, spinners and the
rich progress sink.

Everything user-provided (paths, model names, labels, messages that quote them) is printed escaped, never parsed
as rich markup: a path holding ``[/x]`` or ``[red]`` prints as written.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import typer

_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def make_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def escape(text: object) -> str:
    """``text`` with rich markup escaped (printed as written)."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def quiet_transformers() -> None:
    """transformers' own "Loading weights" bar would interleave with ours (call once transformers is imported or
    about to be: it imports transformers)."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def flag_names(*keywords: str, **aliases: str) -> dict[str, str]:
    """``keyword -> --flag`` for a command's options (``text_field`` -> ``--text-field``); ``aliases`` map a
    library keyword to a differently named flag (``n_samples="--n"``)."""
    return {**{k: "--" + k.replace("_", "-") for k in keywords}, **aliases}


def cli_message(text: str, flags: Mapping[str, str]) -> str:
    """Rewrite a library message's keyword references (see :mod:`moeaudit.errors`) into the command's flags:
    ``text_field=`` -> ``--text-field``, ``seed=-1`` -> ``--seed=-1``, ``allow_fewer=True`` -> ``--allow-fewer``;
    quoted values (paths, names) are left as they are."""
    if not flags:
        return text
    names = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))
    keyword = re.compile(rf"(?<![\w.-])({names})=(True\b|False\b)?")

    def swap(m: re.Match) -> str:
        flag = flags[m.group(1)]
        if m.group(2) == "True":
            return flag
        if m.group(2) == "False":
            return "--no-" + flag.removeprefix("--")
        rest = text[m.end():]  # m matched on ``text`` itself: a quoted value right after "=" is a value
        return flag if not rest or rest[0].isspace() or rest[0] in ",;.)" else flag + "="

    quoted = [(q.start(), q.end()) for q in _QUOTED.finditer(text)]
    out, last = [], 0
    for m in keyword.finditer(text):
        if any(a <= m.start() < b for a, b in quoted):
            continue
        out += [text[last:m.start()], swap(m)]
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def one_line(text: str) -> str:
    """``text`` on one line (messages quoting other libraries' errors can hold line breaks)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(exc: Exception, flags: Mapping[str, str] | None = None) -> typer.Exit:
    """Print ``exc`` as one line on stderr (keyword references as ``flags``) and return the exit to raise;
    ``MOEAUDIT_DEBUG=1`` re-raises it with the traceback."""
    import os

    from moeaudit.errors import ConfigError, VerificationError

    if os.environ.get("MOEAUDIT_DEBUG"):
        raise exc
    text = str(exc) or type(exc).__name__
    if not (isinstance(exc, ConfigError) and exc.source not in (None, "config", "flags")):  # a file's own keys
        text = cli_message(text, flags or {})
    make_console(stderr=True).print(f"[bold red]error:[/bold red] {escape(one_line(text))}", highlight=False,
                                    soft_wrap=True)
    return typer.Exit(1 if isinstance(exc, VerificationError) else 2)


def interrupted(exc: KeyboardInterrupt, out, what: str = "cells") -> typer.Exit:
    """Say that a run stopped (Ctrl-C, or SIGTERM raised as :class:`moeaudit.run._interrupt.Terminated`) and how to
    resume it; return the exit to raise (130, or 128 + the signal)."""
    signum = getattr(exc, "signum", None)
    make_console(stderr=True).print(f"{'terminated (SIGTERM)' if signum else 'interrupted'}; finished {what} are "
                                    f"kept in {escape(out)}. Run the same command again to resume.",
                                    highlight=False, soft_wrap=True)
    return typer.Exit(128 + signum if signum else 130)


def header(console, text: str) -> None:
    """The first lines of a command that computes: ``text`` (rich markup; escape what the user gave), then the
    torch threads it computes with, chosen here (before torch is imported) when the user has not
    (:mod:`moeaudit.run._threads`)."""
    from moeaudit.run._threads import apply_threads

    choice = apply_threads()
    console.print(text, highlight=False)
    console.print(f"  {escape(choice.describe())}", highlight=False)


def dry_run_exit(console, command: str, cfg, out, workload, flags: Mapping[str, str] | None = None, *,
                 trust_remote_code: bool = False, report: bool = True) -> typer.Exit:
    """``--dry-run`` of any command: print the plan and the estimates (:func:`moeaudit.run.estimate.dry_run`), write
    them to ``out/dry-run.json`` (nothing else), and return the exit to raise. ``workload(cfg, geometry)`` counts
    the command's work (:mod:`moeaudit.run._workloads`); ``cfg`` needs ``model``, ``device``, ``dtype``,
    ``max_length`` and ``label``."""
    from pathlib import Path

    from moeaudit.run._preflight import check_device, resolve_device
    from moeaudit.run.estimate import dry_run, write_dry_run

    try:
        device = check_device(resolve_device(cfg.device))
        with status(console, f"dry run of {command}: reading the model's geometry and timing a reduced copy"):
            result = dry_run(lambda geometry: workload(cfg, geometry), model=cfg.model, device=device,
                             dtype=cfg.dtype, seq_len=cfg.max_length, trust_remote_code=trust_remote_code,
                             label=cfg.label, n_boot=getattr(cfg, "n_boot", 2000), report=report)
        path = write_dry_run(result, Path(out) / "dry-run.json")
    except expected_errors() as exc:
        raise fail(exc, flags) from None
    for line in result.lines():
        console.print(escape(line), highlight=False)
    console.print(f"dry run: nothing computed; plan and estimates in {escape(path)}", highlight=False)
    return typer.Exit(0)


def expected_errors() -> tuple[type[BaseException], ...]:
    from moeaudit.errors import MoEAuditError

    return (MoEAuditError, ValueError, OSError)


@contextmanager
def status(console, text: str) -> Iterator[None]:
    """A spinner with ``text`` (escaped) while a step without countable work runs (loading, checking)."""
    with console.status(escape(text)):
        yield


def build_config(cls, config: str | None, flags: dict, names: Mapping[str, str] | None = None):
    """A config of class ``cls`` from an optional TOML file or preset name and the flags given (``None``: unset),
    in the documented precedence (defaults, preset or file, flags); errors exit with one clear line (keyword
    references rewritten to the command's flags ``names``, except for a file's own keys)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    try:
        if config is None:
            return cls.from_mapping(flags, source="flags")
        if config in cls._PRESETS:
            return cls.from_mapping({"preset": config, **flags}, source="flags")
        return cls.from_mapping(flags, base=cls.from_toml(config), source="flags")
    except expected_errors() as exc:
        raise fail(exc, names) from None


def rich_table(title: str, frame, columns: list[str] | None = None):
    """A rich table of ``frame`` (``title`` and cells escaped; floats to 4 significant digits). On a narrow
    console a long label or value folds onto a second line, never cut to an ellipsis, so two names that share a
    prefix (``activation_norm``, ``activation_std``) never print alike."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=escape(title))
    frame = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    for col in frame.columns:
        words = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in frame[col]]
        longest = max(map(len, words), default=0)  # short values (a decision, a number) keep one line
        table.add_column(Text(str(col), overflow="fold"), overflow="fold",
                         min_width=longest if longest <= 12 else None)
    for row in frame.itertuples(index=False):
        table.add_row(*[Text(f"{v:.4g}" if isinstance(v, float) else str(v), overflow="fold") for v in row])
    return table


class RichProgress:
    """A :class:`moeaudit.run.pipeline.ProgressSink` drawing one rich progress bar (with ETA) per stage.

    A stage ends where its work ended: a bar whose stage ran fewer units than announced keeps its count (it never
    claims 500/500 when 262 ran); stages without a count show as done.
    """

    def __init__(self, console, flags: Mapping[str, str] | None = None) -> None:
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
        self.flags = flags or {}
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                            MofNCompleteColumn(),
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
        if self.task is not None and self.bar.tasks[-1].total is None:
            self.bar.update(self.task, total=1, completed=1)

    def stage(self, name: str, total: int | None) -> None:
        if "transformers" in sys.modules:  # imported by now when a model is about to load
            quiet_transformers()
        self._finish()
        self.task = self.bar.add_task(escape(name), total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def message(self, text: str) -> None:
        self.console.print(escape(cli_message(text, self.flags)), highlight=False)
