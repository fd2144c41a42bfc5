"""A whole audit run into a run directory: load, verify, observe, collect every cell, summarise, report.

Each cell (one layer's single-expert pool, or one layer's progressive ablation) is written as soon as it finishes,
so a run interrupted at any moment (Ctrl-C, SIGTERM, ``kill -9``, a preempted node) and started again with the
same configuration and model reads the finished cells back and computes only the rest; the records and the summary
then equal those of an uninterrupted run. See :mod:`moeaudit.rundir` for the directory layout and
:mod:`moeaudit.run._preflight` for what is refused before any work.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeaudit.config import BEFORE_KEY_EXISTED, SUMMARY_KEYS, RunConfig
from moeaudit.errors import ConfigError, CorpusError, RunDirectoryError, UnsupportedModelError
from moeaudit.models._checkpoint import identity_changes, manifest_identity
from moeaudit.run._interrupt import sigterm_as_interrupt
from moeaudit.run._preflight import (
    Preflight,
    check_device,
    check_identity,
    check_metrics,
    preflight,
    resolve_device,
)
from moeaudit.run._prepare import RunOptions, load_for_run
from moeaudit.run._progress import ProgressSink as ProgressSink  # re-exported: the pipeline's progress protocol
from moeaudit.run._progress import SilentProgress as SilentProgress
from moeaudit.run._progress import StageTimer as StageTimer
from moeaudit.run._provenance import corpus_fingerprint as corpus_fingerprint  # re-exported (pruning uses it)
from moeaudit.run._provenance import environment, now
from moeaudit.run._results import RunResult as RunResult  # re-exported: what run_audit returns
from moeaudit.run._results import write_summary as write_summary
from moeaudit.run.execution import Execution, check_executor, check_shard
from moeaudit.rundir import FORMAT_VERSION, RunDirectory, config_differences

if TYPE_CHECKING:  # pandas loads on first use: refusals before any work stay fast
    pass


class _Cumulative:
    """``observe`` reports sequences done so far; a progress sink counts increments."""

    def __init__(self, progress: ProgressSink) -> None:
        self.progress, self.done = progress, 0

    def __call__(self, done: int) -> None:
        self.progress.advance(done - self.done)
        self.done = done


def run_audit(config: RunConfig, out: str | Path, *, progress: ProgressSink | None = None,
              report: bool = True, on_cell: Callable[[str, int], None] | None = None,
              execution: Execution | None = None, trust_remote_code: bool = False,
              allow_fewer: bool = False) -> RunResult:
    """Run (or resume) the audit described by ``config`` into the directory ``out``.

    Everything that can be refused is refused before any work, and a refused new run leaves no directory behind
    (:mod:`moeaudit.run._preflight`). SIGTERM is handled like Ctrl-C (the run is marked ``interrupted``).

    Args:
        config: The run's configuration (:class:`moeaudit.config.RunConfig`); relative model and corpus paths are
            resolved against the current directory and stored absolute.
        out: The run directory; created when missing. A directory holding the same configuration and model
            resumes; one holding another configuration or another model is refused.
        progress: Receives stages and progress (see :class:`ProgressSink`).
        report: Write ``report.md`` / ``report.html`` / ``figures/`` at the end (not for a shard: merge the
            shards with :func:`moeaudit.merge_runs`, which writes the report).
        on_cell: Called with ``(kind, layer)`` after each newly computed cell is on disk.
        execution: Where and which cells are computed: executor (local or Ray), shard, clean-pass cache
            (:class:`moeaudit.Execution`; default: every cell in this process).
        trust_remote_code: Run modelling code shipped with the checkpoint (never read from a configuration).
        allow_fewer: When the corpus has fewer valid positions than ``n`` (or ``n_progressive``), run with the
            positions it has (stated in the manifest, the result and the report) instead of refusing.

    Returns:
        The records, the summary tables, which cells were resumed or computed, and the positions used.

    Raises:
        RunDirectoryError: ``out`` holds another run or another model's, is damaged, is in use, or is a file.
        ConfigError: Bad metrics or layers, or more positions asked for than the corpus has.
        ModelSourceError: The model cannot be found or loaded safely.
        VerificationError: The verification suite failed; no data was collected.
    """
    progress = progress or SilentProgress()
    execution = execution or Execution()
    run_dir = RunDirectory(out)
    fresh = not run_dir.path.exists()
    with sigterm_as_interrupt():
        plan = preflight(config, run_dir.path)
        check_metrics(config.metrics)
        check_executor(execution, plan.config)
        device = check_device(resolve_device(plan.config.device))
        timer = StageTimer()
        session: dict[str, Any] = {"started": now(), "environment": environment()}
        options = RunOptions(trust_remote_code=trust_remote_code, allow_fewer=allow_fewer, device=device,
                           execution=execution)
        try:
            return _run_locked(plan, run_dir, session, timer, progress, report, on_cell, options)
        except (ConfigError, UnsupportedModelError, CorpusError, OSError, ValueError):
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
        self.entry.update(ended=now(), stages=self.timer.stages)
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
                defaults: dict[str, Any] | None = None,
                restart: Callable[[dict[str, Any]], bool] | None = None,
                relaxed: tuple[str, ...] = ()) -> Iterator[Session]:
    """Hold ``run_dir``'s lock, bind it to ``config`` (create it, or resume the same configuration), and record
    the session in the manifest; a failure or an interruption (Ctrl-C, SIGTERM) marks the run ``failed`` /
    ``interrupted``. ``extra`` keys go into a new run's manifest (e.g. a shard's spec); ``check`` sees the manifest
    before this session writes anything when it resumes a run, and refuses by raising (e.g. resuming a shard as
    another one, or with another model). A key the stored configuration lacks (written by an older version)
    counts as its value in ``defaults``. ``restart`` decides whether a run that ended before its first cell is
    started afresh, and which ``relaxed`` keys an unfinished run may be resumed with other values of
    (:meth:`moeaudit.rundir.RunDirectory.claim`).

    Raises:
        RunDirectoryError: ``run_dir`` holds another configuration, or is in use.
    """
    with run_dir.lock(), sigterm_as_interrupt():
        run_dir.remove_stale_temporaries()
        new_manifest = {"format_version": FORMAT_VERSION, "tool": tool, "config": config, "status": "running",
                        "created": entry["started"], "sessions": [], **(extra or {})}
        manifest, resumed = run_dir.claim(config, new_manifest, defaults=defaults, restart=restart,
                                          relaxed=relaxed)
        if manifest.get("restarted"):
            progress.message(f"the run in {run_dir.path} ended ({manifest['restarted']}) before its first cell; "
                             "starting it afresh with this configuration and model")
        if check is not None and resumed:  # a refusal leaves the run it holds untouched (a new one has nothing)
            check(manifest)
        try:  # from here on, any exit (SIGTERM included) leaves the manifest saying how the session ended
            manifest["status"] = "running"
            manifest["sessions"].append(entry)
            if not (run_dir.path / "config.toml").is_file():
                run_dir.write_text("config.toml", config_toml)
            run_dir.write_manifest(manifest)
            if resumed:
                progress.message(f"resuming the run in {run_dir.path}")
            yield Session(run_dir, manifest, entry, timer, resumed)
        except BaseException as exc:
            entry.update(ended=now(), stages=timer.stages, error=f"{type(exc).__name__}: {exc}")
            if manifest["status"] != "complete":
                manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            run_dir.write_manifest(manifest)
            raise


def _run_locked(plan: Preflight, run_dir: RunDirectory, session: dict, timer: StageTimer,
                progress: ProgressSink, report: bool, on_cell, options: RunOptions) -> RunResult:
    config, shard = plan.config, options.execution.shard

    def check(manifest: dict[str, Any]) -> None:  # under the lock, before this session writes anything
        check_shard(manifest, shard, run_dir.path)
        check_identity(run_dir, manifest, plan.identity)
        run_dir.check_files()

    def restart(manifest: dict[str, Any]) -> bool:  # another configuration or model than the failed run's
        if manifest.get("tool", "moeaudit") != "moeaudit":
            return False
        stored = {**RunConfig().to_dict(), **BEFORE_KEY_EXISTED, **manifest.get("config", {})}
        identity = manifest_identity(manifest)
        return bool(config_differences(stored, config.to_dict())
                    or (identity and identity_changes(identity, plan.identity)))

    with run_session(run_dir, config.to_dict(), config.to_toml(), entry=session, timer=timer, progress=progress,
                     extra=None if shard is None else {"shard": shard.to_dict()}, check=check,
                     defaults={**RunConfig().to_dict(), **BEFORE_KEY_EXISTED}, restart=restart,
                     relaxed=SUMMARY_KEYS) as s:
        if s.resumed and manifest_identity(s.manifest) is None:
            progress.message("this run directory predates model identities; recording the model's now")
        if plan.source.kind != "hub":  # a hub model's identity is complete once its files are cached (_load)
            s.manifest["model_identity"] = plan.identity
            s.write()
        result = _execute(plan, run_dir, s.manifest, session, timer, progress, on_cell, options)
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


def _execute(plan: Preflight, run_dir: RunDirectory, manifest: dict, session: dict, timer: StageTimer,
             progress: ProgressSink, on_cell, options: RunOptions) -> RunResult:
    from moeaudit.experiments import ExperimentSettings, add_domain_tables, summarize, summary_settings
    from moeaudit.experiments._stability import is_current, ranking_stability
    from moeaudit.experiments._states import sequence_ids
    from moeaudit.intervene._verify import verify
    from moeaudit.observation._observe import observe
    from moeaudit.run.execution import CellJob, CellResult, canonical_cells, make_executor, release_device_memory

    config, execution = plan.config, options.execution
    loaded = load_for_run(plan, run_dir, manifest, session, timer, progress, options)
    model, tokenizer, sequences = loaded.model, loaded.tokenizer, loaded.sequences
    single_seqs = sequences[: config.n_docs]
    n = loaded.positions["single"].n if "single" in loaded.positions else config.n
    n_progressive = loaded.positions["progressive"].n if "progressive" in loaded.positions else config.n_progressive
    settings = ExperimentSettings(layers=loaded.layers, metrics=config.metrics, n=n, n_progressive=n_progressive,
                                  progressive_arms=config.progressive_arms, seed=config.seed, scope=config.scope, mode=config.mode,
                                  min_context=config.min_context, model_name=config.label,
                                  strata=tuple(loaded.domains) if config.stratify_domains and loaded.domains
                                  else None)

    metric_table = run_dir.read_parquet("metrics.parquet")
    if metric_table is None:
        progress.stage("observing expert metrics", len(single_seqs))
        with timer("observe"):
            metric_table = observe(model, [s.input_ids for s in single_seqs], progress=_Cumulative(progress))
        run_dir.write_parquet("metrics.parquet", metric_table)
    if config.mode == "mean":
        settings = replace(settings, means=_expert_means(model, sequences, run_dir, timer, progress))
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

    if pending or not _verification_stored(run_dir):  # a missing or damaged report is rewritten
        progress.stage("verifying the ablation engine", None)
        with timer("verification"):
            verification = verify(model, tokenizer, single_seqs[:2], seed=config.seed, modes=(config.mode,),
                                  means=settings.means)
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
        executor = make_executor(execution, config=config, model=model, trust_remote_code=options.trust_remote_code)
        if execution.executor != "local":  # the workers load their own model: free the driver's device for them
            model = None
            release_device_memory()
        session["execution"] = execution.describe()
        session["execution"].update(executor.run(job, pending, write, progress.advance))

    progress.stage("summarising", None)
    with timer("summary"):
        records = run_dir.read_records()
        tables = summarize(records, metrics=metric_table, **summary_settings(config.to_dict()))
        add_domain_tables(tables, records, metric_table, manifest, seed=config.seed)
        write_summary(run_dir, tables)
    return RunResult(run_dir.path, records, tables, resumed, computed,
                     positions={kind: p.to_dict() for kind, p in loaded.positions.items()})


def _expert_means(model, sequences, run_dir: RunDirectory, timer: StageTimer, progress: ProgressSink):
    """``mode = "mean"``: the expert means of every MoE layer (the verification ablates any of them) over every
    document the run ablates (the single and progressive documents), read from ``expert_means.parquet`` when a
    session before computed them."""
    from moeaudit.intervene import ExpertMeans, expert_means

    stored = run_dir.read_parquet("expert_means.parquet")
    if stored is not None:
        means = ExpertMeans.from_frame(stored)
        means.check(model)
        return means
    progress.stage("expert means for mode = mean", len(sequences))
    with timer("expert means"):
        means = expert_means(model, sequences, progress=progress.advance)
    run_dir.write_parquet("expert_means.parquet", means.to_frame())
    return means


def _verification_stored(run_dir: RunDirectory) -> bool:
    """Whether ``verification.json`` holds a readable verification report."""
    try:
        stored = run_dir.read_json("verification.json")
    except RunDirectoryError:
        return False
    return isinstance(stored, dict) and "passed" in stored
