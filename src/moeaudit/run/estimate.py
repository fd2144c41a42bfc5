"""What a command will cost before it runs (``--dry-run``): its plan counted exactly from the configuration, the
corpus and the model's geometry, and estimates of time, peak memory and disk on the chosen device.

The plan (:class:`Workload`) is counted, not guessed: cells, documents, clean passes, ablations, records and
full forwards follow from the configuration the way the run computes them. The estimates come from the model's
*geometry*, read from its ``config.json`` (a model that cannot be downloaded is described by its published
geometry, :data:`KNOWN_GEOMETRIES`) and built on the ``meta`` device (no memory) to count its parameters, plus a
few timed operations on a *reduced* copy of it: the same configuration with only the decoder layers up to two
past its first MoE layer, random weights, on the chosen device and precision. On that copy a clean forward and
ablations at the last two layers are timed; a full clean pass then costs ``head + n_layers x layer``, and an
ablation at layer L ``c + q x (n_layers - 1 - L)`` (``c``: the ablated layer's delta and the LM head, ``q``: one
query token through one later decoder layer). Peak memory is weights + one document's clean state + the largest
chunk (:func:`moeaudit.intervene.chunk_memory_bytes`) + the process's own baseline; disk is records x bytes per
record (measured on the embedded demo) + tables, report and figures.

On the embedded demo the estimates are within a factor of :data:`TIME_FACTOR` of the real run's stage timings on
an idle or busy machine alike (tested); the counts are exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeaudit.run._geometry import KNOWN_GEOMETRIES as KNOWN_GEOMETRIES
from moeaudit.run._geometry import Timings as Timings
from moeaudit.run._geometry import model_geometry, time_primitives

#: The estimated time is within this factor of the real run's (either way) on the embedded demo (tested).
TIME_FACTOR = 3.0
#: Bytes one ablation record takes in a cell's Parquet file (measured on the embedded demo: 2.02 MB for 75,200
#: records, 27 bytes each; compression of the repeated columns), with a margin.
RECORD_BYTES = 30
#: Report, figures, summary tables and the manifest of one run (measured on the demo: 5.8 MB).
REPORT_BYTES = 6_000_000
#: CPU-bound stages, measured on the embedded demo on the idle dev box (AMD EPYC, one thread): summarising its
#: 75,200 records with n_boot = 2000, and writing the report of its 16 cells (matplotlib figures, HTML).
DEMO_RECORDS, SUMMARY_SECONDS, REPORT_SECONDS = 75_200, 4.4, 17.0
#: Starting the command (importing torch, transformers, pandas) and loading the embedded model and tokenizer: the
#: rest of the demo's 52.6 s wall time on the idle dev box.
STARTUP_SECONDS = 4.0
#: Seconds of :func:`cpu_slowdown`'s numpy work on one idle core of the dev box (CPU time, 3 runs: 0.29 s).
CPU_REFERENCE_SECONDS = 0.29
#: An observing pass (every routed expert's statistics) costs about this many clean passes (demo, idle: 3.8 s for
#: 64 documents).
OBSERVE_COST = 2.0
#: Memory the report's figures add on the CPU (matplotlib; the demo's peak RSS was 1.05 GiB with the report).
REPORT_MEMORY_BYTES = 400_000_000
#: Reading a checkpoint from disk into memory (a local SSD; a network disk is slower).
LOAD_BYTES_PER_SECOND = 1e9


@dataclass(frozen=True)
class Workload:
    """What a command computes, counted from its configuration (every count exact unless its name says ``max``).

    Attributes:
        command: ``run``, ``map``, ``prune-eval``, ``attribute``, ...
        cells: Names of the cells (units written and resumed one at a time).
        documents: Documents the command reads (tokenised).
        tokens: Tokens of those documents.
        clean_passes: Clean forwards of whole documents (observing, clean passes of the ablations, verification).
        ablations: Ablated (position, experts) units, each run through the layers after its layer:
            ``{layer: count}``.
        records: Rows the cells write.
        observed: Whole-document passes that also compute every routed expert's statistics (``observe``,
            ranking stability), each costing about :data:`OBSERVE_COST` clean passes.
        full_forwards: Other whole-document forwards (a pruned model's evaluation), each ``tokens_per_forward``.
        query_tokens: Tokens each ablation sends through the later layers (1 for token scope).
        notes: What the counts assume.
        positions: Query positions attribution estimates at (every predicted token of every document).
        estimates: Attribution estimates ``g . delta y``: positions x layers x active experts x modes.
        gradient_chunks: Attribution's forward+backward passes (one per chunk of at most 256 query positions of a
            document), from the first attributed layer to the loss.
        record_bytes: Bytes one record takes on disk (0: :data:`RECORD_BYTES`).
    """

    command: str
    cells: list[str]
    documents: int
    tokens: int
    clean_passes: int
    ablations: dict[int, int]
    records: int
    observed: int = 0
    full_forwards: int = 0
    query_tokens: float = 1.0
    notes: list[str] = field(default_factory=list)
    positions: int = 0
    estimates: int = 0
    gradient_chunks: int = 0
    record_bytes: int = 0

    @property
    def n_ablations(self) -> int:
        return int(sum(self.ablations.values()))


@dataclass(frozen=True)
class DryRun:
    """A dry run's plan and estimates (:func:`dry_run`); ``to_dict`` is what ``dry-run.json`` holds."""

    workload: Workload
    model: dict[str, Any]
    device: str
    dtype: str
    threads: int
    estimate: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        plan = asdict(self.workload)
        plan["ablations"] = {str(k): v for k, v in plan["ablations"].items()}
        plan["n_ablations"] = self.workload.n_ablations
        plan["n_cells"] = len(self.workload.cells)
        return {"plan": plan, "model": self.model, "device": self.device, "dtype": self.dtype,
                "threads": self.threads, "estimate": self.estimate, "time_factor": TIME_FACTOR}

    def lines(self) -> list[str]:
        """The dry run for a console, one line each."""
        w, e, m = self.workload, self.estimate, self.model
        return [
            f"model: {m['name']} ({m['family']}, {m['n_layers']} layers, {m['n_experts']} experts, top-{m['top_k']}, "
            f"{m['parameters'] / 1e9:.2f} B parameters; geometry from {m['geometry_from']})",
            f"device: {self.device}, {self.dtype}, {self.threads} thread(s)",
            f"plan: {len(w.cells)} cells, {w.n_ablations:,} ablations, {w.records:,} records, {w.documents} documents "
            f"({w.tokens:,} tokens), {w.clean_passes:,} clean passes, {w.full_forwards:,} other forwards",
            *([f"attribution: {w.positions:,} positions, {w.estimates:,} estimates, {w.gradient_chunks:,} "
               "forward+backward passes"] if w.estimates else []),
            f"time: about {_duration(e['seconds'])} ("
            + ", ".join(f"{k} {_duration(v)}" for k, v in e["seconds_by_stage"].items() if v) + "; within "
            f"x{TIME_FACTOR:g} on the demo: {_duration(e['seconds'] / TIME_FACTOR)} to "
            f"{_duration(e['seconds'] * TIME_FACTOR)})",
            f"peak memory: about {_size(e['peak_memory_bytes'])} ({_size(e['weights_bytes'])} weights)",
            f"disk: about {_size(e['disk_bytes'])} in the run directory"
            + (f" (+ {_size(e['download_bytes'])} to download the checkpoint)" if e.get("download_bytes") else ""),
            *[f"note: {n}" for n in w.notes],
        ]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def write_dry_run(result: DryRun, path: str | Path) -> Path:
    """``dry-run.json`` at ``path`` (atomically)."""
    from moeaudit._atomic import atomic_write_json

    return atomic_write_json(path, result.to_dict())


