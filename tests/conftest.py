"""Shared fixtures: tiny models of every family, cached per session (building one takes milliseconds)."""

from __future__ import annotations

import functools

import pytest
import torch

from moeaudit.testing import TINY_FAMILIES, tiny_model


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
