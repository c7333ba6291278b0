"""Deterministic blending of several datasets by weight (savanna's BlendableDataset,
`savanna/data/blendable_dataset.py`).

Sample s goes to the dataset maximising w_d · max(s, 1) − count_d (ties: the lowest index); its
sample number within that dataset is count_d. The schedule is extended in blocks as the stream
asks for later samples, so resuming at sample S computes (not reads) the S decisions before it.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1 << 16


class BlendSchedule:
    """savanna's deterministic greedy blending: which dataset each sample comes from."""

    def __init__(self, weights: list[float]):
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"blending weights must be non-negative with a positive sum: {weights}"
            )
        self.weights = (weights / weights.sum()).tolist()
        self.dataset = np.zeros(0, dtype=np.int32)
        self.local = np.zeros(0, dtype=np.int64)
        self._counts = [0] * len(self.weights)

    def _extend(self, upto: int) -> None:
        n_have = len(self.dataset)
        n_new = max(BLOCK, upto - n_have)
        dataset = np.empty(n_new, dtype=np.int32)
        local = np.empty(n_new, dtype=np.int64)
        counts, weights = self._counts, self.weights
        indices = range(len(weights))
        for j in range(n_new):
            s = max(float(n_have + j), 1.0)
            best, best_error = 0, weights[0] * s - counts[0]
            for d in indices[1:]:
                error = weights[d] * s - counts[d]
                if error > best_error:
                    best, best_error = d, error
            dataset[j] = best
            local[j] = counts[best]
            counts[best] += 1
        self.dataset = np.concatenate([self.dataset, dataset])
        self.local = np.concatenate([self.local, local])

    def lookup(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, sample number within it) for global sample numbers `samples`."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(self.weights) == 1:
            return np.zeros(len(samples), dtype=np.int32), samples
        if len(samples) and samples.max() >= len(self.dataset):
            self._extend(int(samples.max()) + 1)
        return self.dataset[samples], self.local[samples]
