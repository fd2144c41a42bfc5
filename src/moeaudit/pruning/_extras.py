"""The parts of a prune-eval run beyond deletion: mean replacement's constants, super experts and their
protection, the parameters and bytes each pruning removes, and writing several pruned checkpoints.

Files of the run directory written here::

    fold<k>/expert_means.parquet  c_e of every pruned layer's experts on fold k's calibration split (unpruned
                                  model; ``--method mean``)
    super_experts.csv      per fold, the experts whose single removal costs most on its calibration split
                           (``--protect-top K``: those K are kept in that fold's prunings)
    methods.csv            mean replacement against deletion of the same experts (``--method delete,mean``)
    sizes.csv              parameters and bytes removed per (fraction, method)

``--save-pairs`` syntax: comma-separated ``CRITERION@FRACTION`` pairs, e.g. ``reap@0.25,causal@0.5``; each pruned
checkpoint (experts deleted) is written to ``<--save-pruned>/<criterion>@<fraction>/`` (``random``: the run's first
seed). Every pair is checked before any work: a criterion and a fraction of the run, no pair twice, the run's
``method`` includes ``delete`` (a mean-replaced expert is not a standard checkpoint), and no target directory that
exists and is not empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moeaudit.errors import ConfigError

SAVE_SEPARATOR = "@"


def parse_save_pairs(text: str | Sequence | None) -> list[tuple[str, float]]:
    """``"reap@0.25,causal@0.5"`` (or a list of such strings / ``(criterion, fraction)`` pairs) as pairs.

    Raises:
        ConfigError: a pair without ``@``, or a fraction that is not a number.
    """
    if text is None:
        return []
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    pairs = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            criterion, fraction = item
        else:
            criterion, sep, fraction = str(item).rpartition(SAVE_SEPARATOR)
            if not sep or not criterion:
                raise ConfigError(f"--save-pairs {item!r}: write each pair as CRITERION{SAVE_SEPARATOR}FRACTION, "
                                  f"e.g. reap{SAVE_SEPARATOR}0.25,causal{SAVE_SEPARATOR}0.5.")
        try:
            pairs.append((str(criterion), float(fraction)))
        except ValueError:
            raise ConfigError(f"--save-pairs {item!r}: the fraction {fraction!r} is not a number; e.g. "
                              f"reap{SAVE_SEPARATOR}0.25.") from None
    if not pairs:
        raise ConfigError("--save-pairs is empty; give CRITERION@FRACTION pairs, e.g. reap@0.25.")
    return pairs


def save_directory(root: Path, criterion: str, fraction: float) -> Path:
    return Path(root) / f"{criterion}{SAVE_SEPARATOR}{fraction:g}"


def check_save_pairs(pairs: list[tuple[str, float]], root: Path | None, config, criteria: list[str]) -> None:
    """Refuse, before any work, pairs the run cannot write (see the module docstring)."""
    if root is not None and "delete" not in config.method:
        raise ConfigError(f"--save-pruned writes checkpoints with the experts deleted, but method="
                          f"{','.join(config.method)}; add delete (a mean-replaced expert is no standard module).")
    if not pairs:
        return
    if root is None:
        raise ConfigError("--save-pairs needs --save-pruned DIR: the checkpoints go to DIR/<criterion>@<fraction>/.")
    seen = set()
    for criterion, fraction in pairs:
        if criterion not in criteria:
            raise ConfigError(f"--save-pairs {criterion}@{fraction:g}: {criterion!r} is not a criterion of this "
                              f"run; choose one of {', '.join(criteria)}.")
        if fraction not in config.fractions:
            raise ConfigError(f"--save-pairs {criterion}@{fraction:g}: {fraction:g} is not a fraction of this run; "
                              f"choose one of {', '.join(f'{f:g}' for f in config.fractions)}.")
        if (criterion, fraction) in seen:
            raise ConfigError(f"--save-pairs names {criterion}@{fraction:g} twice; name each pair once.")
        seen.add((criterion, fraction))
        target = save_directory(root, criterion, fraction)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ConfigError(f"--save-pairs: {target} exists and is not an empty directory; choose another "
                              "--save-pruned directory or remove it.")


def save_pairs(loaded, units, config, pairs: list[tuple[str, float]], root: Path, run_dir) -> list[Path]:
    """Write every pair's checkpoint (experts deleted; the uniform allocation as ranked on fold 0's calibration
    split); returns their directories."""
    from moeaudit.pruning._slice import save_pruned

    out = []
    for criterion, fraction in pairs:
        unit = next(u for u in units if u.criterion == criterion and u.fraction == fraction and u.layer is None
                    and u.method == "delete" and u.allocation == "uniform" and u.fold == 0)
        provenance: dict[str, Any] = {"criterion": criterion, "fraction": fraction, "seed": unit.seed, "fold": 0,
                                      "allocation": "uniform", "method": "delete",
                                      "source_model": config.model, "run_directory": str(run_dir.path)}
        out.append(save_pruned(loaded.model, unit.removal, save_directory(root, criterion, fraction),
                               tokenizer=loaded.tokenizer, provenance=provenance))
    return out


def save_plan(config, criteria: list[str], save_pruned, save_criterion: str | None, save_fraction: float | None,
              save_pairs) -> tuple[list[tuple[str, float]], str | None, float | None, Path | None]:
    """Check, before any work, the checkpoints a prune-eval is asked to write; returns the ``--save-pairs`` pairs,
    the (``--save-criterion``, ``--save-fraction``) of a single checkpoint (filled in when the run has one
    criterion and one fraction) and the ``--save-pruned`` directory resolved (a single checkpoint's must be new or
    empty: :func:`moeaudit.pruning._slice.check_save_target`).

    Raises:
        ConfigError: both kinds named, a pair the run cannot write, a missing criterion or fraction, no uniform
            allocation, or a model spread by ``device_map``.
        FileExistsError: a single checkpoint's directory is a file or not empty.
    """
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
    if save_pruned is not None and "uniform" not in config.allocation:
        raise ConfigError(f"--save-pruned writes a standard checkpoint, whose config has one expert count for every "
                          f"layer, but allocation={','.join(config.allocation)} removes different numbers per "
                          "layer; add uniform to allocation= (the checkpoint is the uniform pruning; "
                          "pruned.parquet lists every other pruning's removed experts).")
    if save_pruned is not None and not pairs:
        from moeaudit.pruning._slice import check_save_target

        save_pruned = check_save_target(save_pruned)  # before any work, not after it
    elif save_pruned is not None:
        save_pruned = Path(save_pruned).expanduser().resolve()
    if save_pruned is not None and config.device_map is not None:
        raise ConfigError(f"--save-pruned slices the checkpoint from the loaded model, which needs it whole on one "
                          f"device, but device_map={config.device_map!r} spreads it (and may offload weights); run "
                          "without device_map= to write the pruned checkpoint (pruned.parquet lists the removed "
                          "experts of every pruned model).")
    return pairs, save_criterion, save_fraction, save_pruned


def check_save(config, criteria: list[str], geometry, layers, save_criterion, save_fraction) -> None:
    """Refuse a checkpoint (criterion, fraction) the run cannot write, once the model's layers are known."""
    if save_criterion not in criteria:
        raise ConfigError(f"--save-criterion {save_criterion!r} is not a criterion of this run; choose one of "
                          f"{', '.join(criteria)}.")
    if save_fraction not in config.fractions:
        raise ConfigError(f"--save-fraction {save_fraction} is not a fraction of this run; choose one of "
                          f"{', '.join(map(str, config.fractions))}.")
    if tuple(layers) != tuple(geometry.moe_layers):
        raise ConfigError("--save-pruned needs every MoE layer pruned (a checkpoint has one expert count for all "
                          "layers); leave layers= unset.")


