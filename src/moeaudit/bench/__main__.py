"""``python -m moeaudit.bench``: an entry point (like ``moeaudit/__main__.py``), so it may import the CLI."""

from __future__ import annotations

import sys

from moeaudit.cli import app


def main(argv: list[str] | None = None) -> int:
    """``python -m moeaudit.bench [OPTIONS]``: the same command as ``moeaudit bench``."""
    try:
        app(["bench", *(argv or [])], prog_name="moeaudit")
    except SystemExit as exc:  # click always exits; keep its status
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
