"""The exception hierarchy of moeaudit.

::

    MoEAuditError                 base of everything moeaudit raises on purpose
    ├── UnsupportedModelError     a dense model, or an MoE family without an adapter (also a ValueError)
    ├── ModelSourceError          a model name that yields no loadable checkpoint: no such directory, a hub id that
    │                             cannot be reached, weights the safe loader refuses (also an OSError)
    ├── CorpusError               a corpus source that cannot be read or yields nothing usable (also a ValueError)
    ├── ConfigError               a bad run configuration: unknown key, bad value (also a ValueError)
    ├── VerificationError         the verification suite failed; experiments refuse to collect data
    ├── RunDirectoryError         a run directory that holds a different run or is damaged, or shards that do
    │                             not merge
    └── ExecutorError             a cell failed on every retry of a distributed executor

Bad arguments to the public functions raise plain ``ValueError`` (or the ValueError subclasses above) with a
message that names the bad value, the valid options and the fix. A message names a keyword argument or
configuration key as ``key=`` (``pass text_field= to name the field``, ``seed=-1 is negative``) and quotes
user-provided values with ``repr``; the command line rewrites those keyword references into its flags
(``--text-field``, ``--seed=-1``), so one message serves the library and the CLI.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoEAuditError(Exception):
    """Base class of every error moeaudit raises on purpose."""


class UnsupportedModelError(MoEAuditError, ValueError):
    """The model is dense, or its MoE family has no adapter."""


class ModelSourceError(MoEAuditError, OSError):
    """A model name that yields no loadable checkpoint (no such directory, hub unreachable, unsafe weights)."""


class CorpusError(MoEAuditError, ValueError):
    """A corpus source cannot be read or yields no usable sequence."""


class ConfigError(MoEAuditError, ValueError):
    """A run configuration is invalid.

    Attributes:
        source: The configuration file the bad value came from (``None``: keywords, flags or a preset).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class VerificationError(MoEAuditError):
    """The verification suite failed, so no data may be collected."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class RunDirectoryError(MoEAuditError):
    """A run directory holds a different run, or its files are damaged."""


class ExecutorError(MoEAuditError):
    """A cell could not be computed by the executor (it failed on every retry, or every worker died)."""


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
