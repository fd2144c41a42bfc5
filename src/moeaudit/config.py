"""One frozen description of an audit run, built from defaults, a preset, a TOML file and command-line flags.

Precedence, lowest first: the defaults of :class:`RunConfig`, a preset (``paper-olmoe``, ``paper-qwen``,
``paper-deepseek``, ``demo``), the keys of a TOML file, then explicit overrides (the CLI's flags). Every source goes
through :meth:`RunConfig.from_mapping`, so an unknown key or a bad value is refused the same way everywhere, with a
message naming the valid keys or values.

A TOML file is flat (one table of keys) and may name its base preset::

    preset = "paper-olmoe"
    device = "cuda"
    layers = [0, 15]

``trust_remote_code`` is not a :class:`RunConfig` key: it runs code shipped with a checkpoint, so only the caller may
enable it, per call (the ``--trust-remote-code`` flag, or ``run_audit(..., trust_remote_code=True)``). A file that
asks for it is refused, for every configuration class (``trust_remote_code = false``, which configuration files of
earlier versions hold, is accepted and asks for nothing). Relative model and corpus paths are resolved against the
current directory when a run starts (:meth:`RunConfig.with_resolved_paths`), so a run directory's ``config.toml``
names the same files from anywhere.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moeaudit._flatconfig import FlatConfig
from moeaudit.errors import ConfigError, did_you_mean

#: The paper's four observational metrics (its Table 1 order); the run's default.
PAPER_METRICS: tuple[str, ...] = ("utilization_rate", "activation_norm", "mean_routing_weight_when_active",
                                  "activation_std")
#: The paper's five experiments, plus ranking stability (observational; needs no ablation).
RUN_EXPERIMENTS: tuple[str, ...] = ("audit", "control", "rank_validity", "progressive", "redistribution",
                                    "stability")
#: Experiments a run computes only when ``experiments=`` names them: ``attribution`` ranks each token's active
#: experts by the first-order attribution estimate of their ΔL (one backward pass per document and layer) and
#: compares it with the routing-weight control at the same positions
#: (:mod:`moeaudit.experiments._attribution_control`).
OPTIONAL_EXPERIMENTS: tuple[str, ...] = ("attribution",)


def check_attribution(experiments, scope: str) -> None:
    """Refuse the attribution experiment without the routing-weight control it is compared with, or with
    sequence-scope ablations (the estimate is of a token-scope ablation's ΔL)."""
    if "attribution" in experiments and ("control" not in experiments or scope != "token"):
        raise ConfigError("the attribution experiment is compared with the routing-weight control at the same "
                          f"positions of token-scope ablations (experiments={','.join(experiments)}, "
                          f"scope={scope}); add control to the experiments and use scope=token, or leave "
                          "attribution out.")


#: Orders in which the progressive ablation removes a position's active experts: by routing weight, highest or
#: lowest first, or a seeded random order per position (every arm at the same positions: a paired design).
PROGRESSIVE_ARMS: tuple[str, ...] = ("highest", "lowest", "random")
#: Default smallest effect of interest (nats of mean ΔL) of the arms' equivalence test: 0.05 nats is a 5% change
#: of perplexity on the ablated tokens; a study should set its own.
PROGRESSIVE_SESOI = 0.05
#: How a run written before a key existed behaved, where that differs from today's default: resuming such a run
#: compares its configuration with these values (before the arms, the progressive ablation removed the highest
#: weight first only), so it resumes with ``progressive_arms = ["highest"]`` and is refused otherwise.
BEFORE_KEY_EXISTED: Mapping[str, Any] = MappingProxyType({"progressive_arms": ["highest"],
                                                          "stratify_domains": False})
SCOPES: tuple[str, ...] = ("token", "sequence")
MODES: tuple[str, ...] = ("zero", "renormalize", "reroute", "mean")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: Keys that configuration files of earlier versions hold and that no longer configure a :class:`RunConfig`.
LEGACY_KEYS: tuple[str, ...] = ("trust_remote_code",)
#: Keys that place the computation without changing its numbers beyond rounding: a run may be resumed (and shards
#: merged) with other values of these (each session records its own placement in the manifest).
PLACEMENT_KEYS: tuple[str, ...] = ("device_map",)
#: Keys that change only the summary, not a cell's records: a run that did not complete (e.g. failed in its
#: summary) may be resumed with other values of these, and its summary is computed with them.
SUMMARY_KEYS: tuple[str, ...] = ("name", "n_boot", "sesoi_d", "progressive_sesoi")
#: Corpus names that are not files (kept in step with :data:`moeaudit.corpus.NAMED_SOURCES`, tested).
CORPUS_SOURCES: tuple[str, ...] = ("wikitext-2", "builtin", "builtin:heldout", "builtin:train")
#: Fewest bootstrap resamples a configuration accepts: each 2.5% tail of a 95% interval must hold at least one
#: resample beyond the quantile, (n_boot + 1) * 0.025 >= 1 (Davison & Hinkley 1997, sec. 5.2.3); fewer gives
#: intervals that are one resample wide, or exclude their own estimate.
MIN_N_BOOT = 39


@dataclass(frozen=True)
class RunConfig(FlatConfig):
    """Everything that determines an audit's numbers (the output directory is not part of it).

    Attributes:
        model: Hub id, local checkpoint directory, or ``builtin:tiny-moe``.
        name: Label of the model in tables and figures (default: derived from ``model``).
        corpus: ``wikitext-2``, ``builtin``, ``builtin:train`` or a ``.txt`` / ``.jsonl`` / ``.parquet`` path.
        text_field: Field holding the text in ``.jsonl`` / ``.parquet`` corpora.
        encoding: Text encoding of ``.txt`` / ``.jsonl`` corpora (``utf-8``, ``latin-1``, ``cp1252``, ...).
        domain_field: Field of ``.jsonl`` / ``.parquet`` rows holding each document's domain (the built-in corpus
            labels its own): results are then also reported per domain (``tables/domains.csv``).
        stratify_domains: Where documents have domains, sample the audit's positions stratified by domain (equal
            numbers per domain) so that every domain gets enough; stored as ``False`` for a corpus without domains.
        n_docs: Documents for the single-expert experiments and the metric table (the paper: 100).
        n_docs_progressive: Documents for the progressive ablation (the paper: 200).
        max_length: Tokens per document after truncation (the paper: 512).
        min_length: Shorter documents are skipped.
        layers: MoE layers to audit (``None``: every MoE layer).
        metrics: Observational metrics to audit (columns of ``moeaudit.observe``).
        experiments: Any of :data:`RUN_EXPERIMENTS`.
        n: Positions per (layer, metric) cell (the paper: 200).
        n_progressive: Positions per layer of the progressive ablation (the paper: 500).
        progressive_arms: Removal orders of the progressive ablation, any of :data:`PROGRESSIVE_ARMS` (the paper:
            ``highest`` only); with two or more, every pair is compared position by position.
        progressive_sesoi: Equivalence bound (nats) of the arms' comparison: "equivalent" means the mean ΔL of
            two arms differs by less than this, tested (TOST).
        scope: ``token`` (Definition 2.1) or ``sequence``.
        mode: ``zero`` (the paper), ``renormalize``, ``reroute`` or ``mean`` (each removed expert's output
            replaced by its mean over the run's documents, times its routing weight; the means are computed in the
            observe stage and stored in ``expert_means.parquet``).
        min_context: Positions need at least this many tokens of context.
        dtype: ``auto`` (the checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        device_map: Spread the model over several devices with accelerate (for checkpoints larger than one GPU or
            than memory): ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, or a ``.json`` file mapping
            module names to devices. Unset: the whole model on ``device``. Does not change the numbers beyond
            rounding, so a run may be resumed with another placement.
        seed: Seed of the position sampling, the tie-breaks between equal metric values, the bootstrap intervals
            and the sign-flip tests (>= 0).
        n_boot: Bootstrap resamples of the confidence intervals.
        sesoi_d: Smallest effect size of interest, in units of d_z: the equivalence tests (TOST) claim "no effect"
            only for |d| below it.
    """

    model: str = "builtin:tiny-moe"
    name: str | None = None
    corpus: str = "builtin"
    text_field: str = "text"
    encoding: str = "utf-8"
    domain_field: str | None = None
    stratify_domains: bool = True
    n_docs: int = 100
    n_docs_progressive: int = 200
    max_length: int = 512
    min_length: int = 32
    layers: tuple[int, ...] | None = None
    metrics: tuple[str, ...] = PAPER_METRICS
    experiments: tuple[str, ...] = RUN_EXPERIMENTS
    n: int = 200
    n_progressive: int = 500
    progressive_arms: tuple[str, ...] = PROGRESSIVE_ARMS
    progressive_sesoi: float = PROGRESSIVE_SESOI
    scope: str = "token"
    mode: str = "zero"
    min_context: int = 1
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    seed: int = 0
    n_boot: int = 2000
    sesoi_d: float = 0.2

    def _check(self) -> None:
        check_common(self)
        for e in self.experiments:
            _choice("experiments", e, RUN_EXPERIMENTS + OPTIONAL_EXPERIMENTS)
        check_attribution(self.experiments, self.scope)
        for arm in self.progressive_arms:
            _choice("progressive_arms", arm, PROGRESSIVE_ARMS)
        if len(set(self.progressive_arms)) != len(self.progressive_arms):
            raise ConfigError(f"progressive_arms={list(self.progressive_arms)} names an arm twice; name each once.")
        if not self.progressive_arms and "progressive" in self.experiments:
            raise ConfigError(f"progressive_arms is empty but the progressive experiment is requested; name at least "
                              f"one of: {', '.join(PROGRESSIVE_ARMS)}.")
        if not (math.isfinite(self.progressive_sesoi) and self.progressive_sesoi > 0):
            raise ConfigError(f"progressive_sesoi={self.progressive_sesoi!r} must be a positive number of nats "
                              f"(default {PROGRESSIVE_SESOI}).")
        if not self.experiments:
            raise ConfigError("experiments= names no experiment; name at least one of: "
                              f"{', '.join(RUN_EXPERIMENTS)}.")
        if not self.metrics and ("audit" in self.experiments or "rank_validity" in self.experiments):
            raise ConfigError("metrics= names no metric but the audit / rank_validity experiments rank experts by "
                              "metrics; name at least one metric (e.g. utilization_rate).")
        for key, low in (("n_progressive", 1), ("n_docs_progressive", 1), ("n_boot", MIN_N_BOOT)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key}={getattr(self, key)} is too small; use at least {low}"
                                  + (" (a 95% interval needs (n_boot + 1) x 0.025 >= 1; default 2000)."
                                     if key == "n_boot" else "."))
        if "stability" in self.experiments and self.n_docs < 4:
            raise ConfigError(f"n_docs={self.n_docs}: ranking stability compares random halves of the documents and "
                              "needs at least 4; raise n_docs=, or leave stability out of experiments=.")
        if not 0.0 < self.sesoi_d < 10.0:
            raise ConfigError(f"sesoi_d={self.sesoi_d} is not a smallest effect of interest; give a d_z in (0, 10), "
                              "e.g. 0.2 (Cohen's small).")

    @property
    def label(self) -> str:
        """The model's name in tables and figures."""
        return model_label(self.model, self.name)

    @property
    def ablation_experiments(self) -> tuple[str, ...]:
        return tuple(e for e in self.experiments if e != "stability")

    def with_resolved_paths(self) -> RunConfig:
        """A copy whose local model directory, corpus file and ``device_map`` file are absolute paths (resolved
        against the current directory); hub ids, ``builtin:`` names and named corpora are unchanged."""
        from moeaudit.models._checkpoint import resolve_model_name

        corpus = resolve_corpus(self.corpus)
        has_domains = corpus in ("builtin", "builtin:heldout", "builtin:train") or self.domain_field is not None
        return dataclasses.replace(self, model=resolve_model_name(self.model), corpus=corpus,
                                   device_map=resolve_device_map_path(self.device_map),
                                   stratify_domains=bool(self.stratify_domains and has_domains))


