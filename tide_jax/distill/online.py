"""Row reductions over the vocabulary a tile of columns at a time (the forward passes' online form).

A row kernel's tile-by-tile forward (``fused.py``) sees each ``[c, tile]`` piece of logits
once. These helpers keep what a row reduction needs across pieces, per row (``[c]``
arrays), so that no ``[c, V]`` array is ever built:

* a *softmax state* ``(max, sum_exp, *sums)``: the running maximum of ``x``, the sum of
  ``exp(x - max)`` and, for each tracked ``y``, the sum of ``exp(x - max) * y``, rescaled
  whenever the maximum grows. At the end ``logsumexp(x) = max + log(sum_exp)`` and the
  softmax-weighted mean of ``y`` is ``sum / sum_exp``;
* an *argmax state* ``(best, column)``: the best value so far and its first column (an
  earlier column wins a tie, as in ``jnp.argmax``).

Columns that do not count (past the vocabulary, or past a shared-vocabulary cut) carry
``x = -inf`` and ``y = 0``; the first piece must hold at least one counted column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_init(rows: int, sums: int = 0) -> tuple[Array, ...]:
  """The softmax state of ``rows`` rows before any column, tracking ``sums`` means."""
  zero = jnp.zeros((rows,), jnp.float32)
  return (jnp.full((rows,), -jnp.inf, jnp.float32), zero) + (zero,) * sums


def softmax_update(state: tuple[Array, ...], x: Array, *ys: Array) -> tuple[Array, ...]:
  """The softmax state after the columns ``x [c, tile]``, with ``ys`` (``[c, tile]``, finite)."""
  old, total, *sums = state
  new = jnp.maximum(old, jnp.max(x, axis=-1))
  scale = jnp.exp(old - new)
  weights = jnp.exp(x - new[:, None])
  total = total * scale + jnp.sum(weights, axis=-1)
  return (new, total) + tuple(s * scale + jnp.sum(weights * y, axis=-1) for s, y in zip(sums, ys))


def logsumexp(state: tuple[Array, ...]) -> Array:
  """``logsumexp(x)`` per row ``[c]`` of a softmax state."""
  return state[0] + jnp.log(state[1])


def means(state: tuple[Array, ...]) -> tuple[Array, ...]:
  """``sum_j softmax(x)_j y_j`` per row ``[c]``, one per tracked ``y``."""
  return tuple(s / state[1] for s in state[2:])


def argmax_init(rows: int) -> tuple[Array, Array]:
  """The argmax state of ``rows`` rows before any column."""
  return jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32)


def argmax_update(state: tuple[Array, Array], z: Array, columns: Array) -> tuple[Array, Array]:
  """The argmax state after the columns ``columns [tile]`` int32 holding ``z [c, tile]``.

  The piece's first maximal column is found as a float32 maximum over a select (exact:
  column numbers are below 2^24). XLA's CPU backend vectorises that; a variadic argmax
  reduction and an integer minimum it does not.
  """
  best, column = state
  tile_max = jnp.max(z, axis=-1)
  negated = jnp.where(z == tile_max[:, None], -columns.astype(jnp.float32)[None, :], -jnp.inf)
  first = (-jnp.max(negated, axis=-1)).astype(jnp.int32)
  return jnp.maximum(best, tile_max), jnp.where(tile_max > best, first, column)


def masked(z: Array, mask: Array | None, fill: float) -> Array:
  """``z`` with ``fill`` where ``mask`` (``[1, tile]`` bool, or None: all count) is False."""
  return z if mask is None else jnp.where(mask, z, fill)