def save_one(loaded, units, config, out, criterion: str, fraction: float, run_dir) -> Path:
    """``--save-pruned`` with one (criterion, fraction): the uniform pruning of fold 0, experts deleted."""
    from moeaudit.pruning._slice import save_pruned as save

    unit = next(u for u in units if u.criterion == criterion and u.fraction == fraction and u.layer is None
                and u.allocation == "uniform" and u.fold == 0 and u.method == "delete")
    provenance: dict[str, Any] = {"criterion": criterion, "fraction": fraction, "seed": unit.seed,
                                  "fold": 0, "allocation": "uniform", "method": unit.method,
                                  "source_model": config.model, "run_directory": str(run_dir.path)}
    return save(loaded.model, unit.removal, out, tokenizer=loaded.tokenizer, provenance=provenance)


def calibration_means(loaded, run_dir, s, progress):
    """``--method mean``: c_e of every pruned layer on the calibration split (unpruned model), stored in
    ``expert_means.parquet`` and read back on resume."""
    from moeaudit.intervene import ExpertMeans, expert_means

    stored = run_dir.read_parquet("expert_means.parquet")
    if stored is not None:
        means = ExpertMeans.from_frame(stored)
        means.check(loaded.model, loaded.layers)
        return means
    progress.stage("expert means on the calibration split (method mean)", len(loaded.calibration))
    with s.timer("expert means"):
        means = expert_means(loaded.model, loaded.calibration, layers=list(loaded.layers),
                             progress=progress.advance)
    run_dir.write_parquet("expert_means.parquet", means.to_frame())
    return means


