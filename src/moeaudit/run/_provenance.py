"""Provenance a run directory's manifest records: the time, the versions of python, torch, transformers and
moeaudit, the git revision, the host, and the fingerprint of the tokenised corpus."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions of python, torch, transformers and moeaudit, the git revision, the host and the torch threads."""
    import torch
    import transformers

    from moeaudit import __version__
    from moeaudit.run._threads import thread_record

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "moeaudit": __version__, "git_revision": _git_revision(),
            "platform": platform.platform(), "host": platform.node(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None, "threads": thread_record()}


def corpus_fingerprint(sequences) -> str:
    """SHA-256 over the token ids of every sequence (detects a corpus that changed between sessions)."""
    h = hashlib.sha256()
    for s in sequences:
        ids = s.input_ids.numpy().astype("<i8")
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
    return h.hexdigest()
