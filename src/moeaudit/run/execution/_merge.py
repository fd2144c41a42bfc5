"""Combining the run directories of a run's shards into one run directory (``moeaudit merge``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import RECORDS, RunDirectory, atomic_write_bytes, cell_name, config_differences


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _ShardDir:
    """One shard's directory, read once."""

    def __init__(self, path: str | Path) -> None:
        self.dir = RunDirectory(path)
        self.manifest = self.dir.manifest()
        spec = self.manifest.get("shard")
        if spec is None:
            raise RunDirectoryError(f"{self.dir.path} is not a shard (it was run without --shard i/N); merge only "
                                    "combines the shards of one run.")
        self.index, self.count = int(spec["index"]), int(spec["count"])
        self.cells = self.dir.finished_cells()

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count} ({self.dir.path})"


def _check_same(shards: list[_ShardDir]) -> None:
    """Same configuration, shard count, corpus, model, cell list and metric table in every shard."""
    first = shards[0]
    for other in shards[1:]:
        diff = config_differences(first.manifest["config"], other.manifest["config"])
        if diff:
            lines = "; ".join(f"{k}: {a!r} in {first.dir.path}, {b!r} in {other.dir.path}" for k, a, b in diff)
            raise RunDirectoryError(f"the shards were run with different configurations ({lines}); merge only "
                                    "combines shards of one run.")
        if other.count != first.count:
            raise RunDirectoryError(f"{first.label} and {other.label} split the run into different numbers of "
                                    "shards; run every shard with the same --shard i/N count.")
        for key, what in (("corpus", "corpus (its token ids' SHA-256)"), ("model", "model"),
                          ("cells", "list of cells")):
            if first.manifest.get(key) != other.manifest.get(key):
                raise RunDirectoryError(f"{first.label} and {other.label} differ in their {what}: "
                                        f"{first.manifest.get(key)!r} vs {other.manifest.get(key)!r}; the shards "
                                        "must come from the same model, corpus and configuration.")
    if first.manifest.get("corpus") is None or first.manifest.get("cells") is None:
        raise RunDirectoryError(f"{first.label} stopped before its corpus and cells were recorded; resume it with "
                                "the same command first.")
    metrics = []
    for shard in shards:
        table = shard.dir.read_parquet("metrics.parquet")
        if table is None:
            raise RunDirectoryError(f"{shard.label} has no metrics.parquet; resume it with the same command first.")
        metrics.append(table)
    for shard, table in zip(shards[1:], metrics[1:]):
        if not table.equals(metrics[0]):
            raise RunDirectoryError(f"the observe tables (metrics.parquet) of {first.label} and {shard.label} "
                                    "differ, so their positions rank experts differently; the shards must be "
                                    "computed with the same model weights, dtype and corpus.")


def _check_shard_indices(shards: list[_ShardDir]) -> None:
    by_index: dict[int, list[_ShardDir]] = defaultdict(list)
    for shard in shards:
        by_index[shard.index].append(shard)
    twice = {i: s for i, s in by_index.items() if len(s) > 1}
    if twice:
        i, dup = next(iter(twice.items()))
        raise RunDirectoryError(f"shard {i}/{dup[0].count} is given twice ({', '.join(str(s.dir.path) for s in dup)}); "
                                "pass each shard's directory once.")


def _coverage(shards: list[_ShardDir]) -> dict[str, _ShardDir]:
    """``cell name -> the shard holding it``; refuses a cell held twice, missing, or not part of the run."""
    expected = list(shards[0].manifest["cells"])
    holders: dict[str, list[_ShardDir]] = defaultdict(list)
    for shard in shards:
        for kind, layer in shard.cells:
            holders[f"L{layer}-{kind}"].append(shard)
    problems = []
    missing = [c for c in expected if not holders.get(c)]
    if missing:
        count = shards[0].count
        present = {s.index for s in shards}
        absent = [f"{i}/{count}" for i in range(count) if i not in present]
        where = [f"{s.label} is {s.manifest.get('status', '?')}" for s in shards
                 if s.manifest.get("status") != "complete"]
        hint = ("; not given: shard " + ", ".join(absent)) if absent else ""
        hint += ("; " + "; ".join(where) + " (resume it with the same command)") if where else ""
        problems.append(f"missing {', '.join(missing)}{hint}")
    duplicated = {c: s for c, s in holders.items() if len(s) > 1}
    if duplicated:
        problems.append("held twice: " + "; ".join(f"{c} (in {', '.join(str(x.dir.path) for x in s)})"
                                                   for c, s in duplicated.items()))
    extra = [c for c in holders if c not in expected]
    if extra:
        problems.append(f"not cells of this run: {', '.join(extra)}")
    if problems:
        raise RunDirectoryError("the shards do not cover every cell of the run exactly once: " + "; ".join(problems)
                                + ".")
    return {c: holders[c][0] for c in expected}


