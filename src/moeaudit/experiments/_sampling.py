"""Position sampling shared by every experiment: uniform, without replacement, seeded, same for every metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeaudit.corpus import valid_positions


def candidate_positions(lengths: Sequence[int], seed: int, min_context: int = 1) -> np.ndarray:
    """All valid (seq_id, position) pairs of a corpus in a seeded random order, as an [N, 2] int array.

    Taking the first n rows samples n positions uniformly without replacement; experiments skip rows whose active
    set is too small and take the next, so every metric of a layer sees the same positions.
    """
    pairs = [np.stack([np.full(len(p), i), p], axis=1) for i, n in enumerate(lengths)
             if len(p := valid_positions(n, min_context))]
    if not pairs:
        raise ValueError(f"no valid positions: every sequence is shorter than min_context + 1 = {min_context + 1} "
                         "tokens.")
    allpairs = np.concatenate(pairs)
    return allpairs[np.random.default_rng(seed).permutation(len(allpairs))]
