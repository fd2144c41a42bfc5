"""The Ray executor: cells fanned out to Ray actors, one model per actor (one GPU each where the cluster has GPUs).

The driver (the process running :func:`moeaudit.run_audit`) connects to the cluster named by ``RAY_ADDRESS``, or
starts a local one; each actor loads the model once, verifies the engine on its own device and keeps its own
clean passes (:class:`moeaudit.experiments.CleanStates`) for every cell it computes. Cells go to whichever actor
is free; each result (the cell's record frame) comes back to the driver, which writes it atomically into the run
directory as it arrives, so an interrupted Ray run resumes like any other. A cell whose task fails (an exception,
or its actor dying: actors are restarted up to :data:`ACTOR_RESTARTS` times) is resubmitted up to ``max_retries``
times, then the run stops with an error naming the cell; a failed task never writes anything.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from moeaudit.errors import ConfigError, ExecutorError, VerificationError
from moeaudit.run.execution._local import CellJob, CellResult, OnResult
from moeaudit.run.execution._spec import Cell

#: Times Ray restarts a crashed actor (re-running its constructor: the model is loaded again).
ACTOR_RESTARTS = 2


class CellWorker:
    """A Ray actor's state: the model, its verification, and its clean passes (constructed inside the actor)."""

    def __init__(self, config: dict[str, Any], job: CellJob, *, gpu: bool, threads: int,
                 clean_cache_bytes: int | None, before_cell: Callable[[str], None] | None,
                 trust_remote_code: bool = False) -> None:
        import torch

        from moeaudit.config import RunConfig
        from moeaudit.experiments._states import CleanStates
        from moeaudit.intervene._verify import verify
        from moeaudit.models import load_model
        from moeaudit.run._preflight import resolve_device

        # Ray's rule for worker threads: OMP_NUM_THREADS where the environment sets it, else the actor's CPUs. On
        # CPU the last bits of a loss depend on the thread count (reduction order), so it is recorded.
        self.threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or threads))
        torch.set_num_threads(self.threads)
        cfg = RunConfig.from_mapping(config)
        # Ray shows an actor its own GPU only (as cuda:0), whatever index the configuration named.
        self.device = "cuda" if gpu else resolve_device("cpu" if cfg.device.startswith("cuda") else cfg.device)
        self.model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=self.device,
                                           trust_remote_code=trust_remote_code)
        self.job = job
        self.before_cell = before_cell
        self.verification = verify(self.model, tokenizer, list(job.sequences[: min(2, job.n_docs)]), seed=cfg.seed,
                                   modes=(cfg.mode,))
        self.states = CleanStates(self.model, job.sequences, layers=job.layers, budget_bytes=clean_cache_bytes)

    def ready(self) -> dict[str, Any]:
        """Where this actor runs and whether the engine verified there."""
        import platform

        return {"host": platform.node(), "pid": os.getpid(), "device": self.device, "threads": self.threads,
                "verification_passed": self.verification.passed,
                "verification_failures": [f"{c.name}: {c.detail}" for c in self.verification.checks if not c.passed]}

    def compute(self, kind: str, layer: int) -> tuple[Any, float]:
        """One cell's records and the seconds it took."""
        from moeaudit.run.execution._local import compute_cell

        cell = Cell(kind, layer)
        if self.before_cell is not None:
            self.before_cell(cell.name)
        start = time.perf_counter()
        frame = compute_cell(self.model, self.job, self.states, cell)
        return frame, time.perf_counter() - start

    def stats(self) -> dict[str, int]:
        return self.states.stats()


