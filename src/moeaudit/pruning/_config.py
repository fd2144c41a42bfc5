"""The configurations of ``moeaudit map`` (:class:`MapConfig`) and ``moeaudit prune-eval`` (:class:`PruneConfig`):
frozen, flat, built from defaults, a preset, a TOML file and flags exactly like :class:`moeaudit.RunConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from moeaudit.config import MIN_N_BOOT, FlatConfig, check_common, model_label, resolve_corpus, resolve_device_map_path
from moeaudit.errors import ConfigError

#: Criterion ranking experts by a seeded random permutation (the baseline band).
RANDOM = "random"
#: Criterion ranking experts by their mean ΔL in the causal importance map (the reference).
CAUSAL = "causal"
#: Criterion ranking experts by their exact single-removal cost (``reference="loo"``: each removed alone).
CAUSAL_LOO = "causal_loo"
#: Criterion ranking experts by their attribution removal cost (routed share x mean first-order estimate of ΔL over
#: every calibration position, in the run's mode; see :func:`moeaudit.attribute`). Opt-in: not in the default set.
ATTRIBUTION = "attribution"
#: The unpruned model's row in the result tables.
NONE = "none"
#: How the total number of removed experts is spread over the pruned layers (see :mod:`moeaudit.pruning._plan`).
ALLOCATIONS: tuple[str, ...] = ("uniform", "global", "causal")
#: What replaces a removed expert; ``delete`` removes its router slot (the only method of this module; the
#: ``method`` key column of every table leaves room for others).
DELETE = "delete"
#: Causal references: ``removal_cost`` (from the importance map) and ``loo`` (also the exact single-removal cost).
REFERENCES: tuple[str, ...] = ("removal_cost", "loo")


#: Values of :attr:`PruneConfig.method` (kept in step with :data:`moeaudit.pruning._mean.METHODS`, tested).
PRUNE_METHODS: tuple[str, ...] = ("delete", "mean")


def _check_methods(config) -> None:
    from moeaudit.errors import did_you_mean

    if not config.method:
        raise ConfigError("method= is empty; name delete, mean or both (delete,mean).")
    for m in config.method:
        if m not in PRUNE_METHODS:
            raise ConfigError(f"method={','.join(config.method)}: {m!r} is not a removal method; valid: "
                              f"{', '.join(PRUNE_METHODS)}.{did_you_mean(m, PRUNE_METHODS)}")
    if len(set(config.method)) < len(config.method):
        raise ConfigError(f"method={','.join(config.method)} repeats a value; give each method once.")
    if config.lm_eval_tasks and "delete" not in config.method:
        raise ConfigError("lm_eval_tasks= scores the deleted-expert prunings only; add delete to method= "
                          f"(method={','.join(config.method)}).")
    if isinstance(config.protect_top, bool) or config.protect_top < 0:
        raise ConfigError(f"protect_top={config.protect_top!r}: give the number of super experts to protect "
                          "(>= 0; 0 protects none).")


def _no_mean_map(config) -> None:
    if config.mode == "mean":
        raise ConfigError("mode='mean' is an audit ablation (moeaudit run --mode mean); the importance map ablates "
                          "with reroute (default), zero or renormalize. For mean replacement in pruning use "
                          "prune-eval's --method mean.")


@dataclass(frozen=True)
class MapConfig(FlatConfig):
    """Everything that determines a causal importance map (the output directory is not part of it).

    Attributes:
        model: Hub id, local checkpoint directory, or ``builtin:tiny-moe``.
        name: Label of the model in tables and figures (default: derived from ``model``).
        corpus: ``wikitext-2``, ``builtin``, ``builtin:train`` or a ``.txt`` / ``.jsonl`` / ``.parquet`` path.
        text_field: Field holding the text in ``.jsonl`` / ``.parquet`` corpora.
        encoding: Text encoding of ``.txt`` / ``.jsonl`` corpora (``utf-8``, ``latin-1``, ``cp1252``, ...).
        n_docs: Documents of the calibration split (the first documents of ``corpus`` that pass the length filter).
        max_length: Tokens per document after truncation.
        min_length: Shorter documents are skipped.
        layers: MoE layers to map (and, for prune-eval, to prune); ``None``: every MoE layer.
        n: Positions per layer; every active expert is ablated singly at each (the single-expert pool). ``None``
            (default): every valid position of the calibration split when the pool is small (positions x layers x
            top_k at most 250,000 ablations), else 200 sampled; an integer caps it (see
            :func:`moeaudit.pruning._positions.positions_per_layer`).
        scope: ``token`` (the expert removed at the position only) or ``sequence``.
        mode: ``reroute`` (default: the router picks top-k from the remaining experts, as in a pruned model),
            ``zero`` (the paper's ablation) or ``renormalize``.
        min_context: Positions need at least this many tokens of context.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        device_map: Spread the model over several devices with accelerate, as :class:`moeaudit.RunConfig`'s (a
            placement: a run may be resumed with another one).
        seed: Seed of the position sampling (and, for prune-eval, of tie-breaks, random rankings and resampling).

    ``trust_remote_code`` is not a key (as for :class:`moeaudit.RunConfig`): only the caller enables it, per call
    (``--trust-remote-code``, or ``importance_map(..., trust_remote_code=True)``).
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
    n: int | None = None
    scope: str = "token"
    mode: str = "reroute"
    min_context: int = 1
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    seed: int = 0

    def _check(self) -> None:
        check_common(dataclasses.replace(self, n=3) if self.n is None else self)  # None: positions_per_layer
        _no_mean_map(self)

    def with_resolved_paths(self):
        """A copy whose local model directory and corpus files are absolute paths (resolved against the current
        directory), so the run directory's configuration means the same inputs from anywhere."""
        from moeaudit.models._checkpoint import resolve_model_name

        return dataclasses.replace(self, model=resolve_model_name(self.model), corpus=resolve_corpus(self.corpus),
                                   device_map=resolve_device_map_path(self.device_map))

    @property
    def label(self) -> str:
        """The model's name in tables and figures."""
        return model_label(self.model, self.name)


