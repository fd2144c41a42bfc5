"""``moeaudit run``, ``demo`` and ``report``: audits into run directories, and reports from them."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import RichProgress, build_config, expected_errors, fail, make_console, rich_table


@app.command()
def run(
    config: str = typer.Argument(None, help="a .toml config file or a preset (paper-olmoe, paper-qwen, "
                                            "paper-deepseek, demo); flags override it"),
    model: str = typer.Option(None, help=MODEL_HELP), name: str = typer.Option(None, help="label in the report"),
    corpus: str = typer.Option(None, help="wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    layers: str = typer.Option(None, help="comma-separated MoE layers, or 'all'"),
    metrics: str = typer.Option(None, help="comma-separated observational metrics"),
    experiments: str = typer.Option(None, help="comma-separated: audit, control, rank_validity, progressive, "
                                                "redistribution, stability"),
    n: int = typer.Option(None, help="positions per cell"),
    n_progressive: int = typer.Option(None, help="positions per layer of the progressive ablation"),
    progressive_arms: str = typer.Option(None, help="comma-separated removal orders of the progressive ablation: "
                                                    "highest, lowest, random (default: all three)"),
    progressive_sesoi: float = typer.Option(None, help="equivalence bound (nats) when comparing progressive "
                                                       "arms (default 0.05)"),
    n_docs: int = typer.Option(None, help="documents for the single-expert experiments"),
    n_docs_progressive: int = typer.Option(None, help="documents for the progressive ablation"),
    max_length: int = typer.Option(None, help="tokens per document"),
    min_length: int = typer.Option(None, help="shorter documents are skipped"),
    text_field: str = typer.Option(None, help="field holding the text in .jsonl / .parquet corpora"),
    min_context: int = typer.Option(None, help="positions need at least this many tokens of context"),
    scope: str = typer.Option(None, help="token or sequence"),
    mode: str = typer.Option(None, help="zero, renormalize or reroute"),
    dtype: str = typer.Option(None, help="auto, float32, bfloat16, float16"),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps"),
    device_map: str = typer.Option(None, help="spread the model over several devices with accelerate: auto, "
                                              "balanced, balanced_low_0, sequential, or a .json module->device map"),
    seed: int = typer.Option(None), trust_remote_code: bool = typer.Option(None),
    n_boot: int = typer.Option(None, help="bootstrap resamples of the confidence intervals"),
    sesoi_d: float = typer.Option(None, help="smallest effect of interest (d_z) of the equivalence tests"),
    out: Path = typer.Option(None, help="run directory (default: runs/<name>); re-running resumes it"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    shard: str = typer.Option(None, help="compute only shard I of N (I from 0, e.g. 0/4 or "
                                         "$SLURM_ARRAY_TASK_ID/4) into its own directory; combine the shards with "
                                         "`moeaudit merge`"),
    executor: str = typer.Option("local", help="local (this process) or ray (Ray actors on the cluster at "
                                               "RAY_ADDRESS, else a local one; pip install 'moeaudit\\[ray]')"),
    ray_actors: int = typer.Option(None, help="Ray actors (default: one per GPU, else one per node)"),
    clean_cache: str = typer.Option("auto", help="memory for clean passes shared by every cell: auto (half the "
                                                 "free memory of the device), 0 (none), or a size: 8GiB, 500MB"),
) -> None:
    """Run (or resume) an audit into a run directory: records, summary, report."""
    from moeaudit.config import RunConfig
    from moeaudit.execution import Execution, parse_bytes

    flags = {"model": model, "name": name, "corpus": corpus, "layers": layers, "metrics": metrics,
             "experiments": experiments, "n": n, "n_progressive": n_progressive,
             "progressive_arms": progressive_arms, "progressive_sesoi": progressive_sesoi, "n_docs": n_docs,
             "n_docs_progressive": n_docs_progressive, "max_length": max_length, "min_length": min_length,
             "text_field": text_field, "min_context": min_context, "scope": scope, "mode": mode,
             "dtype": dtype, "device": device, "device_map": device_map, "seed": seed,
             "trust_remote_code": trust_remote_code, "n_boot": n_boot, "sesoi_d": sesoi_d}
    cfg = build_config(RunConfig, config, flags)
    try:
        execution = Execution(executor=executor, shard=shard, ray_actors=ray_actors,
                              clean_cache_bytes=parse_bytes(clean_cache))
    except expected_errors() as exc:
        raise fail(exc) from None
    default = cfg.label if execution.shard is None else \
        f"{cfg.label}-shard-{execution.shard.index}-of-{execution.shard.count}"
    _execute(cfg, out or Path("runs") / default, report, execution)


@app.command()
def demo(out: Path = typer.Option(Path("moeaudit-demo"), help="run directory")) -> None:
    """The whole audit (all five experiments, then the report) on the embedded model and corpus; a couple of
    minutes on 2 CPU cores."""
    from moeaudit.config import preset

    _execute(preset("demo"), out, True)


@app.command("report")
def report_cmd(runs: list[Path] = typer.Argument(..., help="one or more run directories"),
               out: Path = typer.Option(None, help="output directory (default: the run directory for one run, "
                                                   "./moeaudit-report for several)")) -> None:
    """Regenerate the report from stored records; several runs are set side by side."""
    from moeaudit.report import write_report

    target = out or (runs[0] if len(runs) == 1 else Path("moeaudit-report"))
    try:
        paths = write_report(runs, target)
    except expected_errors() as exc:
        raise fail(exc) from None
    make_console().print(f"report: {paths['html']} and {paths['markdown']}, figures in {paths['figures']}")


def _execute(cfg, out: Path, report: bool, execution=None) -> None:
    from moeaudit.pipeline import run_audit

    console = make_console()
    start = time.perf_counter()
    shard = f" (shard {execution.shard})" if execution is not None and execution.shard is not None else ""
    console.print(f"[bold]moeaudit run[/bold] {cfg.label}{shard} -> {out}")
    try:
        with RichProgress(console) as progress:
            result = run_audit(cfg, out, progress=progress, report=report, execution=execution)
    except expected_errors() as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        make_console(stderr=True).print(f"interrupted; finished cells are kept in {out}. Run the same command again to "
                                    "resume.")
        raise typer.Exit(130) from None
    tables = result.tables
    cols = ["layer", "metric", "n", "cohens_d", "p_cluster", "p_signrank_cluster", "decision"]
    if len(tables["audit"]):
        console.print(rich_table("audit (Definition 2.1)", tables["audit"], cols))
    if len(tables["control"]):
        console.print(rich_table("routing-weight control", tables["control"],
                             ["layer", "n", "cohens_d", "p_cluster", "p_signrank_cluster", "spearman_rho",
                              "decision"]))
    arms = tables.get("progressive_arms")
    if arms is not None and len(arms):
        counts = arms["decision"].value_counts()
        console.print(f"progressive removal orders, {len(arms)} paired comparisons: "
                      + ", ".join(f"{int(n)} {decision}" for decision, n in counts.items())
                      + f" (±{arms['sesoi'].iloc[0]:g} nats; details in the report)")
    console.print(f"{len(result.records):,} ablation records ({len(result.computed_cells)} cells computed, "
                  f"{len(result.resumed_cells)} resumed) in {time.perf_counter() - start:.1f} s -> {out}")
    if result.report:
        console.print(f"report: {result.report['html']}")


