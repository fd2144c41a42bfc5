"""Run directories: atomic writes, a manifest binding the directory to one configuration, per-cell record files
that let an interrupted run resume, and a lock against two processes writing the same directory.

Layout::

    manifest.json        config, environment, corpus fingerprint, sessions with stage timings, status
    config.toml          the configuration, re-runnable with ``moeaudit run config.toml``
    verification.json    the verification report that gated the last session's data collection
    metrics.parquet      the observe table (per layer x expert metrics)
    stability.parquet    ranking stability (when requested)
    records/L004-single.parquet, records/L004-progressive.parquet, ...   one file per finished cell
    summary.csv, summary.json, tables/*.csv
    report.md, report.html, figures/*.png|pdf

Every file is written to a temporary name in the same directory and renamed into place, so a reader (or a
resumed run) sees either the whole file or none of it. Files damaged outside moeaudit (a truncated copy, a
hand-edited manifest) are refused with one line naming the file and the fix, before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeaudit._atomic import (  # re-exported: every writer of a run directory's files uses them
    TMP_PREFIX as _TMP_PREFIX,
)
from moeaudit._atomic import atomic_path as atomic_path
from moeaudit._atomic import atomic_write_bytes as atomic_write_bytes
from moeaudit._atomic import atomic_write_json as atomic_write_json
from moeaudit._atomic import atomic_write_parquet as atomic_write_parquet
from moeaudit._atomic import atomic_write_text as atomic_write_text
from moeaudit._atomic import translated
from moeaudit.errors import RunDirectoryError

if TYPE_CHECKING:  # pandas loads on first use: refusals before any work stay fast
    import pandas as pd

FORMAT_VERSION = 1
#: ``manifest["tool"]`` of an audit run directory (``moeaudit run`` / ``demo`` / ``merge``); ``moeaudit map`` and
#: ``moeaudit prune-eval`` write their own command.
RUN_TOOL = "moeaudit"
MANIFEST = "manifest.json"
RECORDS = "records"
#: What ``--dry-run`` writes into a run directory before the run (the only file a new run tolerates there).
DRY_RUN = "dry-run.json"
CELL_KINDS: tuple[str, ...] = ("single", "progressive")
#: Key of a record file's Parquet metadata holding its cell (``L004-single``).
CELL_KEY = "moeaudit.cell"
_CELL_RE = re.compile(r"^L(\d+)-(single|progressive)\.parquet$")
#: Statuses of a run whose last session did not complete (``running``: killed, its lock stale).
UNFINISHED: tuple[str, ...] = ("failed", "interrupted", "running")


def cell_name(kind: str, layer: int) -> str:
    """File name of a cell's records (``L004-single.parquet``)."""
    if kind not in CELL_KINDS:
        raise ValueError(f"cell kind {kind!r}; valid: {', '.join(CELL_KINDS)}")
    return f"L{layer:03d}-{kind}.parquet"