def model_label(model: str, name: str | None = None) -> str:
    """A model's name in tables and figures: ``name`` when given, else the last part of its id or path."""
    if name:
        return name
    return model.rstrip("/").split("/")[-1].removeprefix("builtin:")


def check_common(config) -> None:
    """The checks every run configuration shares (scope, mode, dtype, lengths, device, layers, model, seed)."""
    _choice("scope", config.scope, SCOPES)
    _choice("mode", config.mode, MODES)
    _choice("dtype", config.dtype, DTYPES)
    for key, low in (("n", 3), ("n_docs", 1), ("max_length", 2), ("min_length", 2), ("min_context", 1),
                     ("seed", 0)):
        if getattr(config, key) < low:
            raise ConfigError(f"{key}={getattr(config, key)} is too small; use at least {low}.")
    if config.min_length > config.max_length:
        raise ConfigError(f"min_length={config.min_length} exceeds max_length={config.max_length}; no document "
                          "could pass. Lower min_length or raise max_length.")
    if not _DEVICE.match(config.device):
        raise ConfigError(f"device={config.device!r} is not a device; valid: {DEVICES}.")
    layers = config.layers
    if layers is not None and not layers:
        raise ConfigError("layers= is empty; name at least one MoE layer, or leave layers= unset (or 'all') for "
                          "every MoE layer.")
    if layers is not None and min(layers) < 0:
        raise ConfigError(f"layers={','.join(map(str, layers))}: give non-negative decoder-layer indices, or leave "
                          "layers= unset for every MoE layer.")
    if layers is not None and len(set(layers)) < len(layers):
        twice = sorted({x for x in layers if layers.count(x) > 1})
        raise ConfigError(f"layers={','.join(map(str, layers))} names layer {', '.join(map(str, twice))} more "
                          "than once; list each layer once.")
    if not config.model:
        raise ConfigError("model= is empty; give a hub id, a checkpoint directory or builtin:tiny-moe.")
    if hasattr(config, "device_map"):
        _check_device_map(config)
    try:
        codecs.lookup(config.encoding)
    except LookupError:
        raise ConfigError(f"encoding={config.encoding!r} is not a text encoding Python knows; e.g. utf-8, "
                          "latin-1, cp1252, utf-16.") from None


