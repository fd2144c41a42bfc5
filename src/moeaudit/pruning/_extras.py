"""The parts of a prune-eval run beyond deletion that are pure computation: ``--save-pairs`` parsing and its
checks, mean replacement's manifest summary and its comparison with deletion (``methods.csv``). The run machinery
that computes and writes the rest (expert means, super experts, checkpoints) is :mod:`moeaudit.run._prune_extras`.

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


def unrouted_summary(means, units) -> dict[str, Any]:
    """For the manifest: per method-mean pruning, how many replaced experts had no calibration token (output 0)."""
    from moeaudit.pruning._mean import unrouted_replaced

    worst = 0
    for u in units:
        if u.method == "mean" and u.layer is None:
            worst = max(worst, sum(len(v) for v in unrouted_replaced(means, u.removal).values()))
    unrouted = {str(layer): means.unrouted(layer) for layer in means.layers if means.unrouted(layer)}
    return {"never_routed_on_calibration": unrouted, "most_replaced_without_mean": worst}


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