class RunDirectory:
    """A run directory on disk (see the module docstring for its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # -- reading ----------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The manifest; raises :class:`RunDirectoryError` when the directory holds no readable run."""
        if not self.manifest_path.is_file():
            raise RunDirectoryError(f"{str(self.path)!r} is not a moeaudit run directory (no {MANIFEST}); pass a "
                                    "directory written by `moeaudit run` or `moeaudit demo`.")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._damaged_manifest(f"not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise self._damaged_manifest(f"it holds a JSON {type(manifest).__name__}, not an object")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RunDirectoryError(f"{str(self.path)!r} was written in run-directory format "
                                    f"{manifest.get('format_version')!r}; this moeaudit reads format "
                                    f"{FORMAT_VERSION}. Re-run it into a new directory.")
        for key, kind in (("config", dict), ("sessions", list)):
            if not isinstance(manifest.get(key), kind):
                found = type(manifest[key]).__name__ if key in manifest else "missing"
                raise self._damaged_manifest(f"its {key!r} is {found}, not a {kind.__name__}")
        return manifest

    def _damaged_manifest(self, problem: str) -> RunDirectoryError:
        return RunDirectoryError(f"{str(self.manifest_path)!r} is damaged ({problem}); restore it from a backup "
                                 "copy, or move the run directory aside and run again into a new one.")

    def finished_cells(self) -> dict[tuple[str, int], Path]:
        """``(kind, layer) -> path`` of every cell whose records are on disk."""
        cells = {}
        directory = self.path / RECORDS
        if directory.is_dir():
            for p in sorted(directory.iterdir()):
                m = _CELL_RE.match(p.name)
                if m:
                    cells[(m.group(2), int(m.group(1)))] = p
        return cells

    def read_cell(self, kind: str, layer: int) -> pd.DataFrame:
        return _read_parquet(self.path / RECORDS / cell_name(kind, layer))

    def read_records(self) -> pd.DataFrame:
        """Every finished cell's records, in (layer, kind) order, as one table."""
        import pandas as pd

        from moeaudit.experiments._records import empty_records

        cells = self.finished_cells()
        order = sorted(cells, key=lambda c: (c[1], CELL_KINDS.index(c[0])))
        self.check_files()
        frames = [_read_parquet(cells[c]) for c in order]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else empty_records()

    def read_json(self, name: str) -> Any | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirectoryError(f"{str(p)!r} is damaged (not valid JSON: {exc}); delete it and run the same "
                                    "command again to rewrite it.") from None

    def read_parquet(self, name: str) -> pd.DataFrame | None:
        p = self.path / name
        return _read_parquet(p) if p.is_file() else None

    def check_files(self) -> None:
        """Refuse a directory whose record or table files are not readable Parquet (truncated or overwritten
        outside moeaudit), naming the file and the fix; reads only each file's footer.

        Raises:
            RunDirectoryError: The first damaged file.
        """
        import pyarrow.parquet as pq

        cells = set(self.finished_cells().values())
        for p in [*sorted(cells), self.path / "metrics.parquet", self.path / "stability.parquet"]:
            if p.is_file():
                try:
                    meta = pq.read_metadata(p).metadata or {}
                except Exception as exc:  # ArrowInvalid, OSError: whatever pyarrow says, the file is unusable
                    raise _damaged(p, exc) from None
                if p in cells:
                    _check_cell_key(p, meta)

    # -- writing ----------------------------------------------------------------------------------------------
    def write_cell(self, kind: str, layer: int, frame: pd.DataFrame) -> Path:
        """A cell's records, its key (the file's name) stored inside, so a file copied over another is found."""
        name = cell_name(kind, layer)
        return atomic_write_parquet(self.path / RECORDS / name, frame, {CELL_KEY: name.removesuffix(".parquet")})

    def write_json(self, name: str, value: Any) -> Path:
        return atomic_write_json(self.path / name, value)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_parquet(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write_parquet(self.path / name, frame)

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        return atomic_write_json(self.manifest_path, manifest)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a process killed mid-write; return how many."""
        removed = 0
        if self.path.is_dir():
            for p in self.path.rglob(f"{_TMP_PREFIX}*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- binding a directory to a configuration ---------------------------------------------------------------
    def restartable(self, manifest: dict[str, Any]) -> bool:
        """Whether the run ended (failed, interrupted, killed) before its first cell was on disk: nothing in it is
        worth keeping, so it may be started afresh with another configuration or model (the fix of whatever made
        it fail)."""
        return manifest.get("status") in UNFINISHED and not self.finished_cells()

    def clear(self) -> None:
        """Delete everything in the directory but its lock (a restartable run's leftovers)."""
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def claim(self, config: dict[str, Any], new_manifest: dict[str, Any], *,
              defaults: dict[str, Any] | None = None,
              restart: Callable[[dict[str, Any]], bool] | None = None,
              relaxed: tuple[str, ...] = ()) -> tuple[dict[str, Any], bool]:
        """Bind the directory to ``config``: create it with ``new_manifest``, or check that the run it holds has
        the same configuration. Returns ``(manifest, resumed)``. A key the stored configuration lacks (written
        by a version without it) counts as its value in ``defaults``. When ``restart`` is given, a
        :meth:`restartable` run for which ``restart(manifest)`` is true (another configuration or model) is
        cleared and started afresh (its new manifest says ``"restarted": <old status>``).

        Raises:
            RunDirectoryError: The directory holds a run with another configuration, or files that are not a
                run's.
        """
        if self.exists():
            manifest = self.manifest()
            if restart is not None and self.restartable(manifest) and restart(manifest):
                self.clear()  # a run that failed before its first cell: the fix of what failed starts it afresh
                new_manifest = {**new_manifest, "restarted": manifest.get("status")}
            else:
                self.check_config(manifest, config, defaults=defaults, tool=new_manifest.get("tool", RUN_TOOL),
                                  relaxed=relaxed)
                manifest["config"] = config
                return manifest, True
        if self.path.exists() and any(p.name not in (".lock", DRY_RUN) for p in self.path.iterdir()):
            raise RunDirectoryError(f"{str(self.path)!r} is not empty and holds no moeaudit run ({MANIFEST} "
                                    "missing); choose a new or empty run directory (out=).")
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_manifest(new_manifest)
        return new_manifest, False

    def check_config(self, manifest: dict[str, Any], config: dict[str, Any], *,
                     defaults: dict[str, Any] | None = None, tool: str = RUN_TOOL,
                     relaxed: tuple[str, ...] = ()) -> None:
        """Refuse to resume when the directory holds another command's run (``manifest["tool"]`` is not ``tool``)
        or the manifest's configuration differs from ``config`` (both plain dicts). A key the stored configuration
        lacks (written by a version without it) counts as its value in ``defaults``; a legacy key the requested
        configuration no longer has (:data:`moeaudit.config.LEGACY_KEYS`) is ignored, and so are ``relaxed`` keys
        (those only the summary reads) of a run that did not complete.

        Raises:
            RunDirectoryError: Another command's run, a key moeaudit does not have, or values that differ (each
                named).
        """
        from moeaudit.config import LEGACY_KEYS

        stored_tool = manifest.get("tool")
        if isinstance(stored_tool, str) and stored_tool != tool:
            raise RunDirectoryError(
                f"{str(self.path)!r} holds a `{_command(stored_tool)}` run, not a `{_command(tool)}` one; a "
                f"directory holds one kind of run. Choose another run directory (out=), or resume it with "
                f"`{_command(stored_tool)}`.")

        own = {k: v for k, v in manifest["config"].items() if k in config or k not in LEGACY_KEYS}
        stored = {**(defaults or {}), **own}
        foreign = [k for k in own if k not in config]
        if foreign:
            raise RunDirectoryError(
                f"{str(self.manifest_path)!r} stores configuration key(s) {', '.join(map(repr, foreign))} that "
                "moeaudit does not have (the manifest was edited, or written by another version); delete them "
                "from its \"config\" to resume this run, or run into another directory (out=).")
        differences = config_differences(stored, config)
        if manifest.get("status") in UNFINISHED:  # keys of the stage that failed may be corrected on resuming
            differences = [d for d in differences if d[0] not in relaxed]
        if differences:
            listed = "; ".join(f"{k}: stored {a!r}, requested {b!r}" + (
                "" if k in own else " (the run predates this setting; it ran as the stored value)")
                for k, a, b in differences)
            toml = self.path / "config.toml"
            resume = (f", or resume it with its stored configuration: moeaudit run {str(toml)!r} --out "
                      f"{str(self.path)!r}" if _holds_config(toml, stored) else "")
            older = any(k not in own for k, _, _ in differences)
            raise RunDirectoryError(
                f"{str(self.path)!r} holds a run with a different configuration ({listed}); resuming would mix "
                f"two experiments. Choose another run directory (out=){resume}."
                + (" `moeaudit report` still reads a run written by an older moeaudit." if older else ""))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.lock`` for the duration; refuse when a live process on this host holds it."""
        lock = self.path / ".lock"
        with translated(lock):
            self.path.mkdir(parents=True, exist_ok=True)
        host, pid = socket.gethostname(), os.getpid()
        for _ in range(2):
            try:
                with translated(lock):
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(lock)
                if holder is None or (holder[0] == host and not _pid_alive(holder[1])):
                    lock.unlink(missing_ok=True)  # stale: its process was killed (or died mid-write)
                    continue
                raise RunDirectoryError(
                    f"{str(self.path)!r} is in use by process {holder[1] if holder else '?'} on "
                    f"{holder[0] if holder else '?'} ({str(lock)!r}). Wait for it to finish; if that process is "
                    "gone, delete the lock file.") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{host}\n{pid}\n")
            break
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _command(tool: str) -> str:
    """The command that writes run directories of ``tool``."""
    return "moeaudit run" if tool == RUN_TOOL else tool


def _holds_config(toml: Path, stored: dict[str, Any]) -> bool:
    """Whether ``toml`` reads back to the ``stored`` configuration (so advising it cannot send the user in a
    circle)."""
    from moeaudit.config import RunConfig
    from moeaudit.errors import ConfigError

    try:
        return toml.is_file() and RunConfig.from_toml(toml).to_dict() == stored
    except (ConfigError, OSError):
        return False


def _read_parquet(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a truncated or non-Parquet file
        raise _damaged(path, exc) from None


def _check_cell_key(path: Path, metadata: dict[bytes, bytes]) -> None:
    """Refuse a record file whose stored cell key is not its name (copied or renamed over another cell's); files
    written before keys were stored have none and are accepted."""
    key = metadata.get(CELL_KEY.encode())
    if key is not None and key.decode() != path.name.removesuffix(".parquet"):
        raise RunDirectoryError(f"{str(path)!r} holds the records of cell {key.decode()}, not "
                                f"{path.name.removesuffix('.parquet')} (copied or renamed outside moeaudit); delete "
                                "it to recompute that cell, then run the same command again.")


def _damaged(path: Path, exc: Exception) -> RunDirectoryError:
    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    fix = ("delete it to recompute that cell" if path.parent.name == RECORDS else "delete it to recompute it")
    return RunDirectoryError(f"{str(path)!r} is damaged (not a readable Parquet file: {reason}); {fix}, then run "
                             "the same command again.")


def config_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored, requested)`` for every key whose values differ, placement keys
    (:data:`moeaudit.config.PLACEMENT_KEYS`, e.g. ``device_map``) aside."""
    from moeaudit.config import PLACEMENT_KEYS

    keys = [k for k in dict.fromkeys([*stored, *requested]) if k not in PLACEMENT_KEYS]
    return [(k, stored.get(k), requested.get(k)) for k in keys if stored.get(k) != requested.get(k)]


def _read_lock(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
