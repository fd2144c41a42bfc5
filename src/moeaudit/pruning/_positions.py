"""How many positions per layer the causal importance map ablates (``n``): every valid position of the calibration
split on small models, a uniform sample of 200 on large ones, at most ``n`` when it is given.

Rule (``n`` unset): the pool's ablation count is positions x audited MoE layers x top_k (every active expert is
removed alone at every position). When the calibration split's valid positions make that at most
:data:`ALL_POSITIONS_MAX_ABLATIONS`, every position is used, so the removal cost C_e is the exact mean over the
calibration split (no sampling error from the positions; its interval then carries the documents' variation only);
otherwise :data:`SAMPLED_N` positions per layer are sampled uniformly without replacement. An explicit ``n`` caps
the count: min(n, positions).
"""

from __future__ import annotations

from collections.abc import Sequence

#: The largest pool (single-expert ablations over all audited layers) for which ``n`` unset means every position.
ALL_POSITIONS_MAX_ABLATIONS = 250_000
#: Positions per layer sampled when the pool of every position is larger than that.
SAMPLED_N = 200


def positions_per_layer(n: int | None, lengths: Sequence[int], *, min_context: int, n_layers: int,
                        top_k: int) -> tuple[int, str]:
    """The positions per layer the map ablates, and why (``"every position"``, ``"sampled"`` or ``"capped"``).

    Args:
        n: The configured ``n`` (``None``: the rule of the module docstring).
        lengths: Token counts of the calibration documents.
        min_context: Positions need at least this many tokens of context.
        n_layers: Audited MoE layers.
        top_k: Experts routed per token.
    """
    from moeaudit.corpus import valid_positions

    total = sum(len(valid_positions(length, min_context)) for length in lengths)
    if n is not None:
        return (min(n, total), "capped" if n < total else "every position")
    if total * n_layers * top_k <= ALL_POSITIONS_MAX_ABLATIONS:
        return total, "every position"
    return min(SAMPLED_N, total), "sampled"


def map_positions(config, loaded, run_dir) -> int:
    """The positions per layer of a run's map (:func:`positions_per_layer` on its calibration split), recorded in
    ``positions.json`` (``n``, ``how``, ``n_configured``)."""
    from moeaudit.models import describe

    desc = describe(loaded.model)
    n, how = positions_per_layer(config.n, [int(seq.input_ids.numel()) for seq in loaded.calibration],
                                 min_context=config.min_context, top_k=desc.top_k,
                                 n_layers=len(config.layers or desc.moe_layers))
    run_dir.write_json("positions.json", {"n": n, "how": how, "n_configured": config.n})
    return n
