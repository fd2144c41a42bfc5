"""The ``moeaudit`` command line: a thin typer layer over the public API (heavy imports happen inside commands).

Errors moeaudit raises on purpose (bad config, unsupported model, unreadable corpus, a run directory that holds
another run, a failed verification) are printed as one clear message with exit status 2 (1 for a failed
verification); anything else is a bug and keeps its traceback (``MOEAUDIT_DEBUG=1`` shows it for those too).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

app = typer.Typer(help="Causal audits of Mixture-of-Experts language models.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

_MODEL_HELP = "hub id, local checkpoint directory, or builtin:tiny-moe"


def _console(stderr: bool = False):
    from rich.console import Console

    _quiet_transformers()

    return Console(stderr=stderr)


def _quiet_transformers() -> None:
    """transformers' own per-file loading bars would interleave with ours."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as one line and return the exit to raise; ``MOEAUDIT_DEBUG=1`` re-raises with the traceback."""
    import os

    from moeaudit.errors import VerificationError

    if os.environ.get("MOEAUDIT_DEBUG"):
        raise exc

    _console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True)
    return typer.Exit(1 if isinstance(exc, VerificationError) else 2)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from moeaudit.errors import MoEAuditError

    return (MoEAuditError, ValueError, FileNotFoundError, OSError)


def _table(title: str, frame, columns: list[str] | None = None):
    from rich.table import Table

    table = Table(title=title)
    frame = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    for col in frame.columns:
        table.add_column(str(col))
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


