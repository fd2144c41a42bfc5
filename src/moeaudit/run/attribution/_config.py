"""The configuration of ``moeaudit attribute`` (:class:`AttributeConfig`): frozen and flat, built from defaults, a
preset, a TOML file and flags exactly like :class:`moeaudit.MapConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from moeaudit.config import FlatConfig, check_common
from moeaudit.errors import ConfigError
from moeaudit.pruning._config import MapConfig

#: Ablation modes attribution estimates (the engine's; a mode it learns is one name here).
ATTRIBUTION_MODES: tuple[str, ...] = ("zero", "renormalize", "reroute")


@dataclass(frozen=True)
class AttributeConfig(FlatConfig):
    """Everything that determines an attribution run (the output directory is not part of it).

    ``model``, ``name``, ``corpus``, ``text_field``, ``encoding``, ``n_docs``, ``max_length``, ``min_length``,
    ``layers``, ``min_context``, ``dtype``, ``device``, ``device_map`` and ``seed`` mean what they mean in
    :class:`moeaudit.MapConfig` (``n_docs`` documents are attributed at every position).

    Attributes:
        modes: Ablation modes to estimate (``zero``, ``renormalize``, ``reroute``); each gets an
            ``estimate_<mode>`` column and its own validation.
        n_exact: Positions per layer (sampled like the map's, seeded) where every active expert is also ablated
            exactly in each mode: the ground truth of the agreement table.
    """

    model: str = "builtin:tiny-moe"
    name: str | None = None
    corpus: str = "builtin"
    text_field: str = "text"
    encoding: str = "utf-8"
    n_docs: int = 32
    max_length: int = 512
    min_length: int = 32
    layers: tuple[int, ...] | None = None
    modes: tuple[str, ...] = ("zero",)
    n_exact: int = 100
    min_context: int = 1
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    seed: int = 0

    # What the shared checks and the map's exact pool read (token scope; one mode per pool).
    scope = "token"

    @property
    def mode(self) -> str:
        return self.modes[0] if self.modes else "zero"

    @property
    def n(self) -> int:
        return self.n_exact

    def _check(self) -> None:
        if not self.modes:
            raise ConfigError(f"modes= is empty; name at least one of {', '.join(ATTRIBUTION_MODES)}.")
        bad = [m for m in self.modes if m not in ATTRIBUTION_MODES]
        if bad:
            raise ConfigError(f"modes={','.join(self.modes)}: {', '.join(bad)} not a mode; valid: "
                              f"{', '.join(ATTRIBUTION_MODES)}.")
        if len(set(self.modes)) < len(self.modes):
            raise ConfigError(f"modes={','.join(self.modes)} repeats a mode; give each once.")
        if self.n_exact < 3:
            raise ConfigError(f"n_exact={self.n_exact} is too small: the agreement table needs exact ablations at "
                              "3 positions per layer at least (default 100).")
        check_common(self)

    with_resolved_paths = MapConfig.with_resolved_paths
    label = MapConfig.label


_DEMO = dict(model="builtin:tiny-moe", name="tiny-moe", corpus="builtin", n_docs=32, n_exact=100,
             modes=("zero", "reroute"), dtype="float32", device="cpu")


def _paper(model: str, name: str, dtype: str) -> dict:
    return dict(model=model, name=name, corpus="wikitext-2", n_docs=30, max_length=512, n_exact=200, dtype=dtype)


#: Presets of ``moeaudit attribute``: the embedded model (``demo``) and the paper's three checkpoints.
ATTRIBUTE_PRESETS: Mapping[str, AttributeConfig] = MappingProxyType({
    "demo": AttributeConfig(**_DEMO),
    "paper-olmoe": AttributeConfig(**_paper("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B", "float32")),
    "paper-qwen": AttributeConfig(**_paper("Qwen/Qwen1.5-MoE-A2.7B", "Qwen1.5-MoE-A2.7B", "bfloat16")),
    "paper-deepseek": AttributeConfig(**_paper("deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite", "float16")),
})
AttributeConfig._PRESETS = ATTRIBUTE_PRESETS
