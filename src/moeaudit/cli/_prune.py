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
    escape,
    expected_errors,
    fail,
    flag_names,
    interrupted,
    make_console,
    rich_table,
)

_PRESET_HELP = "a .toml config file or a preset (demo, paper-olmoe, paper-qwen, paper-deepseek); flags override it"


_ENCODING_HELP = "text encoding of .txt / .jsonl corpora (e.g. latin-1, cp1252; default utf-8)"


def _flags(cls) -> dict[str, str]:
    return flag_names(*cls.__dataclass_fields__, "trust_remote_code", "out", "report", "save_pruned",
                      "save_criterion", "save_fraction")


def _run(call, out: Path, what: str, flags: dict[str, str]):
    console = make_console()
    start = time.perf_counter()
    console.print(f"[bold]moeaudit {what}[/bold] -> {escape(out)}", highlight=False)
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
    model: str = typer.Option(None, help=MODEL_HELP), name: str = typer.Option(None, help="label in the report"),
    corpus: str = typer.Option(None, help="wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    text_field: str = typer.Option(None, help="field holding the text in .jsonl / .parquet corpora"),
    encoding: str = typer.Option(None, help=_ENCODING_HELP),
    n_docs: int = typer.Option(None, help="calibration documents (positions are sampled from them)"),
    max_length: int = typer.Option(None, help="tokens per document"),
    min_length: int = typer.Option(None, help="shorter documents are skipped"),
    layers: str = typer.Option(None, help="comma-separated MoE layers, or 'all'"),
    n: int = typer.Option(None, help="sampled positions per layer (every active expert is ablated at each)"),
    scope: str = typer.Option(None, help="token or sequence"),
    mode: str = typer.Option(None, help="reroute (default), zero or renormalize"),
    min_context: int = typer.Option(None, help="positions need at least this many tokens of context"),
    dtype: str = typer.Option(None, help="auto, float32, bfloat16, float16"),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps"),
    seed: int = typer.Option(None),
    trust_remote_code: bool = typer.Option(False, help="run modelling code shipped with the checkpoint (never "
                                                         "read from a configuration file)"),
    out: Path = typer.Option(None, help="run directory (default: runs/<name>-map); re-running resumes it"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
) -> None:
    """The causal importance map: every active expert removed alone at n positions per layer, aggregated per
    (layer, expert) into importance.parquet and a layer x expert heat map."""
    from moeaudit.pruning import MapConfig, importance_map

    values, flags = locals(), _flags(MapConfig)
    cfg = build_config(MapConfig, config, {f.name: values[f.name] for f in dataclasses.fields(MapConfig)}, flags)
    target = out or Path("runs") / f"{cfg.label}-map"
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
    model: str = typer.Option(None, help=MODEL_HELP), name: str = typer.Option(None, help="label in the report"),
    corpus: str = typer.Option(None, help="calibration corpus (and evaluation corpus unless --eval-corpus)"),
    eval_corpus: str = typer.Option(None, help="evaluation corpus (default: the documents of --corpus after the "
                                               "calibration ones)"),
    text_field: str = typer.Option(None, help="field holding the text in .jsonl / .parquet corpora"),
    encoding: str = typer.Option(None, help=_ENCODING_HELP),
    n_docs: int = typer.Option(None, help="calibration documents"),
    n_docs_eval: int = typer.Option(None, help="evaluation documents (disjoint from the calibration ones)"),
    max_length: int = typer.Option(None, help="tokens per document"),
    min_length: int = typer.Option(None, help="shorter documents are skipped"),
    layers: str = typer.Option(None, help="comma-separated MoE layers to prune, or 'all'"),
    criteria: str = typer.Option(None, help="comma-separated criteria: observe metrics, random, causal (default: "
                                            "all)"),
    fractions: str = typer.Option(None, help="comma-separated shares of each layer's experts to remove "
                                             "(default 0.125,0.25,0.5)"),
    random_seeds: int = typer.Option(None, help="seeds of the random band (default 5)"),
    per_layer: bool = typer.Option(None, help="also prune one layer at a time"),
    n: int = typer.Option(None, help="positions per layer of the causal importance map"),
    scope: str = typer.Option(None, help="importance map ablation scope: token or sequence"),
    mode: str = typer.Option(None, help="importance map ablation mode: reroute (default), zero or renormalize"),
    min_context: int = typer.Option(None, help="positions need at least this many tokens of context"),
    alpha: float = typer.Option(None, help="family-wise error rate of the paired tests (Holm)"),
    n_boot: int = typer.Option(None, help="document bootstrap resamples"),
    n_perm: int = typer.Option(None, help="document sign flips of the permutation test"),
    lm_eval_tasks: str = typer.Option(None, help="comma-separated lm-evaluation-harness tasks (moeaudit[lmeval])"),
    lm_eval_include: str = typer.Option(None, help="directory of extra lm-eval task YAMLs"),
    lm_eval_limit: int = typer.Option(None, help="at most this many documents per lm-eval task"),
    dtype: str = typer.Option(None, help="auto, float32, bfloat16, float16"),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps"),
    seed: int = typer.Option(None),
    trust_remote_code: bool = typer.Option(False, help="run modelling code shipped with the checkpoint (never "
                                                         "read from a configuration file)"),
    out: Path = typer.Option(None, help="run directory (default: runs/<name>-prune); re-running resumes it"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    save_pruned: Path = typer.Option(None, help="also write a loadable checkpoint with the experts of "
                                                "--save-criterion at --save-fraction deleted to this directory"),
    save_criterion: str = typer.Option(None, help="criterion of the checkpoint --save-pruned writes"),
    save_fraction: float = typer.Option(None, help="fraction of the checkpoint --save-pruned writes"),
) -> None:
    """Prune by every criterion at every fraction (in memory), against a random band and the causal reference:
    held-out loss and perplexity, paired tests clustered by document, a verdict; resumable."""
    from moeaudit.pruning import PruneConfig, prune_eval

    values, flags = locals(), _flags(PruneConfig)
    cfg = build_config(PruneConfig, config, {f.name: values[f.name] for f in dataclasses.fields(PruneConfig)},
                       flags)
    target = out or Path("runs") / f"{cfg.label}-prune"
    console, result, seconds = _run(
        lambda p: prune_eval(cfg, target, progress=p, report=report, save_pruned=save_pruned,
                             save_criterion=save_criterion, save_fraction=save_fraction,
                             trust_remote_code=trust_remote_code), target, "prune-eval", flags)
    columns = ["criterion", "fraction", "mean_loss", "delta_random", "vs_random_docs", "vs_random", "delta_causal",
               "vs_causal"]
    if len(result.tests):
        console.print(rich_table("pruning against random and the causal reference", result.tests, columns))
    one_layer = 0 if result.per_layer is None else len(result.per_layer)
    console.print(f"{len(result.prune)} pruned models" + (f" and {one_layer} one-layer prunings" if one_layer else "")
                  + f" evaluated in {seconds:.1f} s -> {escape(target)}", highlight=False)
    if result.saved is not None:
        console.print(f"pruned checkpoint: {escape(result.saved)}", highlight=False)
    if result.report:
        console.print(f"report: {escape(result.report['html'])}", highlight=False)