class RichProgress:
    """A :class:`moeaudit.pipeline.ProgressSink` drawing one rich progress bar (with ETA) per stage."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = None
        self.started = time.perf_counter()

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        self.bar.stop()

    def _finish(self) -> None:
        if self.task is not None:
            task = self.bar.tasks[-1]
            self.bar.update(self.task, total=task.total if task.total is not None else 1,
                            completed=task.total if task.total is not None else 1)

    def stage(self, name: str, total: int | None) -> None:
        self._finish()
        self.task = self.bar.add_task(name, total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def message(self, text: str) -> None:
        self.console.print(text)


@app.command()
def inspect(model: str = typer.Argument(..., help=_MODEL_HELP),
            corpus: str = typer.Option("builtin", help="corpus for the routing summary"),
            n: int = typer.Option(4, help="sequences for the routing summary"),
            dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> None:
    """Family, layers, experts, top-k, shared experts, and a routing summary on a few sequences."""
    import moeaudit

    console = _console()
    try:
        m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        desc = moeaudit.describe(m)
        seqs = moeaudit.load_corpus(corpus, tok, n_samples=n, min_length=8)
    except _expected_errors() as exc:
        raise _fail(exc) from None
    for field, value in desc.__dict__.items():
        console.print(f"[bold]{field}[/bold]: {value}")
    table = moeaudit.observe(m, [s.input_ids for s in seqs])
    summary = table.groupby("layer").agg(
        busiest=("utilization_rate", "max"), idlest=("utilization_rate", "min"),
        mean_weight=("mean_routing_weight_when_active", "mean"), unused=("routed_count", lambda c: int((c == 0).sum())),
    ).reset_index()
    console.print(_table(f"routing over {len(seqs)} sequences of {corpus}", summary))


@app.command()
def verify(model: str = typer.Option(..., help=_MODEL_HELP),
           corpus: str = typer.Option("builtin", help="corpus the checks run on"),
           n: int = typer.Option(2, help="sequences the checks run on"), dtype: str = "auto", device: str = "cpu",
           trust_remote_code: bool = False) -> None:
    """Run the verification suite and print it as a table; exit 1 when a check fails."""
    import pandas as pd

    import moeaudit

    try:
        m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        seqs = moeaudit.load_corpus(corpus, tok, n_samples=n)
    except _expected_errors() as exc:
        raise _fail(exc) from None
    report = moeaudit.verify(m, tok, seqs, modes=("zero", "renormalize", "reroute"))
    _console().print(_table("verification", pd.DataFrame(report.to_dict()["checks"])))
    raise typer.Exit(0 if report.passed else 1)


@app.command()
def run(
    config: str = typer.Argument(None, help="a .toml config file or a preset (paper-olmoe, paper-qwen, "
                                            "paper-deepseek, demo); flags override it"),
    model: str = typer.Option(None, help=_MODEL_HELP), name: str = typer.Option(None, help="label in the report"),
    corpus: str = typer.Option(None, help="wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    layers: str = typer.Option(None, help="comma-separated MoE layers, or 'all'"),
    metrics: str = typer.Option(None, help="comma-separated observational metrics"),
    experiments: str = typer.Option(None, help="comma-separated: audit, control, rank_validity, progressive, "
                                                "redistribution, stability"),
    n: int = typer.Option(None, help="positions per cell"),
    n_progressive: int = typer.Option(None, help="positions per layer of the progressive ablation"),
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
    seed: int = typer.Option(None), trust_remote_code: bool = typer.Option(None),
    n_boot: int = typer.Option(None, help="bootstrap resamples of the confidence intervals"),
    out: Path = typer.Option(None, help="run directory (default: runs/<name>); re-running resumes it"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
) -> None:
    """Run (or resume) an audit into a run directory: records, summary, report."""
    from moeaudit.config import PRESETS, RunConfig

    flags = {"model": model, "name": name, "corpus": corpus, "layers": layers, "metrics": metrics,
             "experiments": experiments, "n": n, "n_progressive": n_progressive, "n_docs": n_docs,
             "n_docs_progressive": n_docs_progressive, "max_length": max_length, "min_length": min_length,
             "text_field": text_field, "min_context": min_context, "scope": scope, "mode": mode,
             "dtype": dtype, "device": device, "seed": seed, "trust_remote_code": trust_remote_code,
             "n_boot": n_boot}
    flags = {k: v for k, v in flags.items() if v is not None}
    try:
        if config is None:
            cfg = RunConfig.from_mapping(flags, source="flags")
        elif config in PRESETS:
            cfg = RunConfig.from_mapping({"preset": config, **flags}, source="flags")
        else:
            cfg = RunConfig.from_toml(config).replace(**flags) if flags else RunConfig.from_toml(config)
    except _expected_errors() as exc:
        raise _fail(exc) from None
    _execute(cfg, out or Path("runs") / cfg.label, report)


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
    except _expected_errors() as exc:
        raise _fail(exc) from None
    _console().print(f"report: {paths['html']} and {paths['markdown']}, figures in {paths['figures']}")


def bench(ctx: typer.Context) -> None:
    """The engine benchmark (options: see `python -m moeaudit.bench --help`)."""
    from moeaudit.bench import main

    raise typer.Exit(main(ctx.args))


bench = app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)


def _execute(cfg, out: Path, report: bool) -> None:
    from moeaudit.pipeline import run_audit

    console = _console()
    start = time.perf_counter()
    console.print(f"[bold]moeaudit run[/bold] {cfg.label} -> {out}")
    try:
        with RichProgress(console) as progress:
            result = run_audit(cfg, out, progress=progress, report=report)
    except _expected_errors() as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        _console(stderr=True).print(f"interrupted; finished cells are kept in {out}. Run the same command again to "
                                    "resume.")
        raise typer.Exit(130) from None
    tables = result.tables
    cols = ["layer", "metric", "n", "cohens_d", "p_t", "p_wilcoxon", "significant"]
    if len(tables["audit"]):
        console.print(_table("audit (Definition 2.1)", tables["audit"], cols))
    if len(tables["control"]):
        console.print(_table("routing-weight control", tables["control"],
                             ["layer", "n", "cohens_d", "p_t", "p_wilcoxon", "spearman_rho", "significant"]))
    console.print(f"{len(result.records):,} ablation records ({len(result.computed_cells)} cells computed, "
                  f"{len(result.resumed_cells)} resumed) in {time.perf_counter() - start:.1f} s -> {out}")
    if result.report:
        console.print(f"report: {result.report['html']}")


def main() -> None:
    app()
