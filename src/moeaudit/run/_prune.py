"""``moeaudit map`` and ``moeaudit prune-eval`` into run directories (atomic files, resumable per unit, bound to
one configuration; see :mod:`moeaudit.rundir` and :func:`moeaudit.run.pipeline.run_session`).

Layout of a prune-eval directory (a map directory holds the first part)::

    manifest.json, config.toml, verification.json
    records/L004-single.parquet ...   (map) single-expert pool of the calibration split, one file per layer
    fold<k>/records/..., fold<k>/importance.parquet, fold<k>/metrics.parquet, fold<k>/loo.parquet
                                       (prune-eval) the same per cross-fitting fold, on that fold's calibration split
    importance.parquet                 the causal importance map (per layer x expert; per fold with a fold column)
    splits.json, eval_tokens.parquet   the folds' documents; the evaluation tokens (doc_id, fold, input_ids)
    metrics.parquet                    every observe criterion on each fold's calibration split
    pruned.parquet                     exactly the experts each (criterion, fraction, seed, fold, allocation, method)
                                       removes
    losses/f<k>-<model key>.parquet    per-token held-out losses of each distinct pruned model on fold k
    fold<k>/expert_means.parquet       (--method mean) c_e on fold k's calibration split, unpruned model
    answer.csv                         pooled over folds: one row per (criterion, fraction, allocation, method)
    methods.csv                        (--method delete,mean) mean replacement minus deletion of the same experts
    super_experts.csv, sizes.csv       the costliest single removals per fold; parameters / bytes removed
    allocation.csv                     each non-uniform allocation against uniform at the same budget
    prune.csv, fold_agreement.csv, prune_per_layer.csv, per_layer.csv, lm_eval.csv, lm_eval_answer.csv,
    lm_eval_items/<task>.parquet
    report.md, report.html, figures/
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moeaudit.errors import ConfigError, CorpusError, RunDirectoryError, UnsupportedModelError
from moeaudit.pruning._config import ATTRIBUTION, CAUSAL, CAUSAL_LOO, RANDOM, MapConfig, PruneConfig
from moeaudit.run._prune_preflight import MapPlan, preflight_map
from moeaudit.run._prune_results import MapResult, PruneResult
from moeaudit.run.pipeline import ProgressSink, SilentProgress, StageTimer, environment, run_session
from moeaudit.rundir import RunDirectory

if TYPE_CHECKING:  # the modules that need torch are imported once the checks before any work have passed
    from moeaudit.pruning._units import PruneUnit
    from moeaudit.run._prune_loading import Loaded


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
        from moeaudit.run._prune_loading import load_splits

        loaded = load_splits(plan, run_dir, s, progress, evaluation=False)
        table, records = _importance(plan.config, loaded, run_dir, s, progress)
        return MapResult(run_dir.path, table, records)

    return _in_session(plan, run_dir, progress, "moeaudit map", work, write_map_report, report)


def _importance(config: MapConfig, loaded: Loaded, run_dir: RunDirectory, s, progress: ProgressSink):
    from moeaudit.experiments import CleanStates, ExperimentSettings
    from moeaudit.intervene._verify import verify
    from moeaudit.pruning._importance import collect_pool, importance_table
    from moeaudit.pruning._positions import map_positions

    n = map_positions(config, loaded, run_dir)
    settings = ExperimentSettings(layers=config.layers, n=n, seed=config.seed, scope=config.scope,
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
                       n * len(pending))
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


def prune_eval(config: PruneConfig, out: str | Path, *, progress: ProgressSink | None = None, report: bool = True,
               save_pruned: str | Path | None = None, save_criterion: str | None = None,
               save_fraction: float | None = None, trust_remote_code: bool = False,
               save_pairs: str | list | None = None) -> PruneResult:
    """Run (or resume) a prune-eval experiment into the run directory ``out``.

    Documents are shuffled with ``split_seed``, stratified and dealt into ``folds`` cross-fitting folds
    (:mod:`moeaudit.pruning._splits`). Per fold, every criterion (``observe`` metrics on the fold's calibration
    split, ``random`` with ``random_seeds`` seeds, the ``causal`` reference ranked by each expert's removal cost
    from the importance map, and with ``reference="loo"`` the exact single-removal cost) ranks the experts; at
    every fraction and allocation the lowest-ranked are removed (:mod:`moeaudit.pruning._plan`) and the pruned
    model is evaluated in memory on the fold's evaluation documents. ``answer.csv`` pools the folds: each criterion
    against the random prunings and the causal reference (:mod:`moeaudit.pruning._compare`); optionally one layer
    at a time and lm-evaluation-harness tasks.

    Args:
        config: The experiment (:class:`PruneConfig`).
        out: The run directory; a directory holding the same configuration resumes, another is refused.
        progress: Receives stages and progress.
        report: Write ``report.md`` / ``report.html`` / ``figures/``.
        save_pruned: Also write a loadable checkpoint with the experts of (``save_criterion``, ``save_fraction``)
            deleted to this directory (tokenizer included; ``random`` uses the run's first seed; the uniform
            allocation as ranked on fold 0's calibration split).
        trust_remote_code: Run modelling code shipped with the checkpoint (per call; a configuration cannot ask
            for it).
        save_pairs: Several checkpoints: ``"reap@0.25,causal@0.5"`` (or ``[("reap", 0.25), ...]``), each written
            to ``save_pruned/<criterion>@<fraction>/`` (see :mod:`moeaudit.pruning._extras`).

    With ``method=("delete", "mean")`` every pruning is also evaluated with its removed experts mean-replaced (c_e
    of the unpruned model on the fold's calibration split); with ``protect_top=K`` each fold's K costliest single
    removals (its importance map) are never removed.

    Raises:
        RunDirectoryError: ``out`` is a file, holds another run or another model's, or is in use.
        ModelSourceError, CorpusError, ConfigError: refused before any work (nothing is left on disk).
    """
    from moeaudit.run import _prune_extras as X

    progress = progress or SilentProgress()
    plan = preflight_map(config, out, trust_remote_code=trust_remote_code)
    config = plan.config
    run_dir = RunDirectory(out)
    from moeaudit.pruning._units import resolve_criteria

    criteria = resolve_criteria(config.criteria)
    pairs, save_criterion, save_fraction, save_pruned = X.save_plan(config, criteria, save_pruned, save_criterion,
                                                                    save_fraction, save_pairs)
    if config.lm_eval_tasks:
        from moeaudit.pruning._lmeval import check_lm_eval

        check_lm_eval(config)

    def work(s) -> PruneResult:
        from moeaudit.pruning._extras import unrouted_summary
        from moeaudit.pruning._plan import n_removed
        from moeaudit.pruning._size import size_table
        from moeaudit.pruning._super import protected_map
        from moeaudit.pruning._units import build_units
        from moeaudit.run._prune_loading import load_splits

        loaded = load_splits(plan, run_dir, s, progress, evaluation=True)
        geometry, layers = loaded.geometry, loaded.layers
        removed_counts = {str(f): n_removed(geometry, f) for f in config.fractions}  # refuses bad fractions
        if geometry.groups is not None and set(config.allocation) - {"uniform"}:
            raise ConfigError(f"allocation={','.join(config.allocation)}: the router is group-limited, so every "
                              "group and layer must lose the same number of experts; use allocation=uniform.")
        for criterion, fraction in pairs or ([(save_criterion, save_fraction)] if save_pruned is not None else []):
            X.check_save(config, criteria, geometry, layers, criterion, fraction)
        s.manifest["pruning"] = {
            "criteria": criteria, "removed_per_layer": removed_counts, "layers": list(layers),
            "allocation": list(config.allocation), "folds": len(loaded.folds),
            "group_balanced": None if geometry.groups is None else
            {"n_group": geometry.groups.n_group, "topk_group": geometry.groups.topk_group}}
        s.write()
        need_map = (CAUSAL in criteria or CAUSAL_LOO in criteria or "causal" in config.allocation
                    or config.protect_top > 0)
        units, maps, tables, supers, means, extra = [], [], [], [], {}, {}
        for fold in loaded.folds:
            fold_dir = RunDirectory(run_dir.path / f"fold{fold.fold}")
            view = _FoldView(loaded, fold)
            importance = _importance(config.map_config(), view, fold_dir, s, progress)[0] if need_map else None
            if importance is not None and (config.reference == "loo" or CAUSAL_LOO in criteria):
                importance = importance.merge(_loo(view, fold_dir, s, progress), on=["layer", "expert"])
            metrics = _metrics(view, fold_dir, s, progress, criteria)
            attribution = _attribution(config, view, fold_dir, s, progress) if ATTRIBUTION in criteria else None
            top = X.super_expert_table(config, importance, fold_dir, layers)
            protected = protected_map(top[top["protected"]]) if config.protect_top else None
            if "mean" in config.method:  # c_e of the unpruned model on this fold's calibration split
                means[fold.fold] = X.calibration_means(view, fold_dir, s, progress)
            mine = build_units([*criteria, *([CAUSAL_LOO] if config.reference == "loo" and CAUSAL_LOO not in
                                              criteria else [])],
                               config.fractions, random_seeds=config.random_seeds, seed=config.seed,
                               geometry=geometry, layers=layers, metrics=metrics, importance=importance,
                               per_layer=config.per_layer, fold=fold.fold, allocations=config.allocation,
                               methods=config.method, protected=protected, attribution=attribution)
            units += mine
            if top is not None:
                supers.append(top.assign(fold=fold.fold))
            if protected or fold.fold in means:
                extra[str(fold.fold)] = {
                    "protected": {str(k): list(v) for k, v in (protected or {}).items()},
                    **({"mean_replacement": unrouted_summary(means[fold.fold], mine)} if fold.fold in means else {})}
            if importance is not None:
                maps.append(importance.assign(fold=fold.fold))
            if metrics is not None:
                tables.append(metrics.assign(fold=fold.fold))
        importance = pd.concat(maps, ignore_index=True) if maps else None
        if importance is not None:
            run_dir.write_parquet("importance.parquet", importance)
        if tables:
            run_dir.write_parquet("metrics.parquet", pd.concat(tables, ignore_index=True))
        if extra:
            s.manifest["pruning"]["folds_extra"] = extra
        result = _evaluate(config, loaded, units, run_dir, s, progress, means=means)
        result.importance = importance
        if supers:
            result.super_experts = pd.concat(supers, ignore_index=True)
            run_dir.write_text("super_experts.csv", result.super_experts.to_csv(index=False))
        result.sizes = size_table(loaded.model, units)
        run_dir.write_text("sizes.csv", result.sizes.to_csv(index=False))
        if config.lm_eval_tasks:
            from moeaudit.pruning._lmeval import score_units, write_lm_eval_answer

            result.lm_eval = score_units(config, loaded, units, run_dir, s, progress)
            result.lm_eval_answer, result.tests = write_lm_eval_answer(config, result.lm_eval, result.tests, run_dir)
        if pairs:
            result.saved_pairs = X.save_pairs(loaded, units, config, pairs, Path(save_pruned), run_dir)
        elif save_pruned is not None:
            result.saved = X.save_one(loaded, units, config, save_pruned, save_criterion, save_fraction, run_dir)
        return result

    from moeaudit.report._prune import write_prune_report

    return _in_session(plan, run_dir, progress, "moeaudit prune-eval", work, write_prune_report, report)


@dataclass
class _FoldView:
    """A :class:`Loaded` seen through one fold: ``calibration`` / ``evaluation`` are that fold's."""

    loaded: Loaded
    fold: Any

    def __getattr__(self, name: str):
        return getattr(self.fold if name in ("calibration", "evaluation", "eval_docs") else self.loaded, name)


def _loo(loaded, run_dir: RunDirectory, s, progress: ProgressSink) -> pd.DataFrame:
    from moeaudit.pruning._units import loo_costs

    table = run_dir.read_parquet("loo.parquet")
    if table is None:
        progress.stage(f"exact single-removal costs ({len(loaded.layers) * loaded.geometry.n_experts} removals)",
                       len(loaded.layers) * loaded.geometry.n_experts)
        with s.timer("loo"):
            table = loo_costs(loaded.model, loaded.calibration, loaded.layers, loaded.geometry.n_experts,
                              progress=progress.advance)
        run_dir.write_parquet("loo.parquet", table)
    return table


def _attribution(config: PruneConfig, loaded, run_dir: RunDirectory, s, progress: ProgressSink):
    """The attribution importance map of the (fold's) calibration split in the run's mode (``attribution``
    criterion; ``attribution_importance.parquet``, reused on resume)."""
    from moeaudit.intervene._attribution import attribute, attribution_importance

    table = run_dir.read_parquet("attribution_importance.parquet")
    if table is None:
        progress.stage("attribution on the calibration split", None)
        with s.timer("attribution"):
            rows = attribute(loaded.model, loaded.calibration, layers=loaded.layers, modes=(config.mode,))
            table = attribution_importance(rows, [config.mode], loaded.geometry.n_experts)
        run_dir.write_parquet("attribution_importance.parquet", table)
    return table


def _metrics(loaded: Loaded, run_dir: RunDirectory, s, progress: ProgressSink, criteria: list[str]):
    from moeaudit.observation._observe import observe

    if not [c for c in criteria if c not in (CAUSAL, RANDOM, CAUSAL_LOO)]:
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
              progress: ProgressSink, *, means: dict | None = None) -> PruneResult:
    from moeaudit.pruning._compare import (
        allocation_table,
        answer_table,
        fold_agreement,
        loss_tables,
        per_layer_effects,
    )
    from moeaudit.pruning._units import pruned_table, sequence_losses

    run_dir.write_parquet("pruned.parquet", pruned_table(units))
    folds = {f.fold: f for f in loaded.folds}
    distinct = {u.loss_key: u for u in units}
    losses: dict[str, np.ndarray] = {}
    pending = []
    for key, unit in distinct.items():
        n_tokens = int(folds[unit.fold].eval_docs.size)
        stored = run_dir.read_parquet(f"losses/{key}.parquet")
        if stored is not None and len(stored) == n_tokens:
            losses[key] = stored["loss"].to_numpy(dtype=np.float64)
        elif stored is not None:
            raise RunDirectoryError(f"{run_dir.path / 'losses' / (key + '.parquet')} holds {len(stored)} losses, "
                                    f"expected {n_tokens}: it is damaged. Delete it and run again to recompute it.")
        else:
            pending.append(key)
    progress.stage(f"evaluating {len(pending)} pruned models ({len(distinct) - len(pending)} resumed, "
                   f"{len(units)} units, {len(folds)} folds)",
                   sum(len(folds[distinct[k].fold].evaluation) for k in pending))
    for key in pending:
        unit = distinct[key]
        with s.timer("evaluate"):
            loss = sequence_losses(loaded.model, folds[unit.fold].evaluation, unit.removal or None,
                                   progress=progress.advance, method=unit.method,
                                   means=(means or {}).get(unit.fold))
        run_dir.write_parquet(f"losses/{key}.parquet", pd.DataFrame({"loss": loss}))
        losses[key] = loss
    progress.stage("paired tests", None)
    eval_docs = {k: f.eval_docs for k, f in folds.items()}
    with s.timer("tests"):
        prune, per_layer = loss_tables(units, losses)
        answer = answer_table(units, losses, eval_docs, alpha=config.alpha, n_perm=config.n_perm,
                              n_boot=config.n_boot, seed=config.seed)
        agreement = fold_agreement(prune, answer)
        allocations = allocation_table(units, losses, eval_docs, n_perm=config.n_perm, n_boot=config.n_boot,
                                       seed=config.seed) if len(config.allocation) > 1 else None
        effects = per_layer_effects(units, losses, eval_docs) if config.per_layer else None
        methods = None
        if len(config.method) > 1:
            from moeaudit.pruning._extras import method_comparison

            methods = method_comparison(units, losses, eval_docs, alpha=config.alpha, n_perm=config.n_perm,
                                        n_boot=config.n_boot, seed=config.seed)
    run_dir.write_text("prune.csv", prune.to_csv(index=False))
    run_dir.write_text("answer.csv", answer.to_csv(index=False))
    run_dir.write_text("fold_agreement.csv", agreement.to_csv(index=False))
    if allocations is not None:
        run_dir.write_text("allocation.csv", allocations.to_csv(index=False))
    if methods is not None:
        run_dir.write_text("methods.csv", methods.to_csv(index=False))
    if config.per_layer:
        run_dir.write_text("prune_per_layer.csv", per_layer.to_csv(index=False))
        run_dir.write_text("per_layer.csv", effects.to_csv(index=False))
    return PruneResult(run_dir.path, prune, answer, pruned_table(units), None,
                       per_layer if config.per_layer else None, effects, agreement=agreement, methods=methods)


__all__ = ["MapResult", "PruneResult", "importance_map", "prune_eval"]
