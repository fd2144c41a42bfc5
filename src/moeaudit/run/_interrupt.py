"""Stopping a run cleanly: SIGTERM (``kill``, a scheduler's preemption) raised like Ctrl-C, so that every way of
interrupting a run ends the same way (the manifest says ``interrupted``, the lock is released, finished cells
are kept).

A process forked while a run holds the handler (a ``multiprocessing`` pool's worker: lm-eval's bootstrap forks
one per CPU) must keep SIGTERM's default action, or ``Pool.terminate`` cannot end it. Resetting the handler in the
child is not enough on its own: a SIGTERM that reaches the child before Python's after-fork bookkeeping is caught by
the inherited handler and then dropped by that bookkeeping, and the pool waits forever. So SIGTERM is blocked across
``fork()`` and unblocked in the child only after its action is the default again (a pending SIGTERM then ends it).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_owner: int | None = None  # the pid whose SIGTERM handler is ours, while one is installed
_fork_hooks = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's preemption), raised like Ctrl-C so that a run stops the same way: the
    manifest says ``interrupted``, the lock is released, finished cells are kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum} ({signal.Signals(signum).name})")
        self.signum = signum


def _ours() -> bool:
    return _owner is not None and _owner == os.getpid()


def _before_fork() -> None:
    if _ours():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_in_parent() -> None:
    if _ours():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _after_fork_in_child() -> None:
    global _owner
    if _owner is not None and _owner != os.getpid():
        _owner = None
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _handler(signum, frame) -> None:
    if not _ours():  # a child forked some other way than os.fork: die the default way
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration (main thread only, and only where SIGTERM still has
    its default action: a handler the application installed is left alone); processes forked meanwhile keep the
    default action (see the module docstring)."""
    global _owner, _fork_hooks
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    if not _fork_hooks:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _fork_hooks = True
    previous = signal.signal(signal.SIGTERM, _handler)
    _owner = os.getpid()
    try:
        yield
    finally:
        _owner = None
        signal.signal(signal.SIGTERM, previous)
