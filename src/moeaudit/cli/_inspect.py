"""``moeaudit inspect`` and ``verify``: look at a model, check the engine (``bench`` lives in ``_bench``)."""

from __future__ import annotations

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import (
    escape,
    expected_errors,
    fail,
    flag_names,
    make_console,
    quiet_transformers,
    rich_table,
    status,
)

#: Flags of ``inspect`` and ``verify``, by the library keyword they set.
_FLAGS = flag_names("model", "corpus", "dtype", "device", "text_field", "encoding", "trust_remote_code",
                    n_samples="--n")


def _load(console, model: str, corpus: str, n: int, *, dtype: str, device: str, trust_remote_code: bool,
          text_field: str, encoding: str, min_length: int = 32):
    """The model, its tokenizer and ``n`` corpus sequences, behind a spinner; bad input exits with one line."""
    import moeaudit
    from moeaudit.corpus import read_documents
    from moeaudit.models._checkpoint import locate_model

    try:
        # what can be refused without torch first: the corpus file, the model's path or hub id
        docs = None if corpus == "wikitext-2" else read_documents(corpus, text_field=text_field, encoding=encoding)
        model = locate_model(model).name
        with status(console, f"loading {model}"):
            quiet_transformers()
            m, tok = moeaudit.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        seqs = moeaudit.load_corpus(corpus, tok, n_samples=n, min_length=min_length, documents=docs)
    except expected_errors() as exc:
        raise fail(exc, _FLAGS) from None
    return m, tok, seqs


@app.command()
def inspect(model: str = typer.Argument(..., help=MODEL_HELP),
            corpus: str = typer.Option("builtin", help="corpus for the routing summary"),
            n: int = typer.Option(4, help="sequences for the routing summary"),
            dtype: str = "auto", device: str = "cpu",
            text_field: str = typer.Option("text", help="field holding the text in .jsonl / .parquet corpora"),
            encoding: str = typer.Option("utf-8", help="text encoding of .txt / .jsonl corpora"),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                   help="run modelling code shipped with the checkpoint")) -> None:
    """Family, layers, experts, top-k, shared experts, NaN / inf weights or activations (exit 1 when any), and a
    routing summary on a few sequences."""
    import moeaudit

    console = make_console()
    m, _, seqs = _load(console, model, corpus, n, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       text_field=text_field, encoding=encoding, min_length=8)
    try:
        desc = moeaudit.describe(m)
    except expected_errors() as exc:
        raise fail(exc, _FLAGS) from None
    for field, value in desc.__dict__.items():
        console.print(f"[bold]{field}[/bold]: {escape(value)}", highlight=False)
    from moeaudit.models import first_nonfinite_module, nonfinite_weights

    with status(console, "checking weights and activations for NaN / inf"):
        bad = nonfinite_weights(m, desc.n_experts)
        module = first_nonfinite_module(m, seqs[0].input_ids) if seqs else None
    console.print(f"[bold]non_finite_weights[/bold]: {escape('; '.join(bad)) if bad else 'none'}", highlight=False)
    console.print(f"[bold]non_finite_activations[/bold]: "
                  f"{escape('first in ' + module) if module else 'none'}", highlight=False)
    if bad or module:
        console.print("[bold red]this model computes NaN or inf[/bold red]: restore the weights named above from an "
                      "intact checkpoint (or, for activations with finite weights, use --dtype float32)",
                      highlight=False)
    with status(console, f"routing {len(seqs)} sequences"):
        table = moeaudit.observe(m, [s.input_ids for s in seqs])
    summary = table.groupby("layer").agg(
        busiest=("utilization_rate", "max"), idlest=("utilization_rate", "min"),
        mean_weight=("mean_routing_weight_when_active", "mean"), unused=("routed_count", lambda c: int((c == 0).sum())),
    ).reset_index()
    console.print(rich_table(f"routing over {len(seqs)} sequences of {corpus}", summary))
    if bad or module:
        raise typer.Exit(1)


@app.command()
def verify(model: str = typer.Option(..., help=MODEL_HELP),
           corpus: str = typer.Option("builtin", help="corpus the checks run on"),
           n: int = typer.Option(2, help="sequences the checks run on"), dtype: str = "auto", device: str = "cpu",
           text_field: str = typer.Option("text", help="field holding the text in .jsonl / .parquet corpora"),
           encoding: str = typer.Option("utf-8", help="text encoding of .txt / .jsonl corpora"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                  help="run modelling code shipped with the checkpoint")) -> None:
    """Run the verification suite and print it as a table; exit 1 when a check fails."""
    import pandas as pd

    import moeaudit

    console = make_console()
    m, tok, seqs = _load(console, model, corpus, n, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text_field=text_field, encoding=encoding)
    with status(console, f"verifying the ablation engines on {len(seqs)} sequences (3 modes)"):
        report = moeaudit.verify(m, tok, seqs, modes=("zero", "renormalize", "reroute"))
    console.print(rich_table("verification", pd.DataFrame(report.to_dict()["checks"])))
    raise typer.Exit(0 if report.passed else 1)
