"""How many positions the causal importance map ablates (moeaudit.pruning._positions): every valid position of the
calibration split by default when the pool (positions x layers x top_k) is at most 250,000 ablations, 200 sampled
above that, at most n when n is given; on the embedded model the records cover every position, counted by hand."""

from __future__ import annotations

import json

import pytest

from moeaudit import importance_map
from moeaudit.pruning import MapConfig
from moeaudit.pruning._positions import ALL_POSITIONS_MAX_ABLATIONS, SAMPLED_N, positions_per_layer


def _by_hand(lengths, min_context):
    """Positions t with a next token (t <= T - 2) and t + 1 >= min_context tokens of context."""
    return sum(1 for T in lengths for t in range(T) if t <= T - 2 and t + 1 >= min_context)


def test_rule():
    lengths = [100, 37, 2, 64]
    total = _by_hand(lengths, 4)
    assert positions_per_layer(None, lengths, min_context=4, n_layers=8, top_k=2) == (total, "every position")
    assert positions_per_layer(50, lengths, min_context=4, n_layers=8, top_k=2) == (50, "capped")
    assert positions_per_layer(10**6, lengths, min_context=4, n_layers=8, top_k=2) == (total, "every position")
    big = [4097] * 200  # 819,200 positions: far over the bound at any top_k
    assert positions_per_layer(None, big, min_context=1, n_layers=1, top_k=1) == (SAMPLED_N, "sampled")
    edge = [ALL_POSITIONS_MAX_ABLATIONS // 4 + 1]  # exactly the bound at 2 layers x top_k 2
    assert positions_per_layer(None, edge, min_context=1, n_layers=2, top_k=2)[1] == "every position"
    assert positions_per_layer(None, [edge[0] + 1], min_context=1, n_layers=2, top_k=2)[1] == "sampled"


def test_defaults():
    assert MapConfig().n is None
    assert MapConfig.preset("demo").n == 200  # the map demo keeps its sampled positions
    with pytest.raises(ValueError, match="n=2 is too small"):
        MapConfig(n=2)


@pytest.mark.slow
def test_map_uses_every_position_by_default(tmp_path):
    config = MapConfig(model="builtin:tiny-moe", n_docs=2, max_length=24, min_length=8, layers=(1,),
                       dtype="float32", device="cpu")
    result = importance_map(config, tmp_path / "run", report=False)
    records = result.records
    recorded = json.loads((tmp_path / "run" / "positions.json").read_text())
    positions = records[["seq_id", "position"]].drop_duplicates()
    assert recorded["how"] == "every position" and recorded["n"] == len(positions) == 2 * 23
    for _, part in positions.groupby("seq_id"):  # builtin documents are longer than 24 tokens: truncated to 24
        assert sorted(part["position"]) == list(range(23))  # t = 0..T-2, every one with a next token