@dataclass(frozen=True)
class PruneConfig(MapConfig):
    """Everything that determines a prune-eval run: the map's keys (computed on the calibration split) and:

    Attributes:
        eval_corpus: Corpus of the evaluation split; ``None``: documents of ``corpus`` disjoint from the
            calibration ones (``folds=1`` only; cross-fitting needs one corpus).
        n_docs_eval: Documents of the evaluation split. With ``folds >= 2`` the run draws ``n_docs + n_docs_eval``
            documents of ``corpus`` and deals them into ``folds`` folds instead.
        split_seed: Seed of the document shuffle that makes the splits (the corpus's order never decides them).
        stratify_field: Field of a ``.jsonl`` / ``.parquet`` corpus whose values stratify the splits (every value in
            every split, in proportion); the builtin corpus is stratified by its domains without it.
        folds: Cross-fitting folds K: each fold evaluates its documents with criteria computed on the other
            folds' documents, so every document is evaluated once; ``1`` is one split (``n_docs`` calibration,
            ``n_docs_eval`` evaluation documents).
        allocation: How the removed experts are spread over layers at the same total: ``uniform`` (m per layer),
            ``global`` (one ranking of every layer's experts by the criterion's raw value) and ``causal`` (per-layer
            counts where the calibration split's removal costs are lowest, the criterion picking within layers).
        reference: ``removal_cost`` (the causal reference ranks experts by their removal cost, estimated from the
            importance map) or ``loo`` (also the exact single-removal cost of every expert, criterion
            ``causal_loo``: E x layers evaluations of the calibration split).
        criteria: Criteria to prune by: ``observe`` metrics, ``random`` and ``causal``; ``None``: all of them.
        fractions: Shares of each layer's experts to remove.
        random_seeds: Seeds of the ``random`` criterion (its band).
        per_layer: Also prune one layer at a time (every criterion, fraction and seed), to show where pruning hurts.
        alpha: Family-wise error rate of the paired tests (Holm over criteria x fractions).
        n_boot: Document bootstrap resamples of the intervals.
        n_perm: Document sign flips of the permutation test (exact enumeration when 2^documents is smaller).
        lm_eval_tasks: lm-evaluation-harness tasks to score every pruned model on (needs ``moeaudit[lmeval]``).
        lm_eval_include: Directory of extra lm-eval task YAMLs (``include_path``), e.g. local tasks.
        lm_eval_limit: Score at most this many documents per task (``None``: all).
        method: How experts are removed, each applied to every criterion, fraction and seed: ``delete`` (the
            router can no longer choose them, as in a sliced checkpoint) and/or ``mean`` (they keep their router
            slot and output their mean over the calibration tokens routed to them, times the routing weight: MoNE's
            constant; see :func:`moeaudit.pruning.mean_replaced`).
        protect_top: Never remove the this many experts with the largest single-removal cost on the calibration
            split (model-wide "super experts", from the importance map; 0: protect none).
    """

    eval_corpus: str | None = None
    n_docs_eval: int = 32
    split_seed: int = 0
    stratify_field: str | None = None
    folds: int = 2
    allocation: tuple[str, ...] = ("uniform",)
    reference: str = "removal_cost"
    criteria: tuple[str, ...] | None = None
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    random_seeds: int = 20
    per_layer: bool = False
    alpha: float = 0.05
    n_boot: int = 2000
    n_perm: int = 10000
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    method: tuple[str, ...] = ("delete",)
    protect_top: int = 0

    def _check(self) -> None:
        check_common(dataclasses.replace(self, n=3) if self.n is None else self)  # None: positions_per_layer
        _no_mean_map(self)
        if not self.fractions:
            raise ConfigError("fractions= is empty; give at least one share of experts to remove, e.g. 0.25.")
        bad = [f for f in self.fractions if not 0 < f < 1]
        if bad:
            raise ConfigError(f"fractions={','.join(map(str, self.fractions))}: {bad} are not in (0, 1); give shares of each layer's experts to remove, "
                              "e.g. fractions = [0.125, 0.25, 0.5].")
        if len(set(self.fractions)) < len(self.fractions):
            raise ConfigError(f"fractions={','.join(map(str, self.fractions))} repeats a value; give each fraction once.")
        if self.criteria is not None and not self.criteria:
            raise ConfigError("criteria= is empty; name at least one criterion, or leave criteria= unset for all of them.")
        if self.criteria is not None and len(set(self.criteria)) < len(self.criteria):
            raise ConfigError(f"criteria={','.join(self.criteria)} repeats a name; give each criterion once.")
        if self.random_seeds < 2 and (self.criteria is None or "random" in self.criteria):
            raise ConfigError(f"random_seeds={self.random_seeds}: the random band and its test need at least 2 "
                              "seeds (default 20).")
        if self.folds < 1:
            raise ConfigError(f"folds={self.folds}: use 1 (one split) or more (cross-fitting; default 2).")
        if self.folds > 1 and self.eval_corpus is not None:
            raise ConfigError(f"folds={self.folds} swaps calibration and evaluation documents, which needs one "
                              f"corpus, but eval_corpus={self.eval_corpus!r} names another; set folds=1 with "
                              "eval_corpus=, or drop eval_corpus= to cross-fit.")
        if self.folds > 1 and self.n_docs + self.n_docs_eval < 2 * self.folds:
            raise ConfigError(f"folds={self.folds} needs at least 2 documents per fold, but n_docs + n_docs_eval = "
                              f"{self.n_docs + self.n_docs_eval}; raise n_docs / n_docs_eval or lower folds.")
        if self.split_seed < 0:
            raise ConfigError(f"split_seed={self.split_seed} is negative; use a seed >= 0.")
        if not self.allocation:
            raise ConfigError("allocation= is empty; give one or more of " + ", ".join(ALLOCATIONS) + ".")
        bad = [a for a in self.allocation if a not in ALLOCATIONS]
        if bad or len(set(self.allocation)) < len(self.allocation):
            raise ConfigError(f"allocation={','.join(self.allocation)}: each of "
                              f"{', '.join(ALLOCATIONS)} at most once (e.g. allocation=uniform,causal).")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference={self.reference!r}; valid: {', '.join(REFERENCES)}.")
        if self.n_docs_eval < 2:
            raise ConfigError(f"n_docs_eval={self.n_docs_eval}: the document-level tests need at least 2 "
                              "evaluation documents (more give them power; default 32).")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha={self.alpha} is not in (0, 1); e.g. 0.05.")
        if self.n_boot < MIN_N_BOOT:
            raise ConfigError(f"n_boot={self.n_boot} is too small; use at least {MIN_N_BOOT} (a 95% interval needs "
                              "(n_boot + 1) x 0.025 >= 1; default 2000).")
        if self.n_perm < 1:
            raise ConfigError(f"n_perm={self.n_perm}: use at least 1 (default 10000).")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ConfigError(f"lm_eval_limit={self.lm_eval_limit}: use at least 1, or leave it unset for every "
                              "document of each task.")
        _check_methods(self)
        if self.lm_eval_include is not None and not self.lm_eval_tasks:
            raise ConfigError("lm_eval_include= is set but lm_eval_tasks= is empty; name the tasks to score.")

    def with_resolved_paths(self) -> PruneConfig:
        """:meth:`MapConfig.with_resolved_paths`, and the evaluation corpus and lm-eval task directory."""
        resolved = super().with_resolved_paths()
        include = self.lm_eval_include
        return dataclasses.replace(
            resolved, eval_corpus=None if self.eval_corpus is None else resolve_corpus(self.eval_corpus),
            lm_eval_include=None if include is None else str(Path(include).expanduser().resolve()))

    def map_config(self) -> MapConfig:
        """The importance map this run computes on its calibration split."""
        keys = MapConfig.__dataclass_fields__
        return MapConfig(**{k: v for k, v in self.to_dict().items() if k in keys})


