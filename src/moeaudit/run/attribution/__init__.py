"""``moeaudit attribute``: first-order estimates of every active expert's ΔL from one backward pass (the estimator
itself is :func:`moeaudit.intervene.attribute`), measured against exact ablations per layer and mode.

The names are imported on first use (:pep:`562`), so the command line reads the configuration without importing
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeaudit.run.attribution._agreement import AGREEMENT_COLUMNS, agreement_table, removal_costs
    from moeaudit.run.attribution._config import ATTRIBUTE_PRESETS, ATTRIBUTION_MODES, AttributeConfig
    from moeaudit.run.attribution._pipeline import AttributionResult, attribution_run

_EXPORTS: dict[str, str] = {
    "AGREEMENT_COLUMNS": "_agreement",
    "ATTRIBUTE_PRESETS": "_config",
    "ATTRIBUTION_MODES": "_config",
    "AttributeConfig": "_config",
    "AttributionResult": "_pipeline",
    "agreement_table": "_agreement",
    "attribution_run": "_pipeline",
    "removal_costs": "_agreement",
}

__all__ = [
    "AGREEMENT_COLUMNS",
    "ATTRIBUTE_PRESETS",
    "ATTRIBUTION_MODES",
    "AttributeConfig",
    "AttributionResult",
    "agreement_table",
    "attribution_run",
    "removal_costs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeaudit.run.attribution' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moeaudit.run.attribution.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