def unrouted_summary(means, units) -> dict[str, Any]:
    """For the manifest: per method-mean pruning, how many replaced experts had no calibration token (output 0)."""
    from moeaudit.pruning._mean import unrouted_replaced

    worst = 0
    for u in units:
        if u.method == "mean" and u.layer is None:
            worst = max(worst, sum(len(v) for v in unrouted_replaced(means, u.removal).values()))
    unrouted = {str(layer): means.unrouted(layer) for layer in means.layers if means.unrouted(layer)}
    return {"never_routed_on_calibration": unrouted, "most_replaced_without_mean": worst}


def super_expert_table(config, importance: pd.DataFrame | None, run_dir, layers) -> pd.DataFrame | None:
    """One fold's super experts: the top max(protect_top, 5) experts by single-removal cost on its calibration
    split (``None`` without a map); ``protected`` marks the top ``protect_top``. Written to the fold directory's
    ``super_experts.csv``; the run's ``super_experts.csv`` stacks the folds with a ``fold`` column."""
    from moeaudit.pruning._super import super_experts

    if importance is None:
        return None
    records = None if "removal_cost" in importance.columns else run_dir.read_records()
    table = super_experts(importance, max(config.protect_top, 5), records=records, layers=layers)
    table["protected"] = table["rank"] <= config.protect_top
    run_dir.write_text("super_experts.csv", table.to_csv(index=False))
    return table


#: Columns of :func:`method_comparison` (``methods.csv``).
METHOD_COLUMNS: tuple[str, ...] = ("criterion", "fraction", "allocation", "loss_delete", "loss_mean", "delta_mean",
                                   "ci_low", "ci_high", "p_t", "p_signflip", "p_t_holm", "p_signflip_holm",
                                   "decision", "n_tokens", "n_docs", "n_folds")


def method_comparison(units, losses, eval_docs, *, alpha: float, n_perm: int, n_boot: int,
                      seed: int) -> pd.DataFrame:
    """``methods.csv``: per (criterion, fraction, allocation) of the all-layer prunings, pooled over the
    cross-fitting folds, mean replacement against deletion of the same experts.

    Estimand: δ = token-weighted mean loss(mean-replaced) - mean loss(deleted), the same experts removed (for
    ``random``: the seeds' mean per-token loss under each method), every evaluation document once (each fold's
    losses by the pruned models ranked on that fold's calibration split, concatenated as in
    :func:`moeaudit.pruning._compare.pooled_losses`; ``losses`` keyed by :attr:`PruneUnit.loss_key`, ``eval_docs``
    fold -> document id per token). Unit of inference: the evaluation document
    (:func:`moeaudit.stats.clustered_difference`: CR1 t with documents - 1 df, document sign-flip test, document
    bootstrap 95% interval); p-values Holm-corrected over the rows. ``decision``: ``mean better`` / ``delete
    better`` when both tests reject at ``alpha``, else ``inconclusive``.
    """
    import numpy as np

    from moeaudit.pruning._compare import pooled_losses
    from moeaudit.stats import clustered_difference, correct

    pooled, docs = pooled_losses(units, losses, eval_docs)
    arms: dict[tuple, dict[str, list]] = {}
    for (criterion, fraction, _seed, allocation, method, layer), loss in pooled.items():
        if layer is None and criterion != "none":
            arms.setdefault((criterion, fraction, allocation), {}).setdefault(method, []).append(loss)
    rows = []
    for (criterion, fraction, allocation), by in arms.items():
        if "delete" not in by or "mean" not in by:
            continue
        mean_loss, delete_loss = np.mean(by["mean"], axis=0), np.mean(by["delete"], axis=0)
        d = clustered_difference(mean_loss, delete_loss, docs, n_perm=n_perm, n_boot=n_boot, seed=seed)
        rows.append({"criterion": criterion, "fraction": fraction, "allocation": allocation,
                     "loss_delete": float(delete_loss.mean()), "loss_mean": float(mean_loss.mean()),
                     "delta_mean": d.estimate, "ci_low": d.ci_low, "ci_high": d.ci_high, "p_t": d.p_t,
                     "p_signflip": d.p_signflip, "n_tokens": int(docs.size), "n_docs": int(np.unique(docs).size),
                     "n_folds": len(eval_docs)})
    table = pd.DataFrame(rows, columns=[c for c in METHOD_COLUMNS if c not in ("p_t_holm", "p_signflip_holm",
                                                                               "decision")])
    for column in ("p_t", "p_signflip"):
        p = table[column].to_numpy(dtype=float)
        table[f"{column}_holm"] = correct(p, "holm", alpha).p_corrected if len(p) else p
    table["decision"] = [
        ("mean better" if r.delta_mean < 0 else "delete better")
        if r.p_t_holm < alpha and r.p_signflip_holm < alpha and r.delta_mean != 0 else "inconclusive"
        for r in table.itertuples()]
    return table[list(METHOD_COLUMNS)]