def _paper_map(model: str, name: str, dtype: str) -> dict:
    return dict(model=model, name=name, corpus="wikitext-2", n_docs=30, max_length=512, n=200, dtype=dtype)


_PAPER = {
    "paper-olmoe": _paper_map("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B", "float32"),
    "paper-qwen": _paper_map("Qwen/Qwen1.5-MoE-A2.7B", "Qwen1.5-MoE-A2.7B", "bfloat16"),
    "paper-deepseek": _paper_map("deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite", "float16"),
}
_DEMO = dict(model="builtin:tiny-moe", name="tiny-moe", corpus="builtin", n_docs=32, n=200, dtype="float32",
             device="cpu")
#: prune-eval's demo: every position of the calibration split for the removal costs (``n`` unset; the embedded
#: model's pool is small, see :mod:`moeaudit.pruning._positions`).
_DEMO_PRUNE = {**_DEMO, "n": None}

#: Presets of ``moeaudit map``: the embedded model (``demo``) and the paper's three checkpoints on WikiText-2.
MAP_PRESETS: Mapping[str, MapConfig] = MappingProxyType(
    {"demo": MapConfig(**_DEMO), **{k: MapConfig(**v) for k, v in _PAPER.items()}})
#: Presets of ``moeaudit prune-eval``: WikiText-2's test split has about 60 articles, so the paper presets
#: calibrate on 30 and evaluate on the next 30.
PRUNE_PRESETS: Mapping[str, PruneConfig] = MappingProxyType(
    {"demo": PruneConfig(**_DEMO_PRUNE, n_docs_eval=32, random_seeds=20),
     **{k: PruneConfig(**v, n_docs_eval=30) for k, v in _PAPER.items()}})
MapConfig._PRESETS = MAP_PRESETS
PruneConfig._PRESETS = PRUNE_PRESETS
