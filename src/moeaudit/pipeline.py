"""A whole audit run into a run directory: load, verify, observe, collect every cell, summarise, report.

Each cell (one layer's single-expert pool, or one layer's progressive ablation) is written as soon as it finishes,
so a run interrupted at any moment (Ctrl-C, ``kill -9``, a preempted node) and started again with the same
configuration reads the finished cells back and computes only the rest; the records and the summary then equal
those of an uninterrupted run. See :mod:`moeaudit.rundir` for the directory layout.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from moeaudit.config import BEFORE_KEY_EXISTED, RunConfig
from moeaudit.errors import ConfigError, CorpusError, RunDirectoryError, UnsupportedModelError, did_you_mean
from moeaudit.execution import Execution, check_executor, check_shard
from moeaudit.rundir import FORMAT_VERSION, RunDirectory


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


@dataclass
class RunResult:
    """What :func:`run_audit` produced."""

    directory: Path
    records: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    resumed_cells: list[str] = field(default_factory=list)
    computed_cells: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions of python, torch, transformers and moeaudit, the git revision and the host."""
    import torch
    import transformers

    from moeaudit import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "moeaudit": __version__, "git_revision": _git_revision(),
            "platform": platform.platform(), "host": platform.node(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, ``mps`` on Apple silicon, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def corpus_fingerprint(sequences) -> str:
    """SHA-256 over the token ids of every sequence (detects a corpus that changed between sessions)."""
    h = hashlib.sha256()
    for s in sequences:
        ids = s.input_ids.numpy().astype("<i8")
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
    return h.hexdigest()


def check_metrics(metrics: tuple[str, ...]) -> None:
    """Refuse metric names the observe table will not have, before any model is loaded."""
    from moeaudit._observe import METRICS

    valid = list(METRICS)
    for m in metrics:
        if m not in valid:
            raise ConfigError(f"metrics: {m!r} is not an observational metric; valid: {', '.join(valid)}."
                              f"{did_you_mean(m, valid)}")


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


def run_audit(config: RunConfig, out: str | Path, *, progress: ProgressSink | None = None,
              report: bool = True, on_cell: Callable[[str, int], None] | None = None,
              execution: Execution | None = None) -> RunResult:
    """Run (or resume) the audit described by ``config`` into the directory ``out``.

    Args:
        config: The run's configuration (:class:`moeaudit.config.RunConfig`).
        out: The run directory; created when missing. A directory holding the same configuration resumes; one
            holding another configuration is refused.
        progress: Receives stages and progress (see :class:`ProgressSink`).
        report: Write ``report.md`` / ``report.html`` / ``figures/`` at the end (not for a shard: merge the
            shards with :func:`moeaudit.merge_runs`, which writes the report).
        on_cell: Called with ``(kind, layer)`` after each newly computed cell is on disk.
        execution: Where and which cells are computed: executor (local or Ray), shard, clean-pass cache
            (:class:`moeaudit.Execution`; default: every cell in this process).

    Returns:
        The records, the summary tables and which cells were resumed or computed.

    Raises:
        RunDirectoryError: ``out`` holds another run, or is in use.
        VerificationError: The verification suite failed; no data was collected.
    """
    progress = progress or SilentProgress()
    execution = execution or Execution()
    check_metrics(config.metrics)
    check_executor(execution)
    run_dir = RunDirectory(out)
    timer = StageTimer()
    session: dict[str, Any] = {"started": _now(), "environment": environment()}
    fresh = not run_dir.path.exists()
    try:
        return _run_locked(config, run_dir, session, timer, progress, report, on_cell, execution)
    except (ConfigError, UnsupportedModelError, CorpusError, OSError):
        # Bad input found before any data: leave no half-made directory behind.
        if fresh and run_dir.path.is_dir() and not run_dir.finished_cells():
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise


@dataclass
class Session:
    """One session in a run directory (see :func:`run_session`): its manifest, its entry in the manifest's
    ``sessions``, its stage timer and whether it resumed an existing run."""

    run_dir: RunDirectory
    manifest: dict[str, Any]
    entry: dict[str, Any]
    timer: StageTimer
    resumed: bool

    def write(self) -> None:
        """Record the session's timings so far and write the manifest."""
        self.entry.update(ended=_now(), stages=self.timer.stages)
        self.run_dir.write_manifest(self.manifest)

    def complete(self, **details: Any) -> None:
        """Mark the run complete (before writing its report, so the report shows a finished run)."""
        self.entry.update(details)
        self.manifest["status"] = "complete"
        self.write()


@contextmanager
def run_session(run_dir: RunDirectory, config: dict[str, Any], config_toml: str, *, entry: dict[str, Any],
                timer: StageTimer, progress: ProgressSink, tool: str = "moeaudit",
                extra: dict[str, Any] | None = None,
                check: Callable[[dict[str, Any]], None] | None = None,
                defaults: dict[str, Any] | None = None) -> Iterator[Session]:
    """Hold ``run_dir``'s lock, bind it to ``config`` (create it, or resume the same configuration), and record
    the session in the manifest; a failure or an interruption marks the run ``failed`` / ``interrupted``.
    ``extra`` keys go into a new run's manifest (e.g. a shard's spec); ``check`` sees the manifest before this
    session writes anything and refuses by raising (e.g. resuming a shard as another one). A key the stored
    configuration lacks (written by an older version) counts as its value in ``defaults``.

    Raises:
        RunDirectoryError: ``run_dir`` holds another configuration, or is in use.
    """
    with run_dir.lock():
        run_dir.remove_stale_temporaries()
        new_manifest = {"format_version": FORMAT_VERSION, "tool": tool, "config": config, "status": "running",
                        "created": entry["started"], "sessions": [], **(extra or {})}
        manifest, resumed = run_dir.claim(config, new_manifest, defaults=defaults)
        if check is not None:
            check(manifest)
        if not (run_dir.path / "config.toml").is_file():
            run_dir.write_text("config.toml", config_toml)
        manifest["status"] = "running"
        manifest["sessions"].append(entry)
        run_dir.write_manifest(manifest)
        if resumed:
            progress.message(f"resuming the run in {run_dir.path}")
        session = Session(run_dir, manifest, entry, timer, resumed)
        try:
            yield session
        except BaseException as exc:
            entry.update(ended=_now(), stages=timer.stages, error=f"{type(exc).__name__}: {exc}")
            if manifest["status"] != "complete":
                manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            run_dir.write_manifest(manifest)
            raise


def _run_locked(config: RunConfig, run_dir: RunDirectory, session: dict, timer: StageTimer,
                progress: ProgressSink, report: bool, on_cell, execution: Execution) -> RunResult:
    shard = execution.shard
    with run_session(run_dir, config.to_dict(), config.to_toml(), entry=session, timer=timer, progress=progress,
                     extra=None if shard is None else {"shard": shard.to_dict()},
                     check=lambda manifest: check_shard(manifest, shard, run_dir.path),
                     defaults={**RunConfig().to_dict(), **BEFORE_KEY_EXISTED}) as s:
        result = _execute(config, run_dir, s.manifest, session, timer, progress, on_cell, execution)
        s.complete(resumed_cells=result.resumed_cells, computed_cells=result.computed_cells)
        if shard is not None:
            progress.message(f"shard {shard} done; when every shard is, combine them with "
                             "`moeaudit merge SHARD_DIR... --out DIR` (it writes the report)")
        elif report:  # after the manifest is final, so the report shows the finished run
            from moeaudit.report import write_report

            progress.stage("writing the report", None)
            with timer("report"):
                result.report = write_report([run_dir.path], run_dir.path)
            s.write()
    return result


def _load(config: RunConfig, run_dir: RunDirectory, manifest: dict, session: dict, timer: StageTimer,
          progress: ProgressSink):
    from moeaudit.corpus import load_corpus
    from moeaudit.models import describe, load_model

    device = resolve_device(config.device)
    progress.stage(f"loading {config.model}", None)
    with timer("load_model"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device,
                                      trust_remote_code=config.trust_remote_code, device_map=config.device_map)
    desc = describe(model)
    placement = getattr(model, "hf_device_map", None) if config.device_map else None
    session.update(device=device if placement is None else f"device_map={config.device_map}",
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    if placement is not None:
        session["device_map"] = {k: str(v) for k, v in placement.items()}
    manifest["model"] = {"family": desc.family, "n_layers": desc.n_layers, "moe_layers": list(desc.moe_layers),
                         "n_experts": desc.n_experts, "top_k": desc.top_k,
                         "revision": getattr(model.config, "_commit_hash", None)}
    n_docs = max(config.n_docs, config.n_docs_progressive if "progressive" in config.experiments else 0)
    progress.stage(f"tokenising {config.corpus}", None)
    with timer("load_corpus"):
        sequences = load_corpus(config.corpus, tokenizer, n_samples=n_docs, max_length=config.max_length,
                                min_length=config.min_length, text_field=config.text_field)
    fingerprint = corpus_fingerprint(sequences)
    stored = manifest.get("corpus", {}).get("sha256")
    if stored is not None and stored != fingerprint:
        raise RunDirectoryError(f"the corpus {config.corpus!r} tokenises differently from when {run_dir.path} was "
                                "started (its contents or the tokenizer changed); the stored cells would not match "
                                "new ones. Run into a new directory.")
    manifest["corpus"] = {"source": config.corpus, "n_sequences": len(sequences), "sha256": fingerprint,
                          "n_tokens": int(sum(len(s) for s in sequences))}
    run_dir.write_manifest(manifest)
    return model, tokenizer, sequences


def _execute(config: RunConfig, run_dir: RunDirectory, manifest: dict, session: dict, timer: StageTimer,
             progress: ProgressSink, on_cell, execution: Execution) -> RunResult:
    from moeaudit._observe import observe
    from moeaudit._verify import verify
    from moeaudit.execution import CellJob, CellResult, canonical_cells, make_executor, release_device_memory
    from moeaudit.experiments import ExperimentSettings, summarize, summary_settings
    from moeaudit.experiments._stability import is_current, ranking_stability
    from moeaudit.experiments._states import sequence_ids

    model, tokenizer, sequences = _load(config, run_dir, manifest, session, timer, progress)
    single_seqs = sequences[: config.n_docs]
    settings = ExperimentSettings(layers=config.layers, metrics=config.metrics, n=config.n,
                                  n_progressive=config.n_progressive, progressive_arms=config.progressive_arms,
                                  seed=config.seed, scope=config.scope,
                                  mode=config.mode, min_context=config.min_context, model_name=config.label)

    metric_table = run_dir.read_parquet("metrics.parquet")
    if metric_table is None:
        progress.stage("observing expert metrics", len(single_seqs))
        with timer("observe"):
            metric_table = observe(model, [s.input_ids for s in single_seqs], progress=progress.advance)
        run_dir.write_parquet("metrics.parquet", metric_table)
    layers = settings.check(model, metric_table)

    single = tuple(e for e in config.ablation_experiments if e != "progressive")
    cells = canonical_cells(layers, single=bool(single), progressive="progressive" in config.experiments)
    manifest["cells"] = [c.name for c in cells]
    mine = cells if execution.shard is None else execution.shard.select(cells)
    if not mine:
        progress.message(f"shard {execution.shard} holds no cell: the run has {len(cells)} cells, fewer than "
                         f"{execution.shard.count} shards")
    done = run_dir.finished_cells()
    pending = [c for c in mine if c.key not in done]
    resumed = [c.name for c in mine if c.key in done]

    if pending:
        progress.stage("verifying the ablation engine", None)
        with timer("verification"):
            verification = verify(model, tokenizer, single_seqs[:2], seed=config.seed, modes=(config.mode,))
        run_dir.write_json("verification.json", verification.to_dict())
        session["verification_passed"] = verification.passed
        verification.raise_if_failed()

    # Ranking stability is observational and deterministic: one shard (index 0) computes it for the merge.
    stability_here = execution.shard is None or execution.shard.index == 0
    if "stability" in config.experiments and stability_here and not is_current(run_dir.read_parquet(
            "stability.parquet")):
        progress.stage("ranking stability (random corpus halves)", None)
        with timer("stability"):
            stability = ranking_stability(model, single_seqs, metrics=config.metrics, layers=list(layers),
                                          seed=config.seed)
        run_dir.write_parquet("stability.parquet", stability)

    job = CellJob(settings=settings, single_experiments=single, metric_table=metric_table,
                  sequences=tuple(sequence_ids(sequences)), n_docs=config.n_docs,
                  n_docs_progressive=config.n_docs_progressive if "progressive" in config.experiments else 0,
                  layers=tuple(layers))
    progress.stage(f"ablating ({len(pending)} cells to go, {len(resumed)} resumed)",
                   sum(job.positions(c) for c in pending))
    computed: list[str] = []

    def write(result: CellResult) -> None:  # as each cell arrives, from whichever worker computed it
        run_dir.write_cell(result.cell.kind, result.cell.layer, result.frame)
        timer.stages[f"cell {result.cell.name}"] = round(result.seconds, 3)
        computed.append(result.cell.name)
        if on_cell is not None:
            on_cell(result.cell.kind, result.cell.layer)

    if pending:
        executor = make_executor(execution, config=config, model=model)
        if execution.executor != "local":  # the workers load their own model: free the driver's device for them
            model = None
            release_device_memory()
        session["execution"] = execution.describe()
        session["execution"].update(executor.run(job, pending, write, progress.advance))

    progress.stage("summarising", None)
    with timer("summary"):
        records = run_dir.read_records()
        tables = summarize(records, metrics=metric_table, **summary_settings(config.to_dict()))
        write_summary(run_dir, tables)
    return RunResult(run_dir.path, records, tables, resumed, computed)


def write_summary(run_dir: RunDirectory, tables: dict[str, pd.DataFrame]) -> None:
    """``summary.json`` (every table), ``summary.csv`` (every cell, long format) and ``tables/<name>.csv``."""
    import json

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
