"""Model loading and the per-family MoE adapters (routers, experts, shared experts, routing rules)."""

from moeaudit.models._describe import (
    MoEDescription,
    adapter_for,
    decoder_layers,
    describe,
    moe_block,
    moe_layers,
    router,
)
from moeaudit.models._families import FAMILIES, FamilyAdapter, RoutingGroups
from moeaudit.models._loading import load_model, resolve_dtype

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "MoEDescription",
    "RoutingGroups",
    "adapter_for",
    "decoder_layers",
    "describe",
    "load_model",
    "moe_block",
    "moe_layers",
    "resolve_dtype",
    "router",
]
