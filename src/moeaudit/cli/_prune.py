"""``moeaudit map`` and ``moeaudit prune-eval``: the causal importance map, and pruning by criteria against a
random band and the causal reference (thin layers over :func:`moeaudit.importance_map` / :func:`moeaudit.prune_eval`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import (
    RichProgress,
    build_config,
    dry_run_exit,
    escape,
    expected_errors,
    fail,
    flag_names,
    header,
    interrupted,
    make_console,
    rich_table,
)
from moeaudit.pruning._config import MapConfig, PruneConfig

_PRESET_HELP = "a .toml config file or a preset (demo, paper-olmoe, paper-qwen, paper-deepseek); flags override it"


_MAP, _PRUNE = MapConfig(), PruneConfig()  # the built-in defaults the help shows
_ENCODING_HELP = "text encoding of .txt / .jsonl corpora (e.g. latin-1, cp1252)"


def _option(defaults, key: str, help: str | None, shown: str | None = None):
    """A flag that overrides the configuration (``None`` when not given), showing the built-in default (a preset
    or a TOML file may set another)."""
    if shown is None:
        value = getattr(defaults, key, None)
        shown = ("unset" if value is None else ",".join(map(str, value)) if isinstance(value, tuple)
                 else str(value))
    return typer.Option(None, help=help, show_default=shown)


def _flags(cls) -> dict[str, str]:
    return flag_names(*cls.__dataclass_fields__, "trust_remote_code", "out", "report", "save_pruned",
                      "save_criterion", "save_fraction", "save_pairs", "dry_run")


_DRY_RUN_HELP = ("compute nothing: print the plan (cells, ablations, documents, evaluations) and estimates of time, "
                 "peak memory and disk; write OUT/dry-run.json")


def _dry_run(what: str, cfg, out: Path, workload, flags: dict[str, str], trust_remote_code: bool,
             report: bool) -> typer.Exit:
    console = make_console()
    header(console, f"[bold]moeaudit {what} --dry-run[/bold] -> {escape(out)}")
    return dry_run_exit(console, what, cfg, out, workload, flags, trust_remote_code=trust_remote_code,
                        report=report)


def _run(call, out: Path, what: str, flags: dict[str, str]):
    console = make_console()
    start = time.perf_counter()
    header(console, f"[bold]moeaudit {what}[/bold] -> {escape(out)}")
    try:
        with RichProgress(console) as progress:
            result = call(progress)
    except expected_errors() as exc:
        raise fail(exc, flags) from None
    except KeyboardInterrupt as exc:
        raise interrupted(exc, out, "units") from None
    return console, result, time.perf_counter() - start


@app.command("map")
def map_cmd(
    config: str = typer.Argument(None, help=_PRESET_HELP),
    model: str = _option(_MAP, "model", MODEL_HELP),
    name: str = _option(_MAP, "name", "label in the report", "from the model"),
    corpus: str = _option(_MAP, "corpus", "wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    text_field: str = _option(_MAP, "text_field", "field holding the text in .jsonl / .parquet corpora"),
    encoding: str = _option(_MAP, "encoding", _ENCODING_HELP),
    n_docs: int = _option(_MAP, "n_docs", "calibration documents (positions are sampled from them)"),
    max_length: int = _option(_MAP, "max_length", "tokens per document"),
    min_length: int = _option(_MAP, "min_length", "shorter documents are skipped"),
    layers: str = _option(_MAP, "layers", "comma-separated MoE layers, or 'all'", "all"),
    n: int = _option(_MAP, "n", "positions per layer (every active expert is ablated at each); unset: every position "
                     "of the calibration split when positions x layers x top_k <= 250,000 ablations, else 200 "
                     "sampled; a number caps it", "every position (small models) / 200"),
    scope: str = _option(_MAP, "scope", "token or sequence"),
    mode: str = _option(_MAP, "mode", "reroute, zero or renormalize"),
    min_context: int = _option(_MAP, "min_context", "positions need at least this many tokens of context"),
    dtype: str = _option(_MAP, "dtype", "auto, float32, bfloat16, float16"),
    device: str = _option(_MAP, "device", "auto, cpu, cuda, cuda:N, mps"),
    device_map: str = _option(_MAP, "device_map", "spread the model over several devices with accelerate: auto, "
                                                   "balanced, balanced_low_0, sequential, or a .json map"),
    seed: int = _option(_MAP, "seed", "seed of the position sampling (>= 0)"),
    trust_remote_code: bool = typer.Option(False, help="run modelling code shipped with the checkpoint (never "
                                                       "read from a configuration file)"),
    out: Path = _option(_MAP, "out", "run directory; re-running resumes it", "runs/<name>-map"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """The causal importance map: every active expert removed alone at n positions per layer, aggregated per
    (layer, expert) into importance.parquet and a layer x expert heat map."""
    from moeaudit.run._prune import importance_map

    values, flags = locals(), _flags(MapConfig)
    cfg = build_config(MapConfig, config, {f.name: values[f.name] for f in dataclasses.fields(MapConfig)}, flags)
    target = out or Path("runs") / f"{cfg.label}-map"
    if dry_run:
        from moeaudit.run._workloads import map_workload

        raise _dry_run("map", cfg, target, map_workload, flags, trust_remote_code, report)
    console, result, seconds = _run(lambda p: importance_map(cfg, target, progress=p, report=report,
                                                             trust_remote_code=trust_remote_code),
                                    target, "map", flags)
    table = result.importance
    summary = (table.groupby("layer").agg(never_routed=("never_routed", "sum"), max_mean_delta=("mean_delta", "max"),
                                          ablations=("n_routed", "sum")).reset_index())
    console.print(rich_table("causal importance per layer", summary))
    console.print(f"{len(table)} (layer, expert) rows in {seconds:.1f} s -> {escape(target / 'importance.parquet')}",
                  highlight=False)
    if result.report:
        console.print(f"report: {escape(result.report['html'])}", highlight=False)


@app.command("prune-eval")
def prune_eval_cmd(
    config: str = typer.Argument(None, help=_PRESET_HELP),
    model: str = _option(_PRUNE, "model", MODEL_HELP),
    name: str = _option(_PRUNE, "name", "label in the report", "from the model"),
    corpus: str = _option(_PRUNE, "corpus", "calibration corpus (and evaluation corpus unless --eval-corpus)"),
    eval_corpus: str = _option(_PRUNE, "eval_corpus", "evaluation corpus", "the documents of --corpus after the "
                                                                          "calibration ones"),
    text_field: str = _option(_PRUNE, "text_field", "field holding the text in .jsonl / .parquet corpora"),
    encoding: str = _option(_PRUNE, "encoding", _ENCODING_HELP),
    n_docs: int = _option(_PRUNE, "n_docs", "calibration documents"),
    n_docs_eval: int = _option(_PRUNE, "n_docs_eval", "evaluation documents (with --folds >= 2, n_docs + n_docs_eval "
                                                      "documents are dealt into folds)"),
    split_seed: int = _option(_PRUNE, "split_seed", "seed of the document shuffle that makes the splits"),
    stratify_field: str = _option(_PRUNE, "stratify_field", "field of a .jsonl/.parquet corpus to stratify the "
                                                            "splits by", "builtin: its domains; else none"),
    folds: int = _option(_PRUNE, "folds", "cross-fitting folds (calibration and evaluation swap); 1: one split"),
    allocation: str = _option(_PRUNE, "allocation", "comma-separated: uniform, global, causal (how the removed "
                                                    "experts spread over layers, same total)"),
    reference: str = _option(_PRUNE, "reference", "causal reference: removal_cost, or loo (also the exact "
                                                  "single-removal cost of every expert)"),
    max_length: int = _option(_PRUNE, "max_length", "tokens per document"),
    min_length: int = _option(_PRUNE, "min_length", "shorter documents are skipped"),
    layers: str = _option(_PRUNE, "layers", "comma-separated MoE layers to prune, or 'all'", "all"),
    criteria: str = _option(_PRUNE, "criteria", "comma-separated criteria: observe metrics, random, causal", "all"),
    fractions: str = _option(_PRUNE, "fractions", "comma-separated shares of each layer's experts to remove"),
    random_seeds: int = _option(_PRUNE, "random_seeds", "seeds of the random band"),
    per_layer: bool = _option(_PRUNE, "per_layer", "also prune one layer at a time"),
    method: str = _option(_PRUNE, "method", "comma-separated removal methods, each under every criterion: delete "
                                            "(the router can no longer choose the expert) and/or mean (it keeps its "
                                            "router slot and outputs its calibration mean)"),
    protect_top: int = _option(_PRUNE, "protect_top", "never remove the K experts whose single removal costs most "
                                                      "(super experts, from the importance map)"),
    n: int = _option(_PRUNE, "n", "positions per layer of the causal importance map (removal costs); unset: every "
                     "position of the calibration split when positions x layers x top_k <= 250,000 ablations, "
                     "else 200 sampled; a number caps it", "every position (small models) / 200"),
    scope: str = _option(_PRUNE, "scope", "importance map ablation scope: token or sequence"),
    mode: str = _option(_PRUNE, "mode", "importance map ablation mode: reroute, zero or renormalize"),
    min_context: int = _option(_PRUNE, "min_context", "positions need at least this many tokens of context"),
    alpha: float = _option(_PRUNE, "alpha", "family-wise error rate of the paired tests (Holm)"),
    n_boot: int = _option(_PRUNE, "n_boot", "document bootstrap resamples"),
    n_perm: int = _option(_PRUNE, "n_perm", "document sign flips of the permutation test"),
    lm_eval_tasks: str = _option(_PRUNE, "lm_eval_tasks", "comma-separated lm-evaluation-harness tasks "
                                                          "(needs moeaudit\\[lmeval])", "none"),
    lm_eval_include: str = _option(_PRUNE, "lm_eval_include", "directory of extra lm-eval task YAMLs"),
    lm_eval_limit: int = _option(_PRUNE, "lm_eval_limit", "at most this many documents per lm-eval task", "all"),
    dtype: str = _option(_PRUNE, "dtype", "auto, float32, bfloat16, float16"),
    device: str = _option(_PRUNE, "device", "auto, cpu, cuda, cuda:N, mps"),
    device_map: str = _option(_PRUNE, "device_map", "spread the model over several devices with accelerate: auto, "
                                                   "balanced, balanced_low_0, sequential, or a .json map"),
    seed: int = _option(_PRUNE, "seed", "seed of the positions, tie-breaks, random rankings and resampling (>= 0)"),
    trust_remote_code: bool = typer.Option(False, help="run modelling code shipped with the checkpoint (never "
                                                       "read from a configuration file)"),
    out: Path = _option(_PRUNE, "out", "run directory; re-running resumes it", "runs/<name>-prune"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    save_pruned: Path = _option(_PRUNE, "save_pruned", "also write a loadable checkpoint with the experts of "
                                                       "--save-criterion at --save-fraction deleted to this directory"),
    save_criterion: str = _option(_PRUNE, "save_criterion", "criterion of the checkpoint --save-pruned writes",
                                  "the run's only criterion"),
    save_fraction: float = _option(_PRUNE, "save_fraction", "fraction of the checkpoint --save-pruned writes",
                                   "the run's only fraction"),
    save_pairs: str = _option(_PRUNE, "save_pairs", "several checkpoints: comma-separated CRITERION@FRACTION pairs "
                                                    "(e.g. reap@0.25,causal@0.5), each written to "
                                                    "<--save-pruned>/<criterion>@<fraction>/", "none"),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Prune by every criterion at every fraction (in memory), against a random band and the causal reference:
    held-out loss and perplexity, paired tests clustered by document, a verdict; resumable."""
    from moeaudit.run._prune import prune_eval

    values, flags = locals(), _flags(PruneConfig)
    cfg = build_config(PruneConfig, config, {f.name: values[f.name] for f in dataclasses.fields(PruneConfig)},
                       flags)
    target = out or Path("runs") / f"{cfg.label}-prune"
    if dry_run:
        from moeaudit.run._workloads import prune_workload

        raise _dry_run("prune-eval", cfg, target, prune_workload, flags, trust_remote_code, report)
    console, result, seconds = _run(
        lambda p: prune_eval(cfg, target, progress=p, report=report, save_pruned=save_pruned,
                             save_criterion=save_criterion, save_fraction=save_fraction,
                             trust_remote_code=trust_remote_code, save_pairs=save_pairs), target, "prune-eval",
        flags)
    columns = ["criterion", "fraction", "allocation", "method", "mean_loss", "group", "delta_causal",
               "share_random_better", "decision_random"]
    if len(result.tests):
        console.print(rich_table("answer (pooled over folds): criteria against random and the causal reference",
                                 result.tests, columns))
    one_layer = 0 if result.per_layer is None else len(result.per_layer)
    console.print(f"{len(result.prune)} pruned models" + (f" and {one_layer} one-layer prunings" if one_layer else "")
                  + f" evaluated in {seconds:.1f} s -> {escape(target)}", highlight=False)
    if result.saved is not None:
        console.print(f"pruned checkpoint: {escape(result.saved)}", highlight=False)
    for saved in result.saved_pairs:
        console.print(f"pruned checkpoint: {escape(saved)}", highlight=False)
    if result.report:
        console.print(f"report: {escape(result.report['html'])}", highlight=False)