def _check_device_map(config) -> None:
    if config.device_map in ("", "none"):
        object.__setattr__(config, "device_map", None)
    if config.device_map is None:
        return
    from moeaudit.models._loading import DEVICE_MAPS

    if config.device_map not in DEVICE_MAPS and not config.device_map.endswith(".json"):
        _choice("device_map", config.device_map, DEVICE_MAPS)
    if config.device != "auto":
        raise ConfigError(f"device={config.device!r} and device_map={config.device_map!r} both place the model: "
                          "device puts all of it on one device, device_map spreads its layers over every visible "
                          "device (then CPU, then disk). Set one of them (leave device at 'auto' with a "
                          "device_map).")


def resolve_device_map_path(device_map: str | None) -> str | None:
    """A ``.json`` device map's absolute path (against the current directory); named strategies unchanged."""
    if device_map is not None and device_map.endswith(".json"):
        return str(Path(device_map).expanduser().resolve())
    return device_map


def resolve_corpus(corpus: str) -> str:
    """A corpus file's absolute path (against the current directory); named corpora unchanged."""
    return corpus if corpus in CORPUS_SOURCES else str(Path(corpus).expanduser().resolve())


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(valid)}.{did_you_mean(value, valid)}")


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


RunConfig._PRESETS = PRESETS


