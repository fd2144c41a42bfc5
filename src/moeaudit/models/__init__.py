"""Model loading and the per-family MoE adapters (routers, experts, shared experts, routing rules)."""

from moeaudit.models._describe import (
    MoEDescription,
    adapter_for,
    decoder_layers,
    describe,
    model_device,
    moe_block,
    moe_layers,
    router,
)
from moeaudit.models._families import FAMILIES, FamilyAdapter, RoutingGroups, attention_dims
from moeaudit.models._finite import check_finite, first_nonfinite_module, nonfinite_weights
from moeaudit.models._loading import (
    DEVICE_MAPS,
    check_device,
    execution_device,
    load_model,
    load_tokenizer,
    load_weights,
    materialized,
    resolve_device_map,
    resolve_dtype,
)

__all__ = [
    "DEVICE_MAPS",
    "FAMILIES",
    "FamilyAdapter",
    "MoEDescription",
    "RoutingGroups",
    "adapter_for",
    "attention_dims",
    "check_device",
    "check_finite",
    "decoder_layers",
    "describe",
    "execution_device",
    "first_nonfinite_module",
    "materialized",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "model_device",
    "moe_block",
    "moe_layers",
    "nonfinite_weights",
    "resolve_device_map",
    "resolve_dtype",
    "router",
]
