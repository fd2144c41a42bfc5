"""``moeaudit inspect`` and ``verify``: look at a model, check the engine (``bench`` lives in ``_bench``)."""

from __future__ import annotations

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import expected_errors, fail, make_console, rich_table


@app.command()
def inspect(model: str = typer.Argument(..., help=MODEL_HELP),
            corpus: str = typer.Option("builtin", help="corpus for the routing summary"),
            n: int = typer.Option(4, help="sequences for the routing summary"),
            dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> None:
    """Family, layers, experts, top-k, shared experts, and a routing summary on a few sequences."""
    import moeaudit

    console = make_console()
    try:
        m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        desc = moeaudit.describe(m)
        seqs = moeaudit.load_corpus(corpus, tok, n_samples=n, min_length=8)
    except expected_errors() as exc:
        raise fail(exc) from None
    for field, value in desc.__dict__.items():
        console.print(f"[bold]{field}[/bold]: {value}")
    table = moeaudit.observe(m, [s.input_ids for s in seqs])
    summary = table.groupby("layer").agg(
        busiest=("utilization_rate", "max"), idlest=("utilization_rate", "min"),
        mean_weight=("mean_routing_weight_when_active", "mean"), unused=("routed_count", lambda c: int((c == 0).sum())),
    ).reset_index()
    console.print(rich_table(f"routing over {len(seqs)} sequences of {corpus}", summary))


@app.command()
def verify(model: str = typer.Option(..., help=MODEL_HELP),
           corpus: str = typer.Option("builtin", help="corpus the checks run on"),
           n: int = typer.Option(2, help="sequences the checks run on"), dtype: str = "auto", device: str = "cpu",
           trust_remote_code: bool = False) -> None:
    """Run the verification suite and print it as a table; exit 1 when a check fails."""
    import pandas as pd

    import moeaudit

    try:
        m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        seqs = moeaudit.load_corpus(corpus, tok, n_samples=n)
    except expected_errors() as exc:
        raise fail(exc) from None
    report = moeaudit.verify(m, tok, seqs, modes=("zero", "renormalize", "reroute"))
    make_console().print(rich_table("verification", pd.DataFrame(report.to_dict()["checks"])))
    raise typer.Exit(0 if report.passed else 1)
