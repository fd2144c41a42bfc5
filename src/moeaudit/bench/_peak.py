"""Measuring peak memory: of a process (resident set size, or CUDA's allocator) and of the tensors a block creates.

:class:`PeakMemory` is what a user sees: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at entry;
on the CPU the peak resident set size (sampled every millisecond from ``/proc/self/statm``) above the size at entry.
:class:`LiveTensorBytes` is exact and deterministic on any device: it watches every tensor operation in the block
and keeps the peak of the bytes held by storages the block created (what it allocates beyond its inputs; kernels'
private workspaces are not seen).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory:
    """Peak memory above the level at entry, while the block runs (``peak`` in bytes after exit)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before"
            return self
        _trim_heap()
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.method = "peak resident set size above the size before, sampled every 1 ms"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss_bytes()) - self._base


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and still alive (``peak`` after exit).

    A storage counts from the operation that creates it until it is freed; views and in-place results of existing
    tensors add nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: dict[tuple, int] = {}

    def _free(self, key: tuple) -> None:
        self.live -= self._owned.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {(t.device, t.untyped_storage().data_ptr()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key in inputs or key in self._owned or storage.nbytes() == 0:
                continue
            self._owned[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def _rss_bytes() -> int:
    import os
    import resource

    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime maximum (a delta still shows growth)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so the baseline is what is really in use (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
