"""A weighted mixture of training sources: which records each epoch visits, and in what order.

Source s has n_s examples (its own split, `train_<s>`) and a weight w_s. An epoch holds
round(w_s * n_s) rows of each source (at least one), shuffled together. A source's rows
walk through that source's own permutations one after another, continuing across epochs,
so with w_s < 1 every example is used once before any is used twice, and with w_s = 2 every
example is used twice per epoch. Weights of 1.0 everywhere are plain concatenation.

Everything is a function of (seed, epoch) and the sources' sizes: the iterator's position
(epoch, offset) resumes exactly, and every host computes the same epoch order, of which
host p takes positions p, p + P, ... (`pipeline.BatchIterator`).
"""

from __future__ import annotations

import numpy as np

# Distinguishes the mixture's random streams from the plain iterator's (seed, epoch) stream.
_STREAM = 0x6D6978


class ConcatSource:
  """Several random-access sources read as one: index i of source s is offsets[s] + i."""

  def __init__(self, sources):
    self._sources = list(sources)
    self.sizes = [len(source) for source in self._sources]
    self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitems__(self, indices) -> list:
    indices = np.asarray(indices, np.int64)
    which = np.searchsorted(self.offsets, indices, side="right") - 1
    out = [None] * len(indices)
    for s in np.unique(which):
      positions = np.flatnonzero(which == s)
      local = (indices[positions] - self.offsets[s]).tolist()
      for position, example in zip(positions, self._sources[s].__getitems__(local)):
        out[position] = example
    return out


class MixtureOrder:
  """`order(epoch)` -> [rows] int64 indices into a `ConcatSource` of the sources.

  Args:
    sizes: examples per source (n_s).
    weights: uses per example per epoch (w_s > 0).
    seed: the shuffling seed.
  """

  def __init__(self, sizes, weights, seed: int):
    if len(sizes) != len(weights) or not all(n > 0 for n in sizes):
      raise ValueError(f"every mixture source needs examples; got sizes {list(sizes)}")
    self.sizes = [int(n) for n in sizes]
    self.weights = [float(w) for w in weights]
    self.seed = int(seed)
    self.rows = [max(1, round(w * n)) for w, n in zip(self.weights, self.sizes)]
    self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

  def __len__(self) -> int:
    return int(sum(self.rows))

  def _source_rows(self, s: int, epoch: int) -> np.ndarray:
    """The examples of source s used in `epoch`: the next rows[s] of its permutation stream."""
    n, take = self.sizes[s], self.rows[s]
    stream = np.arange(epoch * take, (epoch + 1) * take, dtype=np.int64)
    cycle, position = stream // n, stream % n
    picked = np.empty(take, np.int64)
    for c in np.unique(cycle):
      permutation = np.random.default_rng([self.seed, _STREAM, s, int(c)]).permutation(n)
      chosen = cycle == c
      picked[chosen] = permutation[position[chosen]]
    return self.offsets[s] + picked

  def __call__(self, epoch: int) -> np.ndarray:
    rows = np.concatenate([self._source_rows(s, epoch) for s in range(len(self.sizes))])
    return rows[np.random.default_rng([self.seed, _STREAM, epoch]).permutation(len(rows))]
