"""Position sampling shared by every experiment: uniform, without replacement, seeded, same for every metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeaudit.corpus import valid_positions


def candidate_positions(lengths: Sequence[int], seed: int, min_context: int = 1,
                        strata: Sequence[str] | None = None) -> np.ndarray:
    """All valid (seq_id, position) pairs of a corpus in a seeded random order, as an [N, 2] int array.

    Taking the first n rows samples n positions uniformly without replacement; experiments skip rows whose active
    set is too small and take the next, so every metric of a layer sees the same positions.

    With ``strata`` (one label per sequence, e.g. its domain) the order is stratified: each stratum's positions
    in their own seeded random order, interleaved round-robin over the strata (sorted by name), so the first n
    rows hold about n / (number of strata) positions of every stratum (equal allocation; a stratum that runs out
    leaves the rest to the others). Within a stratum the sample is uniform without replacement.
    """
    pairs = [np.stack([np.full(len(p), i), p], axis=1) for i, n in enumerate(lengths)
             if len(p := valid_positions(n, min_context))]
    if not pairs:
        raise ValueError(f"no valid positions: every sequence is shorter than min_context + 1 = {min_context + 1} "
                         "tokens.")
    allpairs = np.concatenate(pairs)
    shuffled = allpairs[np.random.default_rng(seed).permutation(len(allpairs))]
    if strata is None:
        return shuffled
    if len(strata) < len(lengths):
        raise ValueError(f"strata has {len(strata)} labels for {len(lengths)} sequences; give one per sequence.")
    label = np.asarray([str(x) for x in strata])[shuffled[:, 0]]
    # rank of each row within its stratum (in the seeded order), then order by (rank, stratum)
    names, code = np.unique(label, return_inverse=True)
    rank = np.empty(len(shuffled), dtype=np.int64)
    for k in range(names.size):
        rows = np.flatnonzero(code == k)
        rank[rows] = np.arange(rows.size)
    return shuffled[np.lexsort((code, rank))]
