"""Deterministic, resumable order of training pairs.

The pairs of step ``s`` are a pure function of (seed, step): epoch ``e`` is a seeded permutation of
all pair indices, and step ``s`` takes the global slice ``[s*B, (s+1)*B)`` of the concatenated
epochs, split evenly across ranks. Resuming at step ``s`` therefore needs no replay and no loader
state beyond the step number (the usual "skip first batches" pitfalls do not arise).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class PairSampler:
    def __init__(self, num_pairs: int, pairs_per_step: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_pairs < 1:
            raise ValueError("no training pairs")
        if pairs_per_step % world_size:
            raise ValueError(
                f"pairs_per_step {pairs_per_step} is not divisible by the world size {world_size}"
            )
        self.num_pairs, self.pairs_per_step, self.seed = num_pairs, pairs_per_step, seed
        self.rank, self.world_size = rank, world_size

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per sampler, freed with it
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

    def global_batch(self, step: int) -> np.ndarray:
        """Indices of all pairs of ``step`` (every rank's share, in rank order)."""
        start = step * self.pairs_per_step
        out = []
        while len(out) < self.pairs_per_step:
            epoch, offset = divmod(start + len(out), self.num_pairs)
            take = min(self.pairs_per_step - len(out), self.num_pairs - offset)
            out.extend(self._epoch(epoch)[offset : offset + take].tolist())
        return np.asarray(out, dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """This rank's indices for ``step``."""
        per_rank = self.pairs_per_step // self.world_size
        return self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def epoch_of(self, step: int) -> int:
        return (step * self.pairs_per_step) // self.num_pairs
