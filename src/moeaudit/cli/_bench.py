"""``moeaudit bench``: its options are generated from :class:`moeaudit.bench.BenchConfig`, one source of truth."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Optional

import typer

from moeaudit.bench._config import BenchConfig
from moeaudit.cli._app import app
from moeaudit.cli._common import expected_errors, fail


def _annotation(f) -> type:
    if f.metadata.get("multiple"):
        return list[str]
    kind = {"int | None": Optional[int], "str": str, "int": int, "bool": bool}  # noqa: UP045 (typer reads it)
    return kind[str(f.type)]


def bench(**options) -> None:
    """The engine benchmark: naive vs fast ablations/s, the floor, and peak memory, at a model's real geometry
    (presets of the paper's checkpoints with random weights; nothing downloads)."""
    import json

    from moeaudit.bench import format_result, run_bench

    as_json = options.pop("json")
    options["set"] = tuple(options["set"] or ())
    try:
        cfg = BenchConfig(**options)
        result = run_bench(cfg)
    except expected_errors() as exc:
        raise fail(exc) from None
    extra = None
    if cfg.attribution:
        from moeaudit.bench._attribution import format_attribution, run_attribution_bench

        extra = run_attribution_bench(cfg)
    if as_json:
        data = result.to_dict() | ({"attribution": extra.to_dict()} if extra else {})
        typer.echo(json.dumps(data, indent=2, default=list))
    else:
        typer.echo(format_result(result) + (f"\n{format_attribution(extra)}" if extra else ""))


def _flag(f) -> str:
    name = f.name.replace("_", "-")
    return f"--{name}/--no-{name}" if str(f.type) == "bool" else f"--{name}"


_params = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(f),
                      default=typer.Option(list(f.default) if f.metadata.get("multiple") else f.default, _flag(f),
                                           help=f.metadata["help"]))
    for f in fields(BenchConfig)
]
_params.append(inspect.Parameter("json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, "--json", help="print the result as JSON")))
bench.__signature__ = inspect.Signature(_params)
bench = app.command()(bench)
