"""What a run's execution is made of: cells, their canonical order, shards, and the execution settings."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moeaudit.errors import ConfigError, RunDirectoryError, did_you_mean

#: Where cells are computed: this process, or Ray actors (``pip install 'moeaudit[ray]'``).
EXECUTORS: tuple[str, ...] = ("local", "ray")
CELL_KINDS: tuple[str, ...] = ("single", "progressive")


@dataclass(frozen=True, order=True)
class Cell:
    """The unit of work and of resumption: one layer's single-expert pool, or one layer's progressive ablation."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in CELL_KINDS:
            raise ValueError(f"cell kind {self.kind!r}; valid: {', '.join(CELL_KINDS)}.")

    @property
    def name(self) -> str:
        """``L5-single``: how cells are named in manifests, timings and messages."""
        return f"L{self.layer}-{self.kind}"

    @property
    def key(self) -> tuple[str, int]:
        """``(kind, layer)``, the key of :meth:`moeaudit.rundir.RunDirectory.finished_cells`."""
        return (self.kind, self.layer)

    @classmethod
    def from_name(cls, name: str) -> Cell:
        m = re.fullmatch(r"L(\d+)-(\w+)", name)
        if not m:
            raise ValueError(f"{name!r} is not a cell name (L<layer>-<single|progressive>).")
        return cls(m.group(2), int(m.group(1)))


def canonical_cells(layers: Sequence[int], *, single: bool, progressive: bool) -> list[Cell]:
    """Every cell of a run in the canonical order: the single-expert cells by layer, then the progressive ones."""
    cells = [Cell("single", int(layer)) for layer in layers if single]
    return cells + [Cell("progressive", int(layer)) for layer in layers if progressive]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: cell ``j`` of the canonical order belongs to shard ``j mod count``.

    Round-robin rather than contiguous blocks, so every shard gets a mix of single-expert and progressive cells
    and of early and late layers (their costs differ). Positions and seeds do not depend on the shard: a cell
    computes the same records in any shard, and the shards of a run together hold every cell exactly once.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"shard count {self.count!r}: give a positive number of shards (i/N with N >= 1).")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: the index counts from 0, so use 0..{self.count - 1} "
                              f"(a SLURM array for it: --array=0-{self.count - 1}).")

    @classmethod
    def parse(cls, text: str | Shard) -> Shard:
        """``"1/4"`` -> ``Shard(1, 4)``."""
        if isinstance(text, Shard):
            return text
        m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
        if not m:
            raise ConfigError(f"shard {text!r}: write it as INDEX/COUNT with the index counted from 0, e.g. 0/4 "
                              "(or --shard $SLURM_ARRAY_TASK_ID/4).")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, cells: Sequence[Cell]) -> list[Cell]:
        """This shard's cells, in canonical order."""
        return [c for j, c in enumerate(cells) if j % self.count == self.index]

    def to_dict(self) -> dict[str, int]:
        """The shard as the manifest records it: ``{"index": i, "count": n}``."""
        return {"index": self.index, "count": self.count}


@dataclass(frozen=True)
class Execution:
    """How a run's cells are computed, not what is computed: the same positions, ablations and seeds whichever
    executor, shard split or cache size computes them (records equal, tested; on CPU bit-for-bit at equal thread
    counts), so it is not part of :class:`moeaudit.RunConfig`, and a run may be resumed with other settings, except
    the shard, which decides what the directory holds (checked on resume).

    Attributes:
        executor: ``local`` (this process) or ``ray`` (Ray actors; see :mod:`moeaudit.run.execution`).
        shard: Compute only this shard's cells (``Shard`` or ``"i/N"``); ``None``: every cell.
        ray_actors: Ray actors (``None``: one per GPU of the cluster, else one per node).
        max_retries: Times a failed cell is resubmitted before the run stops with an error naming it (Ray).
        clean_cache_bytes: Bytes of clean passes kept for reuse across cells (``None``: half the free memory of
            the device; ``0``: none). See :class:`moeaudit.experiments.CleanStates`.
        before_cell: Called with the cell's name in the worker just before it computes the cell (progress hooks,
            fault injection in tests); must be picklable for Ray.
    """

    executor: str = "local"
    shard: Shard | None = None
    ray_actors: int | None = None
    max_retries: int = 2
    clean_cache_bytes: int | None = None
    before_cell: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor {self.executor!r} is not valid; valid: {', '.join(EXECUTORS)}."
                              f"{did_you_mean(self.executor, EXECUTORS)}")
        if self.shard is not None and not isinstance(self.shard, Shard):
            object.__setattr__(self, "shard", Shard.parse(self.shard))
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ConfigError(f"ray_actors={self.ray_actors}: use at least 1 actor, or leave it unset for one per "
                              "GPU (one per node without GPUs).")
        if self.ray_actors is not None and self.executor != "ray":
            raise ConfigError("ray_actors is set but the executor is local; add --executor ray.")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries}: use 0 (no retry) or more.")
        if self.clean_cache_bytes is not None and self.clean_cache_bytes < 0:
            raise ConfigError(f"clean_cache_bytes={self.clean_cache_bytes}: use 0 (keep no clean pass) or more.")

    def describe(self) -> dict[str, Any]:
        """What the manifest records of these settings."""
        return {"executor": self.executor, "shard": None if self.shard is None else str(self.shard),
                "ray_actors": self.ray_actors, "max_retries": self.max_retries,
                "clean_cache_bytes": self.clean_cache_bytes}


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_bytes(text: str | int | None) -> int | None:
    """``"8GiB"``, ``"8G"`` (binary), ``"500MB"`` (decimal), ``"0"``, or ``"auto"`` (``None``) as a byte count."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if str(text).strip().lower() == "auto":
        return None
    if not m:
        raise ConfigError(f"{text!r} is not a size; write e.g. 8GiB, 512MiB, 500MB, 0 (nothing), or auto.")
    number, prefix, binary, b = m.groups()
    unit = _UNITS[prefix + ("b" if b and not binary and prefix else "")]
    return int(float(number) * unit)


def check_shard(manifest: dict[str, Any], shard: Shard | None, path: object) -> None:
    """Refuse to resume a directory with another shard spec than the one it was started with."""
    stored = manifest.get("shard")
    stored_text = None if stored is None else f"{stored['index']}/{stored['count']}"
    requested = None if shard is None else str(shard)
    if stored_text != requested:
        held = f"shard {stored_text}" if stored_text else "an unsharded run (every cell)"
        asked = f"shard {requested}" if requested else "every cell (no --shard)"
        raise RunDirectoryError(f"{path} holds {held}, but {asked} was requested; resuming would mix shards. Run "
                                f"with {'--shard ' + stored_text if stored_text else 'no --shard'} to resume it, "
                                "or choose another output directory (--out).")
