"""Where a model comes from and which weights it is, without importing torch: a model name resolved to the
built-in checkpoint, a local directory or a hub id; the fast refusals before anything loads (no such directory, a
hub id that cannot be reached, an offline hub id missing from the cache); and the fingerprint that binds a run
directory to one checkpoint.

The fingerprint reads every file a load reads (config, tokenizer, weights, shipped code; not model cards or
logs): small files are hashed whole, weight files of more than 8 MiB by their size, their safetensors header (every
tensor's name, dtype, shape and byte offsets) and 65 pages of 4 KiB spread evenly over the tensor data. That is
about 0.3 MiB read per weight file whatever its size: a 30 GB checkpoint in seven shards costs ~460 reads, ~2 MiB
(25 ms on the 2-core dev box for a sparse 30 GB stand-in from the page cache; well under a second from an SSD, a
few seconds of seeks on a spinning disk), the 17 MB built-in model 1 ms. It detects a different checkpoint at
the same path (another fine-tune, another precision or quantisation, re-trained weights: every sampled page
changes) and any change of size or tensor layout; a hand edit of a few weights in place, keeping size and layout,
can escape it (write edited checkpoints to a new directory).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeaudit.errors import ModelSourceError

BUILTIN_PREFIX = "builtin:"
KINDS: tuple[str, ...] = ("builtin", "local", "hub")
_WHOLE_FILE_LIMIT = 8 << 20
_PAGES = 64
_PAGE = 4096
_SKIP_SUFFIXES = frozenset({".md", ".csv", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".lock", ".log"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """A model name, located.

    Attributes:
        kind: ``builtin``, ``local`` or ``hub``.
        name: ``builtin:NAME``, the absolute checkpoint directory, or the hub id.
        directory: The checkpoint's files on disk (for a hub id: its snapshot in the hub cache, when cached).
        revision: The hub commit, when known.
        local_files_only: Load a hub id from the cache without asking the hub (the hub is unreachable).
    """

    kind: str
    name: str
    directory: Path | None = None
    revision: str | None = None
    local_files_only: bool = False

    @property
    def load_path(self) -> str:
        """What ``from_pretrained`` gets."""
        return str(self.directory) if self.kind != "hub" else self.name


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a directory: absolute, ``./``, ``../``, ``~``, a trailing or doubled ``/``,
    a backslash, or more than one ``/`` (a hub id is ``name`` or ``org/name``)."""
    return (name.startswith(("/", ".", "~")) or name.endswith("/") or "\\" in name or "//" in name
            or name.count("/") > 1 or not _HUB_ID.match(name))


def resolve_model_name(name: str) -> str:
    """The name a run directory stores: ``builtin:NAME`` and hub ids unchanged, a local path made absolute
    (against the current directory), so the stored configuration means the same checkpoint from anywhere."""
    name = str(name)
    if name.startswith(BUILTIN_PREFIX):
        return name
    path = Path(name).expanduser()
    if looks_like_path(name) or path.exists():
        return str(path.resolve())
    return name


def locate_model(name: str, *, probe_timeout: float = 5.0) -> ModelSource:
    """Resolve ``name`` and check that it can be loaded, without loading it (and without importing torch).

    A hub id is probed once (one HEAD request for its ``config.json``, ``probe_timeout`` seconds, no retries);
    when the hub cannot be reached, a cached copy is used offline, and without one the call fails at once instead
    of after the hub client's retries. ``HF_HUB_OFFLINE=1`` skips the probe.

    Raises:
        ModelSourceError: No such directory, a directory without ``config.json``, or a hub id that is unknown,
            gated, or neither reachable nor cached.
    """
    name = str(name)
    if name.startswith(BUILTIN_PREFIX):
        from moeaudit.builtin import BUILTIN_MODELS, builtin_model_path

        try:
            return ModelSource("builtin", name, builtin_model_path(name))
        except ValueError:
            raise ModelSourceError(f"unknown built-in model {name!r}; valid: "
                                   f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}.") from None
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(name):
        return ModelSource("local", str(_check_directory(name, path.resolve())), path.resolve())
    return _locate_hub(name, path.resolve(), probe_timeout)


def _check_directory(name: str, path: Path) -> Path:
    if not path.exists():
        raise ModelSourceError(f"model {name!r}: no such directory ({str(path)!r}); pass an existing checkpoint "
                               "directory (written by save_pretrained()), a hub id, or builtin:tiny-moe.")
    if not path.is_dir():
        raise ModelSourceError(f"model {name!r} is a file, not a checkpoint directory; pass the directory that "
                               "holds config.json and the weights.")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model {name!r} exists but holds no config.json, so it is not a transformers "
                               "checkpoint directory; pass a directory written by save_pretrained(), or a hub id.")
    return path


