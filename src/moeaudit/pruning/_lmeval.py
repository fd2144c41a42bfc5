"""Downstream scores of pruned models through lm-evaluation-harness (optional extra ``moeaudit[lmeval]``).

Each pruned model is scored in memory: lm-eval's Hugging Face wrapper (``lm_eval.models.huggingface.HFLM``) is
given the model object itself and runs inside :func:`moeaudit.pruning.pruned`, so no checkpoint is written. Request
caching is off, so every pruned model is really evaluated. Results land in ``lm_eval/<model key>.json`` and
``lm_eval/<model key>.items.parquet`` (one pair per pruned model, so an interrupted run resumes), ``lm_eval.csv``
(criterion, fraction, seed, fold, allocation, method, task, metric, value, stderr: lm-eval's aggregates) and
``lm_eval_items/<task>.parquet`` (one row per pruned model and item: the key columns, ``key``, ``item`` (lm-eval's
``doc_id``) and one column per metric with the item's own value: 0/1 for ``acc``, the item's log-likelihood for
metrics lm-eval aggregates as a perplexity). Only the all-layer deletions (and the unpruned model) are scored, not
the ``--per-layer`` ones nor the mean replacements (``--method mean``). The paired statistics on the items are in :mod:`moeaudit.pruning._lmeval_stats`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import pandas as pd
from torch import nn

from moeaudit.errors import ConfigError, did_you_mean
from moeaudit.pruning._config import PruneConfig
from moeaudit.pruning._hook import pruned
from moeaudit.pruning._units import PruneUnit

#: lm-eval aggregations whose per-item value is a log-likelihood (higher is better item by item).
_LOGLIK_AGGREGATIONS = frozenset({"perplexity"})
ITEM_COLUMNS = ["task", "metric", "item", "value", "higher_is_better"]
LM_EVAL_COLUMNS = ["criterion", "fraction", "seed", "fold", "allocation", "method", "task", "metric", "value", "stderr"]
_INSTALL = "pip install 'moeaudit[lmeval]' (lm-evaluation-harness)"


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index; only the include directory when it holds every task asked for (indexing lm-eval's
    ~15,000 built-in task files takes tens of seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(f"lm_eval_tasks= needs lm-evaluation-harness, which is not installed: {_INSTALL}.") \
            from exc
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
        return TaskManager(include_path=include)
    return TaskManager()


def check_lm_eval(config: PruneConfig) -> None:
    """Refuse, before any work, a missing lm-eval install, a missing include directory or an unknown task."""
    from pathlib import Path

    if config.lm_eval_include is not None and not Path(config.lm_eval_include).is_dir():
        raise ConfigError(f"lm_eval_include={config.lm_eval_include!r} is not a directory; pass the directory that "
                          "holds your task YAML files.")
    known = _task_manager(config.lm_eval_include, tuple(config.lm_eval_tasks)).all_tasks
    for task in config.lm_eval_tasks:
        if task not in known:
            raise ConfigError(f"lm_eval_tasks={','.join(config.lm_eval_tasks)}: {task!r} is not an lm-eval task"
                              f"{did_you_mean(task, known)} (for a local task, pass the directory of its YAML as "
                              "lm_eval_include=).")


def lm_eval_scores(model: nn.Module, tokenizer, tasks: Sequence[str], *, removal: dict | None = None,
                   include: str | None = None, limit: int | None = None, seed: int = 0,
                   bootstrap_iters: int = 1000, task_manager=None) -> list[dict]:
    """Score ``model`` (pruned in memory by ``removal`` when given) on lm-eval ``tasks``.

    Returns:
        One dict per (task, metric): ``task, metric, value, stderr`` (NaN where lm-eval gives no stderr).
    """
    return lm_eval_run(model, tokenizer, tasks, removal=removal, include=include, limit=limit, seed=seed,
                       bootstrap_iters=bootstrap_iters, task_manager=task_manager)[0]


def lm_eval_run(model: nn.Module, tokenizer, tasks: Sequence[str], *, removal: dict | None = None,
                include: str | None = None, limit: int | None = None, seed: int = 0, bootstrap_iters: int = 1000,
                task_manager=None) -> tuple[list[dict], pd.DataFrame]:
    """:func:`lm_eval_scores` and the per-item values behind them.

    Returns:
        The aggregate rows, and one row per (task, metric, item) with columns :data:`ITEM_COLUMNS`: ``value`` is
        the item's own value of the metric (lm-eval's ``log_samples``; for metrics aggregated as a perplexity, the
        item's log-likelihood, so ``higher_is_better`` is True there whatever the aggregate's direction). Metrics
        whose per-item value is not one number (e.g. ``word_perplexity``'s (log-likelihood, words) pairs) are left
        out of the items.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager or _task_manager(include, tuple(tasks))
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    with pruned(model, removal) if removal else nullcontext():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=True, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      cache_requests=False)
    rows = []
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else key, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else np.nan})
    return rows, _items(out)


