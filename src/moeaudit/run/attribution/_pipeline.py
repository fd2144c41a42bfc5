"""``moeaudit attribute`` into a run directory (atomic files, resumable per document and per exact cell, bound to
one configuration and one model like ``moeaudit map``; see :mod:`moeaudit.rundir`).

Layout::

    manifest.json, config.toml, splits.json, verification.json
    parts/D0000.parquet ...            attribution rows of each calibration document (resume unit)
    exact/L004-zero.parquet ...        exact single-expert pool of each (layer, mode) (resume unit)
    attribution.parquet                one row per (doc, position, layer, routed expert): weight, estimate_<mode>,
                                       exact_<mode> where the pool ablated it (else NaN)
    attribution_importance.parquet     per (layer, expert, mode): routed share, mean estimate, attr_removal_cost
    tables/attribution.csv             agreement with the exact pool per (layer, mode)
    report.md, report.html, figures/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moeaudit.run._prune import _in_session
from moeaudit.run._prune_preflight import preflight_map
from moeaudit.run.attribution._config import AttributeConfig
from moeaudit.run.pipeline import ProgressSink, SilentProgress
from moeaudit.rundir import RunDirectory

#: Row identity shared by the attribution rows and the exact pool.
KEYS: tuple[str, ...] = ("doc_id", "position", "layer", "expert")


@dataclass
class AttributionResult:
    """What :func:`attribution_run` produced (the tables are also files of the run directory)."""

    directory: Path
    attribution: pd.DataFrame
    importance: pd.DataFrame
    agreement: pd.DataFrame
    report: dict[str, Path] = field(default_factory=dict)


def attribution_run(config: AttributeConfig, out: str | Path, *, progress: ProgressSink | None = None,
                    report: bool = True, trust_remote_code: bool = False) -> AttributionResult:
    """Compute (or resume) attribution estimates of ``config`` and their agreement with exact ablations into ``out``.

    Every position of the ``n_docs`` calibration documents gets ``estimate_<mode>`` for each routed expert of each
    layer (:func:`moeaudit.attribute`); at ``n_exact`` sampled positions per layer every active expert is also
    ablated exactly in each mode (the map's single-expert pool), and :func:`agreement_table` compares the two.

    Raises:
        RunDirectoryError: ``out`` is a file, holds another run or another model's, or is in use.
        ModelSourceError, CorpusError, ConfigError: refused before any work (nothing is left on disk).
        VerificationError: the engine's verification suite failed; no exact ablation was collected.
    """
    progress = progress or SilentProgress()
    plan = preflight_map(config, out, trust_remote_code=trust_remote_code)
    from moeaudit.report._attribution import write_attribution_report  # after the checks: torch, matplotlib

    run_dir = RunDirectory(out)

    def work(s) -> AttributionResult:
        from moeaudit.run._prune_loading import load_splits

        loaded = load_splits(plan, run_dir, s, progress, evaluation=False)
        return _attribute(plan.config, loaded, run_dir, s, progress)

    return _in_session(plan, run_dir, progress, "moeaudit attribute", work, write_attribution_report, report)


def _attribute(config: AttributeConfig, loaded, run_dir: RunDirectory, s, progress: ProgressSink):
    from moeaudit.experiments import CleanStates, ExperimentSettings
    from moeaudit.intervene._attribution import attribute_sequence
    from moeaudit.intervene._verify import verify
    from moeaudit.pruning._importance import collect_pool
    from moeaudit.run.attribution._agreement import agreement_table, removal_costs

    model, docs, layers = loaded.model, loaded.calibration, list(loaded.layers)
    n_experts = loaded.geometry.n_experts
    modes = list(config.modes)
    states = CleanStates(model, docs, layers=layers)  # one clean pass per document, shared by both stages
    pending = [i for i in range(len(docs)) if not (run_dir.path / _part(i)).is_file()]
    progress.stage(f"attribution ({len(pending)} documents to go, {len(docs) - len(pending)} resumed)", len(pending))
    for i in pending:
        with s.timer("attribution"):
            frame = attribute_sequence(model, docs[i].input_ids, layers=layers, modes=modes,
                                       state=states.ablator(i).state, seq_id=i, doc_id=docs[i].doc_index)
        run_dir.write_parquet(_part(i), frame)
        progress.advance(1)
    cells = [(layer, mode) for layer in layers for mode in modes if run_dir.read_parquet(_cell(layer, mode)) is None]
    if cells:
        progress.stage("verifying the ablation engine", None)
        with s.timer("verification"):
            check = verify(model, loaded.tokenizer, docs[:2], seed=config.seed, modes=tuple(modes))
        run_dir.write_json("verification.json", check.to_dict())
        check.raise_if_failed()
        progress.stage(f"exact single-expert pool ({len(cells)} layer x mode cells)", config.n_exact * len(cells))
        for layer, mode in cells:
            settings = ExperimentSettings(layers=tuple(layers), n=config.n_exact, seed=config.seed, scope="token",
                                          mode=mode, min_context=config.min_context, model_name=config.label)
            with s.timer(f"exact L{layer} {mode}"):
                pool = collect_pool(model, docs, settings, layer, progress=progress.advance, states=states)
            run_dir.write_parquet(_cell(layer, mode), _exact_rows(pool, docs, mode))
    progress.stage("agreement with the exact pool", None)
    attribution = pd.concat([run_dir.read_parquet(_part(i)) for i in range(len(docs))], ignore_index=True)
    for mode in modes:
        exact = pd.concat([run_dir.read_parquet(_cell(layer, mode)) for layer in layers], ignore_index=True)
        attribution = attribution.merge(exact, on=list(KEYS), how="left", validate="one_to_one")
    run_dir.write_parquet("attribution.parquet", attribution)
    importance = removal_costs(attribution, modes, n_experts)
    run_dir.write_parquet("attribution_importance.parquet", importance)
    with s.timer("agreement"):
        joined = attribution.dropna(subset=[f"exact_{m}" for m in modes], how="all")
        table = agreement_table(joined, importance, modes, n_experts, seed=config.seed)
    (run_dir.path / "tables").mkdir(exist_ok=True)
    run_dir.write_text("tables/attribution.csv", table.to_csv(index=False))
    return AttributionResult(run_dir.path, attribution, importance, table)


def _exact_rows(pool: pd.DataFrame, docs, mode: str) -> pd.DataFrame:
    """The pool's ΔL keyed like the attribution rows (``doc_id`` = the document's index in its source)."""
    pool = pool[pool["experiment"] == "pool"]
    doc_of = np.array([q.doc_index for q in docs], dtype=np.int64)
    return pd.DataFrame({"doc_id": doc_of[pool["seq_id"].to_numpy(np.int64)],
                         "position": pool["position"].to_numpy(np.int64),
                         "layer": pool["layer"].to_numpy(np.int64),
                         "expert": np.array([int(e[0]) for e in pool["ablated_experts"]], dtype=np.int64),
                         f"exact_{mode}": pool["delta"].to_numpy(float)})


def _part(i: int) -> str:
    return f"parts/D{i:04d}.parquet"


def _cell(layer: int, mode: str) -> str:
    return f"exact/L{layer:03d}-{mode}.parquet"
