"""``moeaudit map`` and ``moeaudit prune-eval`` into run directories (atomic files, resumable per unit, bound to
one configuration; see :mod:`moeaudit.rundir` and :func:`moeaudit.pipeline.run_session`).

Layout of a prune-eval directory (a map directory holds the first part)::

    manifest.json, config.toml, verification.json
    records/L004-single.parquet ...   single-expert pool of the calibration split, one file per layer
    importance.parquet                 the causal importance map (per layer x expert)
    splits.json, eval_tokens.parquet   calibration / evaluation documents; the evaluation tokens (doc_id, input_ids)
    metrics.parquet                    every observe criterion on the calibration split
    pruned.parquet                     exactly the experts each (criterion, fraction, seed) removes
    losses/<model key>.parquet         per-token held-out losses of each distinct pruned model (one file per unit)
    prune.csv, prune_per_layer.csv, tests.csv, per_layer.csv, lm_eval.csv
    report.md, report.html, figures/
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moeaudit.errors import ConfigError, CorpusError, RunDirectoryError, UnsupportedModelError
from moeaudit.pipeline import ProgressSink, SilentProgress, StageTimer, environment, run_session
from moeaudit.pruning._config import CAUSAL, RANDOM, MapConfig, PruneConfig
from moeaudit.pruning._preflight import MapPlan, preflight_map
from moeaudit.rundir import RunDirectory

if TYPE_CHECKING:  # the modules that need torch are imported once the checks before any work have passed
    from moeaudit.pruning._loading import Loaded
    from moeaudit.pruning._units import PruneUnit


@dataclass
class MapResult:
    """What :func:`importance_map` produced."""

    directory: Path
    importance: pd.DataFrame
    records: pd.DataFrame
    report: dict[str, Path] = field(default_factory=dict)


@dataclass
class PruneResult:
    """What :func:`prune_eval` produced (the tables are also files of the run directory)."""

    directory: Path
    prune: pd.DataFrame
    tests: pd.DataFrame
    pruned: pd.DataFrame
    importance: pd.DataFrame | None
    per_layer: pd.DataFrame | None = None  # prune_per_layer.csv: one row per one-layer pruning
    per_layer_effects: pd.DataFrame | None = None  # per_layer.csv: loss increase per (criterion, fraction, layer)
    lm_eval: pd.DataFrame | None = None
    report: dict[str, Path] = field(default_factory=dict)
    saved: Path | None = None
    sizes: pd.DataFrame | None = None  # sizes.csv: parameters and bytes removed per (fraction, method)
    super_experts: pd.DataFrame | None = None  # super_experts.csv
    saved_pairs: list[Path] = field(default_factory=list)  # checkpoints of --save-pairs


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _in_session(plan: MapPlan, run_dir: RunDirectory, progress: ProgressSink, tool: str, work, writer,
                report: bool):
    """Run ``work(session)`` inside a run session of ``run_dir`` bound to ``plan``'s configuration and model, mark
    the run complete, then write its report with ``writer``. Bad input found before any result leaves no half-made
    directory behind."""
    config = plan.config
    fresh = not run_dir.path.exists()
    timer, entry = StageTimer(), {"started": _now(), "environment": environment()}
    try:
        with run_session(run_dir, config.to_dict(), config.to_toml(), entry=entry, timer=timer,
                         progress=progress, tool=tool, check=lambda manifest: plan.check_resume(run_dir, manifest),
                         defaults=type(config)().to_dict()) as s:
            if plan.source.kind != "hub":  # a hub model's identity is complete once its files are cached
                s.manifest["model_identity"] = plan.identity
            result = work(s)
            s.complete()
            if report:  # after the manifest is final, so the report shows the finished run
                progress.stage("writing the report", None)
                with timer("report"):
                    result.report = writer(run_dir.path)
                s.write()
        return result
    except (ConfigError, UnsupportedModelError, CorpusError, OSError):
        if fresh and run_dir.path.is_dir() and not run_dir.finished_cells() \
                and not (run_dir.path / "losses").is_dir():
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise


def importance_map(config: MapConfig, out: str | Path, *, progress: ProgressSink | None = None,
                   report: bool = True, trust_remote_code: bool = False) -> MapResult:
    """Compute (or resume) the causal importance map of ``config`` into the run directory ``out``.

    Every active expert is ablated singly at ``config.n`` sampled positions per layer of the ``n_docs`` documents
    (the single-expert pool), then aggregated per (layer, expert) into ``importance.parquet`` (see
    :data:`moeaudit.pruning.IMPORTANCE_COLUMNS`) and drawn as a layer x expert heat map in the report.

    Relative model and corpus paths are stored absolute; ``trust_remote_code`` runs modelling code shipped with the
    checkpoint (per call; a configuration cannot ask for it).

    Raises:
        RunDirectoryError: ``out`` is a file, holds another run or another model's, or is in use.
        ModelSourceError, CorpusError, ConfigError: refused before any work (nothing is left on disk).
        VerificationError: the verification suite failed; no data was collected.
    """
    progress = progress or SilentProgress()
    plan = preflight_map(config, out, trust_remote_code=trust_remote_code)
    from moeaudit.report._prune import write_map_report  # after the checks: it imports torch and matplotlib
    run_dir = RunDirectory(out)

    def work(s) -> MapResult:
        from moeaudit.pruning._loading import load_splits

        loaded = load_splits(plan, run_dir, s, progress, evaluation=False)
        table, records = _importance(plan.config, loaded, run_dir, s, progress)
        return MapResult(run_dir.path, table, records)

    return _in_session(plan, run_dir, progress, "moeaudit map", work, write_map_report, report)


def _importance(config: MapConfig, loaded: Loaded, run_dir: RunDirectory, s, progress: ProgressSink):
    from moeaudit._verify import verify
    from moeaudit.experiments import CleanStates, ExperimentSettings
    from moeaudit.pruning._importance import collect_pool, importance_table

    settings = ExperimentSettings(layers=config.layers, n=config.n, seed=config.seed, scope=config.scope,
                                  mode=config.mode, min_context=config.min_context, model_name=config.label)
    layers = settings.check(loaded.model)
    done = run_dir.finished_cells()
    pending = [layer for layer in layers if ("single", layer) not in done]
    if pending:
        progress.stage("verifying the ablation engine", None)
        with s.timer("verification"):
            report = verify(loaded.model, loaded.tokenizer, loaded.calibration[:2], seed=config.seed,
                            modes=(config.mode,))
        run_dir.write_json("verification.json", report.to_dict())
        report.raise_if_failed()
        progress.stage(f"importance map ({len(pending)} layers to go, {len(layers) - len(pending)} resumed)",
                       config.n * len(pending))
        states = CleanStates(loaded.model, loaded.calibration, layers=pending)  # one clean pass per document
        for layer in pending:
            with s.timer(f"pool L{layer}"):
                frame = collect_pool(loaded.model, loaded.calibration, settings, layer, progress=progress.advance,
                                     states=states)
            run_dir.write_cell("single", layer, frame)
    records = run_dir.read_records()
    table = importance_table(records, layers, loaded.geometry.n_experts)
    run_dir.write_parquet("importance.parquet", table)
    return table, records


def _check_save(config: PruneConfig, criteria: list[str], geometry, layers, save_criterion, save_fraction):
    if save_criterion not in criteria:
        raise ConfigError(f"--save-criterion {save_criterion!r} is not a criterion of this run; choose one of "
                          f"{', '.join(criteria)}.")
    if save_fraction not in config.fractions:
        raise ConfigError(f"--save-fraction {save_fraction} is not a fraction of this run; choose one of "
                          f"{', '.join(map(str, config.fractions))}.")
    if tuple(layers) != tuple(geometry.moe_layers):
        raise ConfigError("--save-pruned needs every MoE layer pruned (a checkpoint has one expert count for all "
                          "layers); leave layers= unset.")


def prune_eval(config: PruneConfig, out: str | Path, *, progress: ProgressSink | None = None, report: bool = True,
               save_pruned: str | Path | None = None, save_criterion: str | None = None,
               save_fraction: float | None = None, trust_remote_code: bool = False,
               save_pairs: str | list | None = None) -> PruneResult:
    """Run (or resume) a prune-eval experiment into the run directory ``out``.

    For every criterion (``observe`` metrics on the calibration split, ``random`` with ``random_seeds`` seeds, and
    the ``causal`` reference ranked by the importance map's mean ΔL on the calibration split) and every fraction,
    the lowest-ranked experts are removed at every pruned layer (see :mod:`moeaudit.pruning._plan` for the rules)
    and the pruned model is evaluated in memory on the disjoint evaluation split: held-out mean loss and
    perplexity, paired tests against the random band and the causal reference (:mod:`moeaudit.pruning._compare`),
    optionally one layer at a time and lm-evaluation-harness tasks.

    Args:
        config: The experiment (:class:`PruneConfig`).
        out: The run directory; a directory holding the same configuration resumes, another is refused.
        progress: Receives stages and progress.
        report: Write ``report.md`` / ``report.html`` / ``figures/``.
        save_pruned: Also write a loadable checkpoint with the experts of (``save_criterion``, ``save_fraction``)
            deleted to this directory (tokenizer included; ``random`` uses the run's first seed).
        trust_remote_code: Run modelling code shipped with the checkpoint (per call; a configuration cannot ask
            for it).
        save_pairs: Several checkpoints: ``"reap@0.25,causal@0.5"`` (or ``[("reap", 0.25), ...]``), each written
            to ``save_pruned/<criterion>@<fraction>/`` (see :mod:`moeaudit.pruning._extras`).

    Raises:
        RunDirectoryError: ``out`` is a file, holds another run or another model's, or is in use.
        ModelSourceError, CorpusError, ConfigError: refused before any work (nothing is left on disk).
    """
    from moeaudit.pruning._extras import check_save_pairs, parse_save_pairs

    progress = progress or SilentProgress()
    plan = preflight_map(config, out, trust_remote_code=trust_remote_code)
    config = plan.config
    run_dir = RunDirectory(out)
    from moeaudit.pruning._units import resolve_criteria

    criteria = resolve_criteria(config.criteria)
    pairs = parse_save_pairs(save_pairs)
    if pairs and (save_criterion is not None or save_fraction is not None):
        raise ConfigError("--save-pairs and --save-criterion / --save-fraction both name checkpoints; use one.")
    check_save_pairs(pairs, None if save_pruned is None else Path(save_pruned), config, criteria)
    if save_pruned is not None and not pairs and (save_criterion is None or save_fraction is None):
        if len(criteria) == 1 and len(config.fractions) == 1:
            save_criterion, save_fraction = criteria[0], config.fractions[0]
        else:
            raise ConfigError("--save-pruned needs --save-criterion and --save-fraction: the run prunes by "
                              f"{len(criteria)} criteria at {len(config.fractions)} fractions.")
    if save_pruned is not None and config.device_map is not None:
        raise ConfigError(f"--save-pruned slices the checkpoint from the loaded model, which needs it whole on one "
                          f"device, but device_map={config.device_map!r} spreads it (and may offload weights); run "
                          "without device_map= to write the pruned checkpoint (pruned.parquet lists the removed "
                          "experts of every pruned model).")
    if config.lm_eval_tasks:
        from moeaudit.pruning._lmeval import check_lm_eval

        check_lm_eval(config)

    def work(s) -> PruneResult:
        from moeaudit.pruning._extras import calibration_means, super_expert_table, unrouted_summary
        from moeaudit.pruning._extras import save_pairs as save_many
        from moeaudit.pruning._loading import load_splits
        from moeaudit.pruning._plan import n_removed
        from moeaudit.pruning._size import size_table
        from moeaudit.pruning._super import protected_map
        from moeaudit.pruning._units import build_units

        loaded = load_splits(plan, run_dir, s, progress, evaluation=True)
        geometry, layers = loaded.geometry, loaded.layers
        removed_counts = {str(f): n_removed(geometry, f) for f in config.fractions}  # refuses bad fractions
        for criterion, fraction in pairs or ([(save_criterion, save_fraction)] if save_pruned is not None else []):
            _check_save(config, criteria, geometry, layers, criterion, fraction)
        s.manifest["pruning"] = {
            "criteria": criteria, "removed_per_layer": removed_counts, "layers": list(layers),
            "group_balanced": None if geometry.groups is None else
            {"n_group": geometry.groups.n_group, "topk_group": geometry.groups.topk_group}}
        s.write()
        importance = _importance(config.map_config(), loaded, run_dir, s, progress)[0] \
            if CAUSAL in criteria or config.protect_top else None
        supers = super_expert_table(config, importance, run_dir, layers)
        protected = protected_map(supers[supers["protected"]]) if config.protect_top else None
        means = calibration_means(loaded, run_dir, s, progress) if "mean" in config.method else None
        metrics = _metrics(loaded, run_dir, s, progress, criteria)
        units = build_units(criteria, config.fractions, random_seeds=config.random_seeds, seed=config.seed,
                            geometry=geometry, layers=layers, metrics=metrics, importance=importance,
                            per_layer=config.per_layer, methods=config.method, protected=protected)
        if protected or means is not None:
            s.manifest["pruning"].update(
                protected={str(k): list(v) for k, v in (protected or {}).items()},
                **({"mean_replacement": unrouted_summary(means, units)} if means is not None else {}))
        result = _evaluate(config, loaded, units, run_dir, s, progress, means=means)
        result.importance, result.super_experts = importance, supers
        result.sizes = size_table(loaded.model, units)
        run_dir.write_text("sizes.csv", result.sizes.to_csv(index=False))
        if config.lm_eval_tasks:
            from moeaudit.pruning._lmeval import score_units

            result.lm_eval = score_units(config, loaded, units, run_dir, s, progress)
        if pairs:
            result.saved_pairs = save_many(loaded, units, config, pairs, Path(save_pruned), run_dir)
        elif save_pruned is not None:
            result.saved = _save(loaded, units, config, save_pruned, save_criterion, save_fraction, run_dir)
        return result

    from moeaudit.report._prune import write_prune_report

    return _in_session(plan, run_dir, progress, "moeaudit prune-eval", work, write_prune_report, report)


def _metrics(loaded: Loaded, run_dir: RunDirectory, s, progress: ProgressSink, criteria: list[str]):
    from moeaudit._observe import observe

    if not [c for c in criteria if c not in (CAUSAL, RANDOM)]:
        return None
    table = run_dir.read_parquet("metrics.parquet")
    if table is None:
        progress.stage("observing every criterion on the calibration split", len(loaded.calibration))
        with s.timer("observe"):
            table = observe(loaded.model, [q.input_ids for q in loaded.calibration], layers=loaded.layers,
                            progress=lambda done: progress.advance(1))
        run_dir.write_parquet("metrics.parquet", table)
    return table


def _evaluate(config: PruneConfig, loaded: Loaded, units: list[PruneUnit], run_dir: RunDirectory, s,
              progress: ProgressSink, *, means=None) -> PruneResult:
    from moeaudit.pruning._compare import by_method, loss_tables, paired_tests, per_layer_effects
    from moeaudit.pruning._units import pruned_table, sequence_losses

    run_dir.write_parquet("pruned.parquet", pruned_table(units))
    n_tokens = int(loaded.eval_docs.size)
    distinct = {u.key: u for u in units}
    losses: dict[str, np.ndarray] = {}
    pending = []
    for key in distinct:
        stored = run_dir.read_parquet(f"losses/{key}.parquet")
        if stored is not None and len(stored) == n_tokens:
            losses[key] = stored["loss"].to_numpy(dtype=np.float64)
        elif stored is not None:
            raise RunDirectoryError(f"{run_dir.path / 'losses' / (key + '.parquet')} holds {len(stored)} losses, "
                                    f"expected {n_tokens}: it is damaged. Delete it and run again to recompute it.")
        else:
            pending.append(key)
    progress.stage(f"evaluating {len(pending)} pruned models ({len(distinct) - len(pending)} resumed, "
                   f"{len(units)} units)", len(pending) * len(loaded.evaluation))
    for key in pending:
        with s.timer("evaluate"):
            loss = sequence_losses(loaded.model, loaded.evaluation, distinct[key].removal or None,
                                   progress=progress.advance, method=distinct[key].method, means=means)
        run_dir.write_parquet(f"losses/{key}.parquet", pd.DataFrame({"loss": loss}))
        losses[key] = loss
    progress.stage("paired tests", None)
    with s.timer("tests"):
        prune, per_layer = loss_tables(units, losses)
        tests = by_method(paired_tests, units, losses, loaded.eval_docs, alpha=config.alpha, n_perm=config.n_perm,
                          n_boot=config.n_boot, seed=config.seed)
        effects = by_method(per_layer_effects, units, losses, loaded.eval_docs) if config.per_layer else None
    run_dir.write_text("prune.csv", prune.to_csv(index=False))
    run_dir.write_text("tests.csv", tests.to_csv(index=False))
    if len(config.method) > 1:
        from moeaudit.pruning._extras import method_comparison

        run_dir.write_text("methods.csv", method_comparison(
            units, losses, loaded.eval_docs, alpha=config.alpha, n_perm=config.n_perm, n_boot=config.n_boot,
            seed=config.seed).to_csv(index=False))
    if config.per_layer:
        run_dir.write_text("prune_per_layer.csv", per_layer.to_csv(index=False))
        run_dir.write_text("per_layer.csv", effects.to_csv(index=False))
    return PruneResult(run_dir.path, prune, tests, pruned_table(units), None,
                       per_layer if config.per_layer else None, effects)


def _save(loaded: Loaded, units: list[PruneUnit], config: PruneConfig, out, criterion: str, fraction: float,
          run_dir: RunDirectory) -> Path:
    from moeaudit.pruning._slice import save_pruned as save

    unit = next(u for u in units if u.criterion == criterion and u.fraction == fraction and u.layer is None
                and u.method == "delete")
    provenance: dict[str, Any] = {"criterion": criterion, "fraction": fraction, "seed": unit.seed,
                                  "source_model": config.model, "run_directory": str(run_dir.path)}
    return save(loaded.model, unit.removal, out, tokenizer=loaded.tokenizer, provenance=provenance)


__all__ = ["MapResult", "PruneResult", "importance_map", "prune_eval"]
