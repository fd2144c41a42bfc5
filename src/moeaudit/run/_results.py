"""What an audit run produced (:class:`RunResult`) and the summary files written from its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moeaudit.rundir import RunDirectory

if TYPE_CHECKING:  # pandas loads on first use: refusals before any work stay fast
    import pandas as pd


@dataclass
class RunResult:
    """What :func:`moeaudit.run_audit` (or :func:`moeaudit.merge_runs`) produced."""

    directory: Path
    records: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    resumed_cells: list[str] = field(default_factory=list)
    computed_cells: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)
    #: ``{"single": {"requested", "available", "n"}, "progressive": {...}}``: positions asked for, valid in the
    #: corpus, and used (fewer than asked only with ``allow_fewer``).
    positions: dict[str, dict[str, int]] = field(default_factory=dict)



def write_summary(run_dir: RunDirectory, tables: dict[str, pd.DataFrame]) -> None:
    """``summary.json`` (every table), ``summary.csv`` (every cell, long format) and ``tables/<name>.csv``."""
    import json

    import pandas as pd

    parts = []
    for name, table in tables.items():
        if table is not None and len(table):
            run_dir.write_text(f"tables/{name}.csv", table.to_csv(index=False))
            parts.append(table.assign(table=name))
    long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["table"])
    long = long[["table", *[c for c in long.columns if c != "table"]]]
    run_dir.write_text("summary.csv", long.to_csv(index=False))
    payload = {name: json.loads(t.to_json(orient="records")) if t is not None and len(t) else []
               for name, t in tables.items()}
    run_dir.write_json("summary.json", payload)
