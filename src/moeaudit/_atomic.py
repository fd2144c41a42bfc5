"""Atomic file writes (a temporary name in the same directory, then ``os.replace``), and the one translation of
a full disk or a read-only file system into an error naming the path and the fix, with nothing temporary left."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

#: Prefix of temporary files (a run removes stale ones left by a killed process).
TMP_PREFIX = ".tmp-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class StorageError(OSError):
    """The disk is full or the file system read-only (``errno`` kept); its text names the path and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(exc: OSError, path: str | Path) -> OSError:
    """``exc`` (raised while writing ``path``) as an error naming the path and the fix when the disk is full or the
    file system is read-only (pyarrow's errors carry the errno only in their text); other errors unchanged."""
    code = exc.errno
    if code is None:
        text = str(exc)
        code = next((c for c in (*_NO_SPACE, *_READ_ONLY) if f"[errno {c}]" in text.lower()), None)
    where = Path(os.path.abspath(path)).parent
    if code in _NO_SPACE:
        return StorageError(code, f"no space left on the device holding {str(where)!r} while writing {Path(path).name!r}; "
                             "free space there (or pass another out= on a disk with room) and run the same command "
                             "again: finished work is kept, nothing partial was left")
    if code in _READ_ONLY:
        return StorageError(code, f"cannot write to {str(where)!r} ({os.strerror(code).lower()}); pass an out= directory "
                             "you can write to, or make it writable, and run the same command again")
    return exc


@contextmanager
def translated(path: str | Path) -> Iterator[None]:
    """Re-raise a full disk or read-only file system met while writing ``path`` as :func:`storage_error`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        new = storage_error(exc, path)
        if new is exc:
            raise
        raise new from None


def _file_mode() -> int:
    """0o666 minus the process umask: what ``open()`` would have created (``mkstemp`` creates 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file open on a temporary name next to ``path``; on success flush, fsync and rename it into
    place, on failure delete it (a full disk or read-only file system re-raised by :func:`translated`)."""
    path = Path(path)
    with translated(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name; rename it into place on
    success, delete it on failure."""
    path = Path(path)
    with translated(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, _FILE_MODE)
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame, metadata: dict[str, str] | None = None) -> Path:
    """Write ``frame`` as Parquet (through :func:`atomic_file`), with ``metadata`` added to the file's key-value
    metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    with atomic_file(path) as fh:
        pq.write_table(table, fh)
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
