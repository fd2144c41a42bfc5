"""The ``moeaudit`` command line: a thin typer layer over the public API (heavy imports happen inside commands).

Errors moeaudit raises on purpose (bad config, unsupported model, unreadable corpus, a run directory that holds
another run, a failed verification) are printed as one clear message with exit status 2 (1 for a failed
verification); anything else is a bug and keeps its traceback (``MOEAUDIT_DEBUG=1`` shows it for those too).
"""

from __future__ import annotations

from moeaudit.cli import _attribute, _audit, _bench, _inspect, _merge, _prune, _validate  # noqa: F401  (each registers)
from moeaudit.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
