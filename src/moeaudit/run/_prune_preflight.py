"""The checks a map / prune-eval run makes before any work, without importing torch until the device check (the
last): ``out`` being a file, the model's location, corpus files that do not exist or decode, the model's identity
for resuming; then the device. Each refusal is one line naming the problem and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeaudit.config import CORPUS_SOURCES
from moeaudit.corpus import read_documents
from moeaudit.errors import RunDirectoryError
from moeaudit.models._checkpoint import ModelSource, locate_model, model_identity
from moeaudit.pruning._config import MapConfig
from moeaudit.run._preflight import check_device, check_identity, resolve_device


@dataclass(frozen=True)
class MapPlan:
    """What :func:`preflight_map` found, handed to the run.

    Attributes:
        config: The configuration with its local paths resolved (what the run directory stores).
        source: Where the model is.
        identity: The model's identity (:func:`moeaudit.models._checkpoint.model_identity`; a hub model's files are
            fingerprinted once loading has cached them).
        documents: Each corpus file's documents, read and decoded.
        device: The checked device.
        trust_remote_code: Run modelling code shipped with the checkpoint (per call, never from a configuration).
    """

    config: MapConfig
    source: ModelSource
    identity: dict[str, Any]
    documents: dict[str, list[str]]
    device: str
    trust_remote_code: bool = False

    def check_resume(self, run_dir, manifest: dict[str, Any]) -> None:
        """Refuse to resume a run directory started with another model or holding damaged files (called under
        the directory's lock, before this session writes anything)."""
        check_identity(run_dir, manifest, self.identity)
        run_dir.check_files()


def preflight_map(config: MapConfig, out: str | Path, *, trust_remote_code: bool = False) -> MapPlan:
    """Everything a map / prune-eval run can refuse before loading a model: ``out`` being a file, the model's
    location, corpus files that do not exist or decode, the device.

    Raises:
        RunDirectoryError, ModelSourceError, CorpusError, ConfigError: One line naming the problem and the fix.
    """
    config = config.with_resolved_paths()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"out={str(out)!r} is an existing file, not a directory; pass a directory for the "
                                "run (a new one, or a run directory to resume).")
    source = locate_model(config.model)
    corpora = {config.corpus, getattr(config, "eval_corpus", None) or config.corpus}
    documents = {c: read_documents(c, text_field=config.text_field, encoding=config.encoding)
                 for c in sorted(corpora - set(CORPUS_SOURCES) | corpora & {"wikitext-2"})}  # offline: seconds
    device = check_device(resolve_device(config.device))
    identity = model_identity(source)
    if source.kind == "hub":  # its cached files may be incomplete before loading: the commit decides until then
        identity["files"] = None
    return MapPlan(config, source, identity, documents, device, trust_remote_code)
