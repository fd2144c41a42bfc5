"""The typer application every command module registers on (kept tiny so that ``import moeaudit.cli`` is fast)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Causal audits of Mixture-of-Experts language models.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

MODEL_HELP = "hub id, local checkpoint directory, or builtin:tiny-moe"
