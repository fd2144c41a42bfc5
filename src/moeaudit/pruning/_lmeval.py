"""Downstream scores of pruned models through lm-evaluation-harness (optional extra ``moeaudit[lmeval]``).

Each pruned model is scored in memory: lm-eval's Hugging Face wrapper (``lm_eval.models.huggingface.HFLM``) is
given the model object itself and runs inside :func:`moeaudit.pruning.pruned`, so no checkpoint is written. Request
caching is off, so every pruned model is really evaluated. Results land in ``lm_eval/<model key>.json`` (one file
per pruned model, so an interrupted run resumes) and ``lm_eval.csv`` (criterion, fraction, seed, task, metric,
value, stderr). Only the all-layer prunings (and the unpruned model) are scored, not the ``--per-layer`` ones.
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
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager or _task_manager(include, tuple(tasks))
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    with pruned(model, removal) if removal else nullcontext():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
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
    return rows


def score_units(config: PruneConfig, loaded, units: Sequence[PruneUnit], run_dir, session, progress) -> pd.DataFrame:
    """Score every all-layer pruning (and the unpruned model) of a run; write ``lm_eval.csv``."""
    targets = [u for u in units if u.layer is None and u.method != "mean"]  # mean replacement: not scored
    distinct = {u.key: u for u in targets}
    stored = {key: run_dir.read_json(f"lm_eval/{key}.json") for key in distinct}
    pending = [key for key, rows in stored.items() if rows is None]
    manager = _task_manager(config.lm_eval_include, tuple(config.lm_eval_tasks)) if pending else None
    progress.stage(f"lm-eval on {len(pending)} pruned models ({len(distinct) - len(pending)} resumed)", len(pending))
    for key in pending:
        with session.timer("lm_eval"):
            rows = lm_eval_scores(loaded.model, loaded.tokenizer, config.lm_eval_tasks,
                                  removal=distinct[key].removal or None, limit=config.lm_eval_limit,
                                  seed=config.seed, bootstrap_iters=config.n_boot, task_manager=manager)
        run_dir.write_json(f"lm_eval/{key}.json", rows)
        stored[key] = rows
        progress.advance(1)
    table = pd.DataFrame([{"criterion": u.criterion, "fraction": u.fraction, "seed": u.seed, "fold": u.fold,
                           "allocation": u.allocation, "method": u.method, **row}
                          for u in targets for row in stored[u.key]], columns=LM_EVAL_COLUMNS)
    run_dir.write_text("lm_eval.csv", table.to_csv(index=False))
    return table
