"""Super experts: the experts whose single removal costs most, and protecting them from every pruning.

The cost of removing one expert alone is its *removal cost*: the mean loss increase over every sampled calibration
position of its layer when it is removed (0 where the router did not choose it), i.e. its routed share times its
mean ΔL when routed. ``importance.parquet``'s ``removal_cost`` column is used when the map has one; otherwise it is
computed here from the single-expert pool records (:func:`removal_costs`). "Super experts" are the ``k`` largest
removal costs over every pruned layer (one model-wide ranking: the few experts whose loss breaks a model, cf. Su et
al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models", arXiv:2507.23279, who find them by
their activation outliers; here they are found by what removing them costs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moeaudit.errors import ConfigError

#: Columns of :func:`super_experts` (``super_experts.csv``).
SUPER_COLUMNS: tuple[str, ...] = ("rank", "layer", "expert", "removal_cost", "routed_share", "mean_delta")


def removal_costs(records: pd.DataFrame, layers: Sequence[int], n_experts: int) -> pd.DataFrame:
    """Per (layer, expert): ``routed_share`` (share of the layer's sampled positions where the expert was active)
    and ``removal_cost`` = sum of its ΔL over the positions where it was active / the layer's sampled positions
    (the mean over all positions, 0 where not routed), from single-expert pool records (``experiment == "pool"``).
    """
    pool = records[records["experiment"] == "pool"]
    rows = []
    for layer in layers:
        part = pool[pool["layer"] == layer]
        n_positions = len(part[["seq_id", "position"]].drop_duplicates()) if len(part) else 0
        expert = np.array([int(e[0]) for e in part["ablated_experts"]], dtype=np.int64)
        delta = part["delta"].to_numpy(dtype=float)
        for e in range(n_experts):
            mine = delta[expert == e]
            share = len(mine) / n_positions if n_positions else np.nan
            cost = float(mine.sum()) / n_positions if n_positions else np.nan
            rows.append((int(layer), e, cost, share))
    return pd.DataFrame(rows, columns=["layer", "expert", "removal_cost", "routed_share"])


def super_experts(importance: pd.DataFrame, k: int, *, records: pd.DataFrame | None = None,
                  layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The ``k`` experts of ``layers`` (default: every layer of ``importance``) with the largest removal cost,
    largest first (see :data:`SUPER_COLUMNS`; ties broken by layer then expert id)."""
    table = importance.copy()
    if "removal_cost" not in table.columns:
        if records is None:
            raise ValueError("the importance map has no removal_cost column; pass the pool records to compute it.")
        layers_all = sorted(table["layer"].unique().tolist())
        n_experts = int(table.groupby("layer")["expert"].count().max())
        costs = removal_costs(records, layers_all, n_experts)
        table = table.merge(costs, on=["layer", "expert"], how="left")
    if "routed_share" not in table.columns:
        table["routed_share"] = np.nan
    if layers is not None:
        table = table[table["layer"].isin(list(layers))]
    table = table[np.isfinite(table["removal_cost"].to_numpy(dtype=float))]
    table = table.sort_values(["removal_cost", "layer", "expert"], ascending=[False, True, True]).head(k)
    out = table[["layer", "expert", "removal_cost", "routed_share", "mean_delta"]].reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def protected_map(table: pd.DataFrame) -> dict[int, tuple[int, ...]]:
    """Layer -> the protected experts of :func:`super_experts`' table."""
    out: dict[int, list[int]] = {}
    for layer, expert in zip(table["layer"].astype(int), table["expert"].astype(int)):
        out.setdefault(int(layer), []).append(int(expert))
    return {layer: tuple(sorted(e)) for layer, e in out.items()}


def protect(scores: dict[int, np.ndarray], protected: dict[int, tuple[int, ...]], m: int) -> dict[int, np.ndarray]:
    """Criterion scores with the protected experts raised to +inf (ranked most important, never removed).

    Raises:
        ConfigError: a layer with fewer than ``m`` unprotected experts (the fraction could not be removed).
    """
    out = {}
    for layer, values in scores.items():
        values = np.asarray(values, dtype=float).copy()
        keep = list(protected.get(layer, ()))
        if len(values) - len(keep) < m:
            raise ConfigError(f"--protect-top protects {len(keep)} experts of layer {layer}, leaving "
                              f"{len(values) - len(keep)} to remove {m} from; protect fewer experts or prune a "
                              "smaller fraction.")
        values[keep] = np.inf
        out[layer] = values
    return out