def _items(out: dict) -> pd.DataFrame:
    items = []
    for task, samples in (out.get("samples") or {}).items():
        config = (out.get("configs") or {}).get(task, {}) or {}
        aggregation = {m.get("metric"): m.get("aggregation") for m in config.get("metric_list") or []
                       if isinstance(m, dict)}
        direction = (out.get("higher_is_better") or {}).get(task, {}) or {}
        for sample in samples:
            filt = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if not isinstance(value, (bool, int, float, np.number)):
                    continue
                loglik = aggregation.get(metric) in _LOGLIK_AGGREGATIONS
                items.append({"task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                              "item": int(sample["doc_id"]), "value": float(value),
                              "higher_is_better": True if loglik else bool(direction.get(metric, True))})
    return pd.DataFrame(items, columns=ITEM_COLUMNS)


def score_units(config: PruneConfig, loaded, units: Sequence[PruneUnit], run_dir, session, progress) -> pd.DataFrame:
    """Score every all-layer pruning (and the unpruned model) of a run; write ``lm_eval.csv`` and
    ``lm_eval_items/<task>.parquet`` (module docstring). The per-item table, long, is ``table.attrs["items"]``.
    Mean-replacement units are not scored (their rows are left out of both)."""
    targets = [u for u in units if u.layer is None and u.method != "mean"]  # mean replacement: not scored
    distinct = {u.key: u for u in targets}
    stored = {key: run_dir.read_json(f"lm_eval/{key}.json") for key in distinct}
    items = {key: run_dir.read_parquet(f"lm_eval/{key}.items.parquet") for key in distinct}
    pending = [key for key in distinct if stored[key] is None or items[key] is None]
    manager = _task_manager(config.lm_eval_include, tuple(config.lm_eval_tasks)) if pending else None
    progress.stage(f"lm-eval on {len(pending)} pruned models ({len(distinct) - len(pending)} resumed)", len(pending))
    for key in pending:
        with session.timer("lm_eval"):
            rows, per_item = lm_eval_run(loaded.model, loaded.tokenizer, config.lm_eval_tasks,
                                         removal=distinct[key].removal or None, limit=config.lm_eval_limit,
                                         seed=config.seed, bootstrap_iters=config.n_boot, task_manager=manager)
        run_dir.write_parquet(f"lm_eval/{key}.items.parquet", per_item)
        run_dir.write_json(f"lm_eval/{key}.json", rows)
        stored[key], items[key] = rows, per_item
        progress.advance(1)
    keys = {"criterion": None, "fraction": None, "seed": None, "fold": None, "allocation": None, "method": None}
    table = pd.DataFrame([{**{k: getattr(u, k) for k in keys}, **row} for u in targets for row in stored[u.key]],
                         columns=LM_EVAL_COLUMNS)
    run_dir.write_text("lm_eval.csv", table.to_csv(index=False))
    long = pd.concat([items[u.key].assign(**{k: getattr(u, k) for k in keys}, key=u.key) for u in targets],
                     ignore_index=True) if targets else pd.DataFrame(columns=[*keys, "key", *ITEM_COLUMNS])
    for task, part in long.groupby("task"):
        part = part.drop_duplicates(["key", "fold", "item", "metric"])  # a model shared by folds: one row a fold
        values = part.pivot(index=["key", "fold", "item"], columns="metric", values="value").reset_index()
        values.columns.name = None
        units_of = part.drop_duplicates(["key", "fold"])[[*keys, "key"]]
        wide = units_of.merge(values, on=["key", "fold"], how="right")
        run_dir.write_parquet(f"lm_eval_items/{task}.parquet", wide)
    table.attrs["items"] = long
    return table


def write_lm_eval_answer(config: PruneConfig, scores: pd.DataFrame, answer: pd.DataFrame,
                         run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paired item-level statistics of :func:`score_units`'s scores (``lm_eval_answer.csv``, see
    :func:`moeaudit.pruning._lmeval_stats.lm_eval_answer`) and ``answer.csv`` with the scores joined in."""
    from moeaudit.pruning._lmeval_stats import answer_scores, lm_eval_answer

    table = lm_eval_answer(scores.attrs["items"], alpha=config.alpha, n_perm=config.n_perm, n_boot=config.n_boot,
                           seed=config.seed)
    run_dir.write_text("lm_eval_answer.csv", table.to_csv(index=False))
    joined = answer_scores(answer, table)
    run_dir.write_text("answer.csv", joined.to_csv(index=False))
    return table, joined
