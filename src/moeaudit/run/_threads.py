"""How many threads torch computes with on the CPU, chosen when the user has not said.

torch starts one intra-op thread per core. On a machine that other processes already keep busy, those threads
wait for each other (OpenMP spins until every thread of a parallel region finishes), and a run slows down many
times over: the embedded demo took 8 min 07 s with torch's default on a 2-core machine with a load of 4, and 43 s
with one thread. So, unless ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) is set, moeaudit gives torch as many
threads as there are idle cores (the cores this process may use minus the one-minute load average, rounded, at
least 1): all of them on an idle machine, one on a busy one. The choice is made before torch is imported (through
``OMP_NUM_THREADS``, which also reaches worker processes), printed at the start of a run and stored in the
manifest's session.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

#: Environment variables that set the thread count (the user's choice, never overridden).
THREAD_VARIABLES: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count and why.

    Attributes:
        threads: Threads torch computes with on the CPU.
        cores: Cores this process may run on.
        load: One-minute load average when the choice was made (``None`` where the OS does not report it).
        chosen_by: ``moeaudit`` (idle cores) or the variable the user set (``OMP_NUM_THREADS``).
    """

    threads: int
    cores: int
    load: float | None
    chosen_by: str

    def describe(self) -> str:
        """One line for the progress header."""
        if self.chosen_by != "moeaudit":
            return f"{self.threads} torch thread(s), as {self.chosen_by} sets"
        load = "" if self.load is None else f", load {self.load:.1f}"
        return (f"{self.threads} torch thread(s) ({self.cores} cores{load}; set OMP_NUM_THREADS to choose "
                "another count)")

    def to_dict(self) -> dict:
        return asdict(self)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(environ: dict[str, str] | None = None, *, cores: int | None = None,
                   load: float | None = None) -> ThreadChoice:
    """The thread count for this machine now: the user's ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` when set, else
    the idle cores, ``clip(round(cores - load), 1, cores)``."""
    environ = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
    for name in THREAD_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return ThreadChoice(int(value), cores, load, f"{name}={value}")
    idle = cores if load is None else round(cores - load)
    return ThreadChoice(max(1, min(cores, idle)), cores, load, "moeaudit")


_CHOSEN: ThreadChoice | None = None


def apply_threads() -> ThreadChoice:
    """Choose (:func:`choose_threads`) and apply the thread count for this process, once: through
    ``OMP_NUM_THREADS`` before torch is imported, or ``torch.set_num_threads`` after."""
    global _CHOSEN
    if _CHOSEN is None:
        _CHOSEN = choose_threads()
        if _CHOSEN.chosen_by == "moeaudit":
            os.environ["OMP_NUM_THREADS"] = str(_CHOSEN.threads)
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(_CHOSEN.threads)
    return _CHOSEN


def thread_record() -> dict:
    """What a manifest's session records: the threads torch computes with now, and who chose them."""
    import torch

    chosen = _CHOSEN.to_dict() if _CHOSEN is not None else {"chosen_by": "the caller"}
    return {**chosen, "threads": torch.get_num_threads()}
