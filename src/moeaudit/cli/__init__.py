"""The ``moeaudit`` command line: a thin typer layer over the public API (heavy imports happen inside commands)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Causal audits of Mixture-of-Experts language models.", no_args_is_help=True,
                  add_completion=False)


def _console():
    from rich.console import Console

    return Console()


def _table(title: str, frame, columns: list[str] | None = None):
    from rich.table import Table

    table = Table(title=title)
    frame = frame if columns is None else frame[columns]
    for col in frame.columns:
        table.add_column(str(col))
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


@app.command()
def inspect(model: str = typer.Argument(..., help="hub id, local directory or builtin:tiny-moe"),
            corpus: str = typer.Option("builtin", help="corpus for the routing summary"),
            n: int = typer.Option(4, help="sequences for the routing summary"),
            dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> None:
    """Family, layers, experts, top-k, shared experts, and a routing summary on a few sequences."""
    import moeaudit

    console = _console()
    m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    desc = moeaudit.describe(m)
    for field, value in desc.__dict__.items():
        console.print(f"[bold]{field}[/bold]: {value}")
    seqs = moeaudit.load_corpus(corpus, tok, n_samples=n, min_length=8)
    table = moeaudit.observe(m, [s.input_ids for s in seqs])
    summary = table.groupby("layer").agg(
        busiest=("utilization_rate", "max"), idlest=("utilization_rate", "min"),
        mean_weight=("mean_routing_weight_when_active", "mean"), unused=("routed_count", lambda c: int((c == 0).sum())),
    ).reset_index()
    console.print(_table(f"routing over {len(seqs)} sequences of {corpus}", summary))


@app.command()
def verify(model: str = typer.Option(..., help="hub id, local directory or builtin:tiny-moe"),
           corpus: str = "builtin", n: int = 2, dtype: str = "auto", device: str = "cpu",
           trust_remote_code: bool = False) -> None:
    """Run the verification suite; exit 1 when a check fails."""
    import pandas as pd

    import moeaudit

    m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seqs = moeaudit.load_corpus(corpus, tok, n_samples=n)
    report = moeaudit.verify(m, tok, seqs, modes=("zero", "renormalize", "reroute"))
    _console().print(_table("verification", pd.DataFrame(report.to_dict()["checks"])))
    raise typer.Exit(0 if report.passed else 1)


@app.command()
def audit(model: str = typer.Option("builtin:tiny-moe", help="hub id, local directory or builtin:tiny-moe"),
          corpus: str = typer.Option("builtin", help="wikitext-2, builtin, builtin:train, or a file"),
          layers: str = typer.Option("", help="comma-separated MoE layers (default: all)"),
          metrics: str = typer.Option("", help="comma-separated observe columns (default: the paper's four)"),
          n: int = 200, n_progressive: int = 500, n_docs: int = 100, max_length: int = 512, seed: int = 0,
          scope: str = "token", mode: str = "zero", dtype: str = "auto", device: str = "cpu",
          out: Path = typer.Option(Path("moeaudit-out"), help="directory for records and tables"),
          trust_remote_code: bool = False) -> None:
    """Run all experiments and write records (parquet) and cell tables (CSV)."""
    _run_audit(model, corpus, layers, metrics, n, n_progressive, n_docs, max_length, seed, scope, mode, dtype,
               device, out, trust_remote_code)


@app.command()
def demo(out: Path = typer.Option(Path("moeaudit-demo"), help="output directory")) -> None:
    """The whole audit on the embedded model and corpus (a couple of minutes on 2 CPU cores)."""
    _run_audit("builtin:tiny-moe", "builtin", "", "", 200, 200, 64, 512, 0, "token", "zero", "float32", "cpu", out,
               False)


def bench(ctx: typer.Context) -> None:
    """The engine benchmark (options: see `python -m moeaudit.bench --help`)."""
    from moeaudit.bench import main

    raise typer.Exit(main(ctx.args))


bench = app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)


def _run_audit(model, corpus, layers, metrics, n, n_progressive, n_docs, max_length, seed, scope, mode, dtype,
               device, out, trust_remote_code) -> None:
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    import moeaudit
    from moeaudit.experiments import PAPER_METRICS, ExperimentSettings, run_experiments

    console = _console()
    start = time.perf_counter()
    m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seqs = moeaudit.load_corpus(corpus, tok, n_samples=n_docs, max_length=max_length)
    settings = ExperimentSettings(
        layers=tuple(int(x) for x in layers.split(",")) if layers else None,
        metrics=tuple(x.strip() for x in metrics.split(",")) if metrics else PAPER_METRICS,
        n=n, n_progressive=n_progressive, seed=seed, scope=scope, mode=mode, model_name=model)
    n_layers = len(settings.layers or moeaudit.describe(m).moe_layers)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("ablating positions", total=n_layers * (n + n_progressive))
        result = run_experiments(m, seqs, settings, progress=lambda k: bar.advance(task, k))
    out.mkdir(parents=True, exist_ok=True)
    result.records.to_parquet(out / "records.parquet")
    result.metrics.to_csv(out / "metrics.csv", index=False)
    for name, table in result.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    cols = ["layer", "metric", "n", "cohens_d", "p_t", "p_wilcoxon", "significant"]
    console.print(_table("audit (Definition 2.1)", result.tables["audit"], cols))
    console.print(_table("routing-weight control", result.tables["control"],
                         ["layer", "n", "cohens_d", "p_t", "p_wilcoxon", "spearman_rho", "significant"]))
    console.print(f"{len(result.records)} ablation records in {time.perf_counter() - start:.1f} s -> {out}")


def main() -> None:
    app()
