"""Shared fixtures: tiny models of every family, cached per session (building one takes milliseconds)."""

from __future__ import annotations

import os

# One thread per test process: pytest-xdist runs one worker per core, and CLI tests start subprocesses; torch's
# default of one OpenMP thread per core oversubscribes the cores and busy-waiting threads made the suite ~3x slower.
# Set before torch is imported so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moeaudit.testing import TINY_FAMILIES, tiny_model  # noqa: E402

torch.set_num_threads(1)


@functools.cache
def cached_tiny(family: str, seed: int = 0):
    return tiny_model(family, seed=seed)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return cached_tiny(family)


def random_ids(length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g)