def _locate_hub(name: str, as_path: Path, timeout: float) -> ModelSource:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    where = f"model {name!r} is not a local directory (no such directory: {str(as_path)!r})"
    fix = (f"pass an existing checkpoint directory, or download it on a connected machine (`hf download {name}`) "
           "and pass its directory")
    snapshot, revision = hub_snapshot(name)
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise ModelSourceError(f"{where}, and as a hub id it is not in the hub cache ({str(constants.HF_HUB_CACHE)!r}) "
                                   f"while HF_HUB_OFFLINE is set; {fix}.")
        return ModelSource("hub", name, snapshot, revision, local_files_only=True)
    try:
        meta = get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=timeout, retry_on_errors=False)
    except GatedRepoError:
        raise ModelSourceError(f"{where}, and the hub repository {name!r} is gated; accept its terms on the hub "
                               "and log in (`hf auth login`), or pass a local directory.") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{where}, and the hub has no repository {name!r} (or it is private: log in with "
                               f"`hf auth login`); {fix}.") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise ModelSourceError(f"{where}, and the hub answered HTTP {status} for its config.json; {fix}.") from None
    except Exception as exc:  # connection refused, DNS failure, timeout, proxy error: the hub is unreachable
        if snapshot is not None:
            return ModelSource("hub", name, snapshot, revision, local_files_only=True)
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ModelSourceError(f"{where}, and as a hub id it could not be fetched: the hub ({constants.ENDPOINT}) "
                               f"is unreachable ({reason}) and it is not in the hub cache; {fix}.") from None
    snapshot, _ = hub_snapshot(name, meta.commit_hash) if meta.commit_hash else (snapshot, revision)
    return ModelSource("hub", name, snapshot, meta.commit_hash or revision)


def hub_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path | None, str | None]:
    """The hub cache's snapshot directory of ``repo_id`` at ``revision`` (default: the cached ``main``) and its
    commit, or ``(None, None)`` when it holds no ``config.json`` of it."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None, None
    if not isinstance(found, str):
        return None, None
    snapshot = Path(found).parent
    return snapshot, snapshot.name


# -- fingerprints --------------------------------------------------------------------------------------------------
def fingerprint(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``file name -> {"size", "sha256"}`` for every file of a checkpoint directory that a load reads (see the
    module docstring for what is hashed and what it costs)."""
    files = {}
    for p in sorted(Path(directory).iterdir()):
        if p.name.startswith(".") or p.suffix.lower() in _SKIP_SUFFIXES or not p.is_file():
            continue
        size = p.stat().st_size
        files[p.name] = {"size": size, "sha256": _digest(p, size)}
    return files


def _digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _WHOLE_FILE_LIMIT:
            h.update(fh.read())
            return h.hexdigest()
        start = 0
        if path.suffix == ".safetensors":
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 0 < n <= size - 8:
                h.update(head + fh.read(n))  # names, dtypes, shapes and offsets of every tensor
                start = 8 + n
        span = max(size - start - _PAGE, 0)
        for i in range(_PAGES + 1):
            fh.seek(start + span * i // _PAGES)
            h.update(fh.read(_PAGE))
    return "sampled:" + h.hexdigest()


def model_identity(source: ModelSource) -> dict[str, Any]:
    """What a run directory's manifest stores to bind the run to its model (``model_identity``)."""
    identity: dict[str, Any] = {"kind": source.kind, "name": source.name}
    if source.kind == "hub":
        identity["revision"] = source.revision
    identity["files"] = fingerprint(source.directory) if source.directory is not None else None
    return identity


def hub_identity(source: ModelSource, revision: str | None) -> dict[str, Any]:
    """A hub model's identity once loading has cached its files: the commit it loaded (``revision``, else the one
    located) and the fingerprint of that commit's snapshot."""
    from dataclasses import replace

    revision = revision or source.revision
    snapshot, _ = hub_snapshot(source.name, revision)
    return model_identity(replace(source, directory=snapshot, revision=revision))


def identity_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two :func:`model_identity` values, one short phrase each (empty: the same model)."""
    if (stored.get("kind"), stored.get("name")) != (current.get("kind"), current.get("name")):
        return [f"model {stored.get('name')!r} -> {current.get('name')!r}"]
    changes = []
    if stored.get("revision") and current.get("revision") and stored["revision"] != current["revision"]:
        changes.append(f"hub revision {stored['revision'][:12]} -> {current['revision'][:12]}")
    old, new = stored.get("files"), current.get("files")
    if old is not None and new is not None:
        for name in sorted(set(old) | set(new)):
            if name not in new:
                changes.append(f"{name} removed")
            elif name not in old:
                changes.append(f"{name} added")
            elif old[name]["size"] != new[name]["size"]:
                changes.append(f"{name} {old[name]['size']:,} -> {new[name]['size']:,} bytes")
            elif old[name]["sha256"] != new[name]["sha256"]:
                changes.append(f"{name} changed (same size, other contents)")
    return changes


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a manifest stores, if any (run directories written before it existed have none)."""
    value = manifest.get("model_identity")
    return value if isinstance(value, dict) else None

