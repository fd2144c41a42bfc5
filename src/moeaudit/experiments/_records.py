"""The long-format record table: one row per ablation an experiment performs, enough to recompute every summary."""

from __future__ import annotations

import pandas as pd

#: Column order of the record table; ``summarize`` needs nothing else.
RECORD_COLUMNS: tuple[str, ...] = (
    "model",  # model name or path
    "n_layers",  # decoder layers of the model (for relative depth)
    "experiment",  # audit | control | rank_validity | progressive | redistribution | pool (single-expert pool)
    "layer",
    "metric",  # the ranking criterion ("routing_weight" for the control / progressive experiments)
    "role",  # high | low | single | <arm>:<k> (progressive: highest:3, lowest:1, random:2; before arms: top<k>)
    "seq_id",
    "position",
    "target_token",
    "active_experts",  # list[int]: routed experts at (layer, position), in router order
    "active_weights",  # list[float]: their routing weights
    "metric_values",  # list[float]: the metric of each active expert (aligned with active_experts)
    "ablated_experts",  # list[int]
    "ablated_weight",  # sum of the routing weights of the ablated experts
    "ablated_metric_value",  # the metric of the ablated expert (single-expert ablations), else NaN
    "k",  # number of experts removed
    "clean_loss",
    "ablated_loss",
    "delta",  # ablated_loss - clean_loss
    "gap_norm",  # residual-stream displacement leaving the layer at the position
    "final_gap_norm",  # displacement leaving the last decoder layer (propagated)
    "remaining_norm",  # ||MoE output - removed contribution|| (redistribution), else NaN
    "compensation_cos",  # cos(removed contribution, remaining MoE output) (redistribution), else NaN
    "relative_compensation",  # remaining_norm * max(cos, 0) / gap_norm (redistribution), else NaN
    "output_norm",  # ||E(x)||: norm of the ablated expert's unweighted output (redistribution), else NaN
    "scope",
    "mode",
    "seed",
)


def empty_records() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in RECORD_COLUMNS})


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (dicts with every record column) as a typed DataFrame in the canonical column order."""
    if not rows:
        return empty_records()
    frame = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
    ints = ["n_layers", "layer", "seq_id", "position", "target_token", "k", "seed"]
    frame[ints] = frame[ints].astype("int64")
    floats = ["ablated_weight", "ablated_metric_value", "clean_loss", "ablated_loss", "delta", "gap_norm",
              "final_gap_norm", "remaining_norm", "compensation_cos", "relative_compensation", "output_norm"]
    frame[floats] = frame[floats].astype("float64")
    return frame


def progressive_arms(roles: pd.Series) -> pd.Series:
    """The arm of each progressive record from its role (``highest:3`` -> ``highest``). Run directories written
    before the arms existed stored ``top<k>`` (highest weight first), read as ``highest``."""
    roles = roles.astype(str)
    return roles.str.split(":", n=1).str[0].where(~roles.str.match(r"^top\d+$"), "highest")
