"""One frozen description of an audit run, built from defaults, a preset, a TOML file and command-line flags.

Precedence, lowest first: the defaults of :class:`RunConfig`, a preset (``paper-olmoe``, ``paper-qwen``,
``paper-deepseek``, ``demo``), the keys of a TOML file, then explicit overrides (the CLI's flags). Every source goes
through :meth:`RunConfig.from_mapping`, so an unknown key or a bad value is refused the same way everywhere, with a
message naming the valid keys or values.

A TOML file is flat (one table of keys) and may name its base preset::

    preset = "paper-olmoe"
    device = "cuda"
    layers = [0, 15]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moeaudit.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: The paper's four observational metrics (its Table 1 order); the run's default.
PAPER_METRICS: tuple[str, ...] = ("utilization_rate", "activation_norm", "mean_routing_weight_when_active",
                                  "activation_std")
#: The paper's five experiments, plus ranking stability (observational; needs no ablation).
RUN_EXPERIMENTS: tuple[str, ...] = ("audit", "control", "rank_validity", "progressive", "redistribution",
                                    "stability")
SCOPES: tuple[str, ...] = ("token", "sequence")
MODES: tuple[str, ...] = ("zero", "renormalize", "reroute")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines an audit's numbers (the output directory is not part of it).

    Attributes:
        model: Hub id, local checkpoint directory, or ``builtin:tiny-moe``.
        name: Label of the model in tables and figures (default: derived from ``model``).
        corpus: ``wikitext-2``, ``builtin``, ``builtin:train`` or a ``.txt`` / ``.jsonl`` / ``.parquet`` path.
        text_field: Field holding the text in ``.jsonl`` / ``.parquet`` corpora.
        n_docs: Documents for the single-expert experiments and the metric table (the paper: 100).
        n_docs_progressive: Documents for the progressive ablation (the paper: 200).
        max_length: Tokens per document after truncation (the paper: 512).
        min_length: Shorter documents are skipped.
        layers: MoE layers to audit (``None``: every MoE layer).
        metrics: Observational metrics to audit (columns of ``moeaudit.observe``).
        experiments: Any of :data:`RUN_EXPERIMENTS`.
        n: Positions per (layer, metric) cell (the paper: 200).
        n_progressive: Positions per layer of the progressive ablation (the paper: 500).
        scope: ``token`` (Definition 2.1) or ``sequence``.
        mode: ``zero`` (the paper), ``renormalize`` or ``reroute``.
        min_context: Positions need at least this many tokens of context.
        dtype: ``auto`` (the checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        seed: Seed of the position sampling and of the bootstrap intervals.
        trust_remote_code: Run modelling code shipped with the checkpoint.
        n_boot: Bootstrap resamples of the confidence intervals.
    """

    model: str = "builtin:tiny-moe"
    name: str | None = None
    corpus: str = "builtin"
    text_field: str = "text"
    n_docs: int = 100
    n_docs_progressive: int = 200
    max_length: int = 512
    min_length: int = 32
    layers: tuple[int, ...] | None = None
    metrics: tuple[str, ...] = PAPER_METRICS
    experiments: tuple[str, ...] = RUN_EXPERIMENTS
    n: int = 200
    n_progressive: int = 500
    scope: str = "token"
    mode: str = "zero"
    min_context: int = 1
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    n_boot: int = 2000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        _choice("scope", self.scope, SCOPES)
        _choice("mode", self.mode, MODES)
        _choice("dtype", self.dtype, DTYPES)
        for e in self.experiments:
            _choice("experiments", e, RUN_EXPERIMENTS)
        if not self.experiments:
            raise ConfigError(f"experiments is empty; name at least one of: {', '.join(RUN_EXPERIMENTS)}.")
        if not self.metrics and ("audit" in self.experiments or "rank_validity" in self.experiments):
            raise ConfigError("metrics is empty but the audit / rank_validity experiments rank experts by metrics; "
                              "name at least one metric (e.g. utilization_rate).")
        for key, low in (("n", 3), ("n_progressive", 1), ("n_docs", 1), ("n_docs_progressive", 1),
                         ("max_length", 2), ("min_length", 2), ("min_context", 1), ("n_boot", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key}={getattr(self, key)} is too small; use at least {low}.")
        if self.min_length > self.max_length:
            raise ConfigError(f"min_length={self.min_length} exceeds max_length={self.max_length}; no document "
                              "could pass. Lower min_length or raise max_length.")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"layers={list(self.layers)}: give non-negative decoder-layer indices, or leave "
                              "layers unset for every MoE layer.")
        if not self.model:
            raise ConfigError("model is empty; give a hub id, a checkpoint directory or builtin:tiny-moe.")

    @property
    def label(self) -> str:
        """The model's name in tables and figures."""
        if self.name:
            return self.name
        return self.model.rstrip("/").split("/")[-1].removeprefix("builtin:")

    @property
    def ablation_experiments(self) -> tuple[str, ...]:
        return tuple(e for e in self.experiments if e != "stability")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists), every key present."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """A TOML file that :meth:`from_toml` reads back to an equal config (unset optional keys are omitted)."""
        lines = []
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated like any other source)."""
        return RunConfig.from_mapping(changes, base=self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: RunConfig | None = None,
                     source: str = "config") -> RunConfig:
        """Build from ``values`` on top of ``base`` (or the defaults); a ``preset`` key names the base.

        Raises:
            ConfigError: An unknown key (the message lists the valid keys) or a bad value.
        """
        values = dict(values)
        preset_name = values.pop("preset", None)
        if preset_name is not None:
            if base is not None:
                raise ConfigError(f"{source}: 'preset' cannot be combined with another base configuration.")
            base = preset(preset_name)
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {key!r}.{did_you_mean(key, valid)} Valid keys: "
                                  f"preset, {', '.join(valid)}.")
        merged = (base or cls()).to_dict()
        merged.update(values)
        return cls(**merged)

    @classmethod
    def from_toml(cls, path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
        """Read a flat TOML file (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a .toml file or a preset name "
                              f"({', '.join(PRESETS)}).")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{path}: tables {nested} are not supported; write every key at the top level.")
        return cls.from_mapping(values, base=base, source=str(path))


def _coerce(key: str, value: Any) -> Any:
    """Normalise the forms files and flags produce (``"0,4,7"`` / lists for tuples, ``fp16`` for ``float16``)."""
    if key in ("layers", "metrics", "experiments"):
        if value is None or (key == "layers" and value in ("", "all")):
            return None if key == "layers" else ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (or a comma-separated string), got {value!r}.")
        if key == "layers":
            try:
                return tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"layers must be integers, got {list(value)!r} (e.g. layers = [0, 4, 7]).") \
                    from None
        return tuple(str(v) for v in value)
    if key == "dtype" and isinstance(value, str):
        return _DTYPE_ALIASES.get(value.lower(), value.lower())
    expected = _TYPES.get(key)
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if expected is str and not isinstance(value, str) and not (key == "name" and value is None):
        raise ConfigError(f"{key} must be a string, got {value!r}.")
    return value


_TYPES = {"model": str, "name": str, "corpus": str, "text_field": str, "n_docs": int, "n_docs_progressive": int,
          "max_length": int, "min_length": int, "n": int, "n_progressive": int, "scope": str, "mode": str,
          "min_context": int, "dtype": str, "device": str, "seed": int, "trust_remote_code": bool, "n_boot": int}


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not valid; valid: {', '.join(valid)}.{did_you_mean(value, valid)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _paper(model: str, name: str, layers: tuple[int, ...], dtype: str) -> RunConfig:
    return RunConfig(model=model, name=name, corpus="wikitext-2", n_docs=100, n_docs_progressive=200,
                     max_length=512, layers=layers, n=200, n_progressive=500, dtype=dtype)


#: Named starting points. The paper's three reproduce its geometry (models, layers, n, corpus, precision).
PRESETS: Mapping[str, RunConfig] = MappingProxyType({
    "paper-olmoe": _paper("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B", (0, 4, 7, 11, 15), "float32"),
    "paper-qwen": _paper("Qwen/Qwen1.5-MoE-A2.7B", "Qwen1.5-MoE-A2.7B", (0, 6, 12, 18, 23), "bfloat16"),
    "paper-deepseek": _paper("deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite", (1, 7, 13, 20, 26), "float16"),
    "demo": RunConfig(model="builtin:tiny-moe", name="tiny-moe", corpus="builtin", n_docs=64, n_docs_progressive=64,
                      n=200, n_progressive=200, dtype="float32", device="cpu"),
})


def preset(name: str) -> RunConfig:
    """The named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}.{did_you_mean(name, PRESETS)}")
    return PRESETS[name]