def dry_run(workload: Callable[[Any], Workload], *, model: str, device: str, dtype: str, seq_len: int,
            trust_remote_code: bool = False, label: str | None = None, n_boot: int = 2000,
            report: bool = True) -> DryRun:
    """The plan and estimates of a command (``--dry-run``): ``workload(geometry)`` counts the plan from the
    model's :class:`Geometry`; the estimates follow from it and a few timings on a reduced copy of the model on
    ``device`` in ``dtype`` over ``seq_len`` tokens. Nothing of a run is computed or written.

    This is the one function every command's ``--dry-run`` calls (``run``, ``map``, ``prune-eval``,
    ``attribute``): a command only says how it counts its work.
    """
    geometry = model_geometry(model, dtype=dtype, trust_remote_code=trust_remote_code)
    plan = workload(geometry)
    timings = time_primitives(geometry, device, seq_len, attribution=bool(plan.estimates))
    n = geometry.n_layers
    slowdown = cpu_slowdown()
    parts = {
        "startup": round(STARTUP_SECONDS * slowdown, 1),
        "loading": round(2.0 * slowdown + geometry.checkpoint_bytes / LOAD_BYTES_PER_SECOND, 1),
        "forwards": round(timings.clean_pass(n, plan.tokens / max(1, plan.documents))
                          * (plan.clean_passes + plan.full_forwards + OBSERVE_COST * plan.observed), 1),
        "ablations": round(timings.ablations(n, plan.ablations, plan.query_tokens), 1),
        "attribution": round(timings.attribution(n, min(plan.ablations, default=0), plan.positions,
                                                 plan.estimates), 1),
        "summary": round(SUMMARY_SECONDS * plan.records / DEMO_RECORDS * (0.5 + 0.5 * n_boot / 2000) * slowdown, 1),
        "report": round(REPORT_SECONDS * (0.5 + 0.5 * len(plan.cells) / 16) * slowdown, 1) if report else 0.0,
    }
    seconds = sum(parts.values())
    state = geometry.clean_state_bytes(seq_len)
    peak = geometry.weights_bytes + state + geometry.chunk_bytes(seq_len) + _baseline_bytes(device) \
        + (REPORT_MEMORY_BYTES if report else 0)
    disk = plan.records * (plan.record_bytes or RECORD_BYTES) + REPORT_BYTES + geometry.n_layers * geometry.n_experts * 400
    import torch

    estimate = {"seconds": round(seconds, 1), "seconds_by_stage": parts, "cpu_slowdown": round(slowdown, 2),
                "peak_memory_bytes": int(peak),
                "weights_bytes": int(geometry.weights_bytes), "clean_state_bytes": int(state),
                "disk_bytes": int(disk),
                "download_bytes": int(geometry.checkpoint_bytes) if geometry.needs_download else 0,
                "timings": asdict(timings)}
    info = {"name": label or geometry.name, "family": geometry.family, "n_layers": n,
            "moe_layers": list(geometry.moe_layers), "n_experts": geometry.n_experts, "top_k": geometry.top_k,
            "parameters": geometry.parameters, "geometry_from": geometry.source}
    return DryRun(plan, info, device, dtype=geometry.dtype, threads=torch.get_num_threads(), estimate=estimate)


def cpu_slowdown() -> float:
    """How much slower this CPU runs single-threaded numpy work now than the dev box's idle core
    (:data:`CPU_REFERENCE_SECONDS`): its speed and its load in one factor (at least 1/4)."""
    import time

    import numpy as np

    x = np.random.default_rng(0).random(1_000_000)
    start = time.perf_counter()
    for _ in range(5):
        np.sort(x)
        np.cumsum(x)
    return max(0.25, (time.perf_counter() - start) / CPU_REFERENCE_SECONDS)


def _baseline_bytes(device: str) -> int:
    """What the process holds besides the model on ``device``: its resident set now on the CPU (torch, transformers,
    pandas imported), the CUDA context on a GPU."""
    if device.startswith("cuda"):
        return 600_000_000
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 500_000_000
