"""``moeaudit merge``: the shards of one run (``moeaudit run --shard i/N``) combined into one run directory."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moeaudit.cli._app import app
from moeaudit.cli._common import expected_errors, fail, make_console


@app.command()
def merge(shards: list[Path] = typer.Argument(..., help="the run directories of every shard (any order)"),
          out: Path = typer.Option(..., help="the merged run directory (must be new or empty)"),
          report: bool = typer.Option(True, help="write report.md / report.html / figures")) -> None:
    """Combine the shards of one run into one run directory, then write its summary and report.

    Refused unless the shards share configuration, corpus, model and observe table, and together hold every cell
    exactly once (the message names what is missing or duplicated)."""
    from moeaudit.run.execution import merge_runs
    from moeaudit.rundir import RunDirectory

    console = make_console()
    start = time.perf_counter()
    try:
        result = merge_runs(shards, out, report=report)
    except expected_errors() as exc:
        raise fail(exc) from None
    n_cells = len(RunDirectory(result.directory).finished_cells())
    console.print(f"merged {len(shards)} shards: {n_cells} cells, {len(result.records):,} ablation records in "
                  f"{time.perf_counter() - start:.1f} s -> {out}")
    if result.report:
        console.print(f"report: {result.report['html']}")