#: The embedded models the demo audits (the low-redundancy one second).
DEMO_MODELS: tuple[str, ...] = ("builtin:tiny-moe", "builtin:tiny-mixtral")


def demo_configs(model: str | None = None) -> list[RunConfig]:
    """The demo's configuration for each embedded model (``model`` None: both, :data:`DEMO_MODELS`), the
    ``demo`` preset with the model and its label swapped in.

    Raises:
        ConfigError: ``model`` is not one of the embedded models.
    """
    if model is not None and model not in DEMO_MODELS and f"builtin:{model}" not in DEMO_MODELS:
        raise ConfigError(f"model={model!r} is not an embedded model; valid: {', '.join(DEMO_MODELS)}."
                          f"{did_you_mean(model, DEMO_MODELS)}")
    chosen = DEMO_MODELS if model is None else (model if model.startswith("builtin:") else f"builtin:{model}",)
    base = preset("demo")
    return [dataclasses.replace(base, model=m, name=m.removeprefix("builtin:")) for m in chosen]


def preset(name: str) -> RunConfig:
    """The named preset (see :data:`PRESETS`).

    Args:
        name: ``demo`` (the embedded model and corpus), or ``paper-olmoe``, ``paper-qwen``, ``paper-deepseek`` (the
            paper's checkpoints, layers, precision and WikiText-2 geometry).
    """
    return RunConfig.preset(name)