def _target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirectoryError(f"{out} already exists and is not empty; merge writes a new run directory, so choose "
                                "another --out (or delete it).")


def merge_runs(shards: list[str | Path], out: str | Path, *, report: bool = True):
    """Combine the run directories of every shard of one run into the run directory ``out``.

    The shards must share their configuration, corpus fingerprint, model, list of cells and observe table, and
    together hold every cell exactly once. ``out`` then holds the cells' record files (copied byte for byte), the
    observe table, ranking stability (computed by shard 0), shard 0's verification report, the summary, the report,
    and a manifest marked ``merged`` with every shard's sessions. Nothing is written unless every check passes,
    and ``out`` appears whole (it is assembled under a temporary name and renamed).

    Args:
        shards: The run directories of the shards (each written by ``run_audit`` with a ``Shard``).
        out: The merged run directory; must not exist yet.
        report: Write the report (``report.md``, ``report.html``, figures) of the merged run.

    Returns:
        result (RunResult): A :class:`moeaudit.run.pipeline.RunResult` (records, tables, report paths).

    Raises:
        RunDirectoryError: A directory is not a shard, the shards differ, or they do not cover every cell exactly
            once (the message names the cells missing or held twice), or ``out`` is not new.
    """
    from moeaudit.experiments import add_domain_tables, summarize, summary_settings
    from moeaudit.run._provenance import environment
    from moeaudit.run._results import RunResult, write_summary

    if not shards:
        raise RunDirectoryError("merge needs the run directories of the shards (at least one).")
    out = Path(out)
    _target(out)
    started = _now()
    parsed = sorted((_ShardDir(p) for p in shards), key=lambda s: s.index)
    _check_shard_indices(parsed)
    _check_same(parsed)
    holder = _coverage(parsed)
    first = parsed[0]
    config = first.manifest["config"]
    if "stability" in config.get("experiments", []) and (first.index != 0 or first.dir.read_parquet(
            "stability.parquet") is None):
        raise RunDirectoryError(f"ranking stability is missing: shard 0/{first.count} computes it, and "
                                f"{'it was not given' if first.index != 0 else first.label + ' has none yet'}; "
                                "resume shard 0 first.")
    failed = [s.label for s in parsed if (v := s.dir.read_json("verification.json")) and not v.get("passed")]
    if failed:
        raise RunDirectoryError(f"verification failed in {', '.join(failed)}; its data cannot be merged.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-merge-", dir=out.parent))
    try:
        staging = RunDirectory(tmp)
        for name, shard in holder.items():
            kind, layer = name.split("-")[1], int(name.split("-")[0][1:])
            source = shard.dir.path / RECORDS / cell_name(kind, layer)
            atomic_write_bytes(tmp / RECORDS / cell_name(kind, layer), source.read_bytes())
        for name in ("metrics.parquet", "stability.parquet", "verification.json", "config.toml"):
            source = next((s.dir.path / name for s in parsed if (s.dir.path / name).is_file()), None)
            if source is not None:
                atomic_write_bytes(tmp / name, source.read_bytes())
        records = staging.read_records()
        metric_table = staging.read_parquet("metrics.parquet")
        tables = summarize(records, metrics=metric_table, **summary_settings(config))
        add_domain_tables(tables, records, metric_table, first.manifest, seed=int(config.get("seed", 0)))
        write_summary(staging, tables)
        sessions = [{**session, "shard": f"{s.index}/{s.count}"} for s in parsed
                    for session in s.manifest.get("sessions", [])]
        merge_session = {"started": started, "environment": environment(), "merged": True}
        for key in ("device", "dtype"):  # what the shards computed on, for the report's provenance table
            values = sorted({str(x[key]) for x in sessions if x.get(key)})
            if values:
                merge_session[key] = ", ".join(values)
        manifest: dict[str, Any] = {key: first.manifest[key] for key in first.manifest
                                    if key not in ("shard", "sessions", "status", "created")}
        manifest.update(status="complete", created=started, sessions=[*sessions, merge_session], merged={
            "count": first.count,
            "shards": [{"shard": f"{s.index}/{s.count}", "directory": str(s.dir.path.resolve()),
                        "created": s.manifest.get("created"), "status": s.manifest.get("status"),
                        "cells": sorted(n for n, h in holder.items() if h is s)} for s in parsed]})
        merge_session["ended"] = _now()
        staging.write_manifest(manifest)
        _target(out)
        if out.is_dir():
            out.rmdir()  # empty (checked): let the rename put the whole directory in its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = RunResult(out, records, tables)
    if report:
        from moeaudit.report import write_report

        result.report = write_report([out], out)
    return result