def _connect(ray) -> bool:
    """Connect to ``RAY_ADDRESS``'s cluster, or start a local one; ``True`` when this call started Ray."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"  # "local": never attach to someone else's `ray start`
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return True


def _plan(ray, config, actors: int | None) -> tuple[int, bool, int]:
    """``(actors, gpu, cpus per actor)`` from the cluster's resources and the configured device."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    wants_gpu = config.device == "auto" or config.device.startswith("cuda")
    if config.device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"device {config.device!r} but the Ray cluster has no GPUs; run with --device cpu, or "
                          "connect to a cluster with GPUs (RAY_ADDRESS).")
    gpu = wants_gpu and gpus > 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [1]
    if actors is None:
        actors = gpus if gpu else len(nodes) or 1
    if gpu and actors > gpus:
        raise ConfigError(f"--ray-actors {actors} asks for one GPU each, but the cluster has {gpus}; use at most "
                          f"{gpus} actors.")
    cpus = max(1, min(int(resources.get("CPU", 1)) // actors, max(node_cpus)))
    if gpu:
        cpus = 1  # the GPU does the work; leave the CPUs to other actors and the driver
    return actors, gpu, cpus


class RayExecutor:
    """Computes cells on Ray actors (see the module docstring)."""

    def __init__(self, config, *, actors: int | None = None, max_retries: int = 2,
                 clean_cache_bytes: int | None = None, before_cell: Callable[[str], None] | None = None,
                 trust_remote_code: bool = False) -> None:
        self.config = config
        self.trust_remote_code = trust_remote_code
        self.actors = actors
        self.max_retries = max_retries
        self.clean_cache_bytes = clean_cache_bytes
        self.before_cell = before_cell

    def run(self, job: CellJob, cells: Sequence[Cell], on_result: OnResult,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        import ray

        started = _connect(ray)
        handles: list = []
        try:
            n, gpu, cpus = _plan(ray, self.config, self.actors)
            n = min(n, len(cells)) or 1
            worker = ray.remote(CellWorker).options(num_cpus=cpus, num_gpus=1 if gpu else 0,
                                                    max_restarts=ACTOR_RESTARTS, max_task_retries=0)
            job_ref = ray.put(job)
            handles = [worker.remote(self.config.to_dict(), job_ref, gpu=gpu, threads=cpus,
                                     clean_cache_bytes=self.clean_cache_bytes, before_cell=self.before_cell,
                                     trust_remote_code=self.trust_remote_code)
                       for _ in range(n)]
            try:
                infos = ray.get([h.ready.remote() for h in handles])
            except ray.exceptions.RayError as exc:
                raise ExecutorError(f"a Ray actor could not start (loading {self.config.model!r} on "
                                    f"{'a GPU' if gpu else 'CPU'}): {_short(exc)}") from exc
            bad = [i for i in infos if not i["verification_passed"]]
            if bad:
                raise VerificationError(f"verification failed on the Ray actor on {bad[0]['host']} "
                                        f"({bad[0]['device']}), no data collected: "
                                        f"{'; '.join(bad[0]['verification_failures'])}")
            retries = self._dispatch(ray, handles, job, cells, on_result, progress)
            stats = [_stats(ray, h) for h in handles]
        finally:
            for h in handles:
                ray.kill(h)
            if started:
                ray.shutdown()
        return {"executor": "ray", "ray_address": os.environ.get("RAY_ADDRESS") or "local",
                "actors": [{**i, "clean_states": s} for i, s in zip(infos, stats)], "retries": retries,
                "clean_states": {k: sum(s[k] for s in stats if s) for k in ("clean_passes", "reused")}}

    def _dispatch(self, ray, handles, job: CellJob, cells: Sequence[Cell], on_result: OnResult,
                  progress) -> dict[str, int]:
        """Keep every actor busy with one cell; write results as they come; resubmit failed cells."""
        queue = deque(cells)
        idle = deque(range(len(handles)))
        running: dict = {}  # ObjectRef -> (actor index, cell or None for a recovery probe)
        failures: dict[str, int] = {}
        while queue or any(cell is not None for _, cell in running.values()):  # recovery probes alone: done
            while queue and idle:
                a = idle.popleft()
                cell = queue.popleft()
                running[handles[a].compute.remote(cell.kind, cell.layer)] = (a, cell)
            if not running:
                raise ExecutorError(f"every Ray actor died; cells not computed: {', '.join(c.name for c in queue)}.")
            (ref,), _ = ray.wait(list(running), num_returns=1)
            a, cell = running.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if cell is None:  # the actor did not come back: it is gone for good
                    continue
                failures[cell.name] = failures.get(cell.name, 0) + 1
                if failures[cell.name] > self.max_retries:
                    raise ExecutorError(f"cell {cell.name} failed {failures[cell.name]} times on Ray actors "
                                        f"(max_retries={self.max_retries}); nothing of it was written. Last error: "
                                        f"{_short(exc)}") from exc
                queue.appendleft(cell)
                if isinstance(exc, ray.exceptions.RayActorError):
                    # Wait for Ray to restart the actor (or to report it dead) before giving it work again.
                    running[handles[a].ready.options(max_task_retries=-1).remote()] = (a, None)
                else:
                    idle.append(a)
                continue
            idle.append(a)
            if cell is None:
                continue
            frame, seconds = value
            on_result(CellResult(cell, frame, seconds))
            if progress is not None:
                progress(job.positions(cell))
        return failures


def _stats(ray, handle) -> dict[str, int] | None:
    try:
        return ray.get(handle.stats.remote(), timeout=60)
    except ray.exceptions.RayError:  # an actor that died after its last cell
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
