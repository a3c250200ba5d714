"""Hidden states x output kernel -> per-row statistics, blocks of rows by tiles of vocabulary.

Every objective of the project that needs a softmax over the vocabulary (the student's
cross-entropy, every distillation term, bits per byte, evaluation) goes through
:func:`row_statistics`. Neither pass holds more than one block of logits:

* forward: a ``fori_loop`` over blocks of ``block_rows`` rows projects each block onto
  the kernel (tile by tile of ``vocab_tile`` columns, into one float32 ``[block, V]``
  buffer), hands the block's logits to a *row kernel* and keeps only its per-row outputs,
  plus a few per-row statistics its gradient needs (log-sum-exps, a divergence). A row
  kernel that also has a tile-by-tile form (the project's two both do: the
  cross-entropy's and the distillation terms') consumes each ``[block, tile]`` piece of
  logits as it is made instead: no ``[block, V]`` buffer, and
  on a CPU the piece is still in cache when it is read (twice as fast at 151,936 columns;
  docs/BENCHMARKS.md, "Where the CPU step's time goes");
* backward (a hand-written ``custom_vjp``): an outer loop over vocabulary tiles and an
  inner loop over row blocks recompute each ``[block, tile]`` piece of logits, ask the
  row kernel for the gradient with respect to it (closed forms, from the saved per-row
  statistics), and accumulate the gradient of the hidden states (float32 ``[N, E]``) and
  of one ``[E, tile]`` column slice of the kernel, written to the kernel's gradient
  before the next tile. No ``[E, V]`` float32 array and no ``[rows, V]`` array exist.

When all the rows fit in one block, the block's float32 logits are kept for the backward
pass instead of being projected again (the memory ``block_rows`` allows), unless the
kernel has a tile-by-tile form and the vocabulary spans several tiles.

A row kernel is a frozen, hashable dataclass with two methods (``zs [c, Vs]`` float32
student logits, ``zt`` the teacher's or None, ``extra`` a pytree of per-row arrays):

* ``forward(zs, zt, extra) -> (values [c, K], stats [c, S], grad_stats [c, G])``:
  ``values`` are differentiable in ``zs``; ``stats`` (argmax agreement, correctness) are
  not; ``grad_stats`` is what ``tile_vjp`` needs about the whole row;
* ``tile_vjp(zs, zt, extra, grad_stats, g [c, K], start) -> [c, tile]``: the columns
  ``start .. start + tile`` of ``sum_k g[:, k] d values[:, k] / d zs``, from those columns'
  logits (``zs``, ``zt`` hold only them here; columns past the vocabulary are zeros).

and optionally the forward's tile-by-tile form: ``tile_init(c) -> carry`` (a pytree of
per-row arrays), ``tile_update(carry, zs, zt, extra, start, vocab, sweep) -> carry`` for
the ``[c, tile]`` logits of columns ``start ..`` (those at ``vocab`` or beyond are padding;
``vocab`` is None when the tiles cover the vocabulary exactly; ``sweep`` counts the passes
over the vocabulary, ``tile_sweeps`` of them, 1 if the kernel does not say), and
``tile_finish(carry, extra)``, which returns what ``forward`` would. A kernel whose tile
form depends on its parts says whether it has one in ``tile_form``.

Rows are visited in contiguous blocks of the arrays this function receives; on a mesh the
caller runs it per device (``tide_jax.parallel.batch_map``), so blocks never span devices
and the loops are local. Teacher rows are read through ``teacher_rows`` (a local gather of
``[c, Et]`` hidden states, never of logits).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_BLOCK_ROWS = 256
VOCAB_TILE = 4096  # columns per tile of the vocabulary (at most); docs/BENCHMARKS.md


class Projection(NamedTuple):
  """Hidden states and the output kernel that turns them into logits.

  Attributes:
    hidden: ``[N, E]`` (or ``[R, E]`` for a teacher read through row indices).
    kernel: ``[E, V]``.
  """

  hidden: Array
  kernel: Array


def block_count(num_rows: int, block_rows: int) -> tuple[int, int]:
  """``(rows per block, number of blocks)`` for ``num_rows`` rows."""
  if block_rows <= 0:
    raise ValueError(f"The row block size must be positive, got {block_rows}.")
  block = max(1, min(block_rows, num_rows))
  return block, -(-num_rows // block)


def tile_count(vocab: int, most: int = VOCAB_TILE) -> tuple[int, int]:
  """``(columns per tile, number of tiles)``: equal tiles of at most ``most`` columns.

  A tile count that divides the vocabulary exactly is preferred (up to twice the fewest
  tiles), so that tiles are plain slices; at the default 151,936 = 64 x 2,374 and
  128,256 = 32 x 4,008.
  """
  fewest = -(-vocab // most)
  for tiles in range(fewest, 2 * fewest + 1):
    if vocab % tiles == 0:
      return vocab // tiles, tiles
  return -(-vocab // fewest), fewest


_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _sliceable(kernel: Array) -> Array:
  """The kernel in a form whose column slices stay local to a loop iteration.

  XLA's CPU backend has no native 16-bit float dynamic-slice: it converts the whole
  operand to float32 and hoists that copy out of the loop. Their uint16 bit patterns slice
  natively (the bitcast costs one 16-bit copy on that backend, half the float32 one);
  accelerators slice 16-bit floats natively and get the kernel unchanged.
  """
  if jax.default_backend() == "cpu" and kernel.dtype in _HALF_FLOATS:
    return jax.lax.bitcast_convert_type(kernel, jnp.uint16)
  return kernel


def _pad_rows(x: Array, total: int) -> Array:
  if x.shape[0] == total:
    return x
  return jnp.pad(x, [(0, total - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _slice(x: Array, k: Array, block: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, k * block, block)


def _columns(kernel: Array, start: Array, tile: int, dtype) -> Array:
  """Columns ``start .. start + tile`` of a :func:`_sliceable` kernel ``[E, V]`` holding
  ``dtype`` values (zeros past V): ``[E, tile]`` in ``dtype``."""
  if kernel.shape[1] % tile == 0:
    out = jax.lax.dynamic_slice_in_dim(kernel, start, tile, axis=1)
  else:
    index = start + jnp.arange(tile, dtype=jnp.int32)
    out = jnp.take(kernel, index, axis=1, mode="fill", fill_value=0)
  if out.dtype == jnp.uint16 and jnp.dtype(dtype) != jnp.uint16:
    return jax.lax.bitcast_convert_type(out, dtype)
  return out


def _dot(hidden: Array, kernel: Array) -> Array:
  """float32 ``hidden @ kernel`` with the kernel in the hidden states' dtype."""
  return jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _project(hidden: Array, kernel: Array, vocab_tile: int) -> Array:
  """float32 logits ``[c, V]`` of a block, computed tile by tile of the kernel's columns.

  Converting a whole kernel to the compute dtype (or, on XLA's CPU backend, a 16-bit one
  to float32) outside the loops would be a kernel-sized copy; a tile at a time it is not.
  """
  vocab = kernel.shape[1]
  tile, tiles = tile_count(vocab, vocab_tile)
  if tiles == 1:
    return _dot(hidden, kernel)
  dtype, sliceable = kernel.dtype, _sliceable(kernel)

  def body(j, out):
    start = j * tile
    z = _dot(hidden, _columns(sliceable, start, tile, dtype))
    return jax.lax.dynamic_update_slice_in_dim(out, z, start, 1)

  out = jnp.zeros((hidden.shape[0], tile * tiles), jnp.float32) + _anchor(hidden, kernel)
  out = jax.lax.fori_loop(0, tiles, body, out)
  return out if tile * tiles == vocab else out[:, :vocab]


def _anchor(*trees: Any) -> Array:
  """A float32 zero that depends on every array of ``trees`` (through empty slices).

  Added to a loop's initial buffers, it gives them the device-variance of the values the
  loop writes into them: inside ``shard_map`` a carry must keep its type, and those
  values vary over the mesh axes their inputs vary over.
  """
  zero = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(trees):
    zero = zero + jnp.sum(leaf.reshape(-1)[:0]).astype(jnp.float32)
  return zero


def _zero_cotangent(x: Array) -> Array:
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


class _Blocks(NamedTuple):
  """Row-padded inputs and the readers of one row block."""

  n: int
  block: int
  count: int
  hidden: Array
  teacher_hidden: Array | None
  rows: Array | None
  extra: Any

  def student(self, k):
    return _slice(self.hidden, k, self.block)

  def teacher(self, k):
    if self.teacher_hidden is None:
      return None
    if self.rows is None:
      return _slice(self.teacher_hidden, k, self.block)
    return jnp.take(self.teacher_hidden, _slice(self.rows, k, self.block), axis=0, mode="clip")

  def extra_of(self, k):
    return jax.tree.map(lambda a: _slice(a, k, self.block), self.extra)


def _blocks(student, teacher, rows, extra, block_rows) -> _Blocks:
  n = student.hidden.shape[0]
  block, count = block_count(n, block_rows)
  total = block * count
  rows = None if rows is None else _pad_rows(rows.astype(jnp.int32), total)
  teacher_hidden = None
  if teacher is not None:
    teacher_hidden = teacher.hidden if rows is not None else _pad_rows(teacher.hidden, total)
  return _Blocks(
      n,
      block,
      count,
      _pad_rows(student.hidden, total),
      teacher_hidden,
      rows,
      jax.tree.map(lambda a: _pad_rows(a, total), extra),
  )


def _block_logits(blocks: _Blocks, student, teacher, k, vocab_tile):
  zs = _project(blocks.student(k), student.kernel, vocab_tile)
  zt = None if teacher is None else _project(blocks.teacher(k), teacher.kernel, vocab_tile)
  return zs, zt


def _online(row_kernel, blocks: _Blocks, student, teacher, k, vocab_tile):
  """A row kernel's outputs for block ``k``, one ``[block, tile]`` piece of logits at a time.

  For kernels with ``tile_init``/``tile_update``/``tile_finish`` (see the module
  docstring): the piece is consumed while it is small (in cache on a CPU) instead of
  being written into a ``[block, V]`` buffer and read back by every row reduction.
  """
  vocab = student.kernel.shape[1]
  tile, tiles = tile_count(vocab, vocab_tile)
  past = None if tile * tiles == vocab else vocab  # where padding columns begin, if any
  h, ht, extra = blocks.student(k), blocks.teacher(k), blocks.extra_of(k)
  student_cols = _sliceable(student.kernel)
  teacher_cols = None if teacher is None else _sliceable(teacher.kernel)

  def body(j, carry, sweep):
    start = j * tile
    zs = _dot(h, _columns(student_cols, start, tile, student.kernel.dtype))
    zt = None
    if teacher is not None:
      zt = _dot(ht, _columns(teacher_cols, start, tile, teacher.kernel.dtype))
    return row_kernel.tile_update(carry, zs, zt, extra, start, past, sweep)

  anchor = _anchor(h, ht, student.kernel, extra)
  carry = jax.tree.map(lambda a: a + anchor.astype(a.dtype), row_kernel.tile_init(h.shape[0]))
  for sweep in range(getattr(row_kernel, "tile_sweeps", 1)):
    carry = jax.lax.fori_loop(0, tiles, functools.partial(body, sweep=sweep), carry)
  return row_kernel.tile_finish(carry, extra)


def _forward(row_kernel, sizes, student, teacher, rows, extra):
  """``(values, stats, grad_stats)`` of every row, and the block's logits when they are kept.

  One block's logits are kept for the backward pass (instead of being projected again)
  when they are all the rows, and either one tile wide or from a kernel without a
  tile-by-tile forward; otherwise kernels that have one walk the vocabulary a tile at a
  time (:func:`_online`), the others a block at a time.
  """
  block_rows, vocab_tile = sizes
  blocks = _blocks(student, teacher, rows, extra, block_rows)
  online = getattr(row_kernel, "tile_form", hasattr(row_kernel, "tile_update"))
  one_tile = tile_count(student.kernel.shape[1], vocab_tile)[1] == 1
  if blocks.count == 1 and (one_tile or not online):
    zs, zt = _block_logits(blocks, student, teacher, 0, vocab_tile)
    return row_kernel.forward(zs, zt, blocks.extra_of(0)), (zs, zt)
  if online:
    outputs = lambda k: _online(row_kernel, blocks, student, teacher, k, vocab_tile)
  else:
    outputs = lambda k: row_kernel.forward(
        *_block_logits(blocks, student, teacher, k, vocab_tile), blocks.extra_of(k)
    )
  if blocks.count == 1:
    return outputs(0), None
  shapes = jax.eval_shape(outputs, 0)
  anchor = _anchor(student, teacher, rows, extra)
  init = jax.tree.map(
      lambda s: jnp.zeros((blocks.count,) + s.shape, s.dtype) + anchor.astype(s.dtype), shapes
  )

  def body(k, buffers):
    outs = outputs(k)
    return jax.tree.map(lambda buf, y: buf.at[k].set(y), buffers, outs)

  outs = jax.lax.fori_loop(0, blocks.count, body, init)
  n, total = blocks.n, blocks.block * blocks.count
  return jax.tree.map(lambda o: o.reshape((total,) + o.shape[2:])[:n], outs), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(row_kernel, sizes, student, teacher, rows, extra):
  values, stats, _ = _forward(row_kernel, sizes, student, teacher, rows, extra)[0]
  return values, stats


def _fused_fwd(row_kernel, sizes, student, teacher, rows, extra):
  (values, stats, grad_stats), logits = _forward(row_kernel, sizes, student, teacher, rows, extra)
  # Residuals: the inputs, the per-row gradient statistics and, for a single block, its
  # logits. Never logits of more than one block.
  return (values, stats), (student, teacher, rows, extra, grad_stats, logits)


def _fused_bwd(row_kernel, sizes, residuals, cotangents):
  block_rows, vocab_tile = sizes
  student, teacher, rows, extra, grad_stats, logits = residuals
  g_values = cotangents[0].astype(jnp.float32)  # stats carry no gradient
  zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
  hidden_dtype = student.hidden.dtype
  if logits is not None:
    blocks = _blocks(student, teacher, rows, extra, block_rows)
    h = blocks.student(0)
    g = row_kernel.tile_vjp(*logits, blocks.extra_of(0), grad_stats, g_values, 0)
    g = g.astype(hidden_dtype)
    dh = jnp.dot(g, student.kernel.astype(hidden_dtype).T, preferred_element_type=jnp.float32)
    dk = jnp.dot(h.T, g, preferred_element_type=jnp.float32)
    d_student = Projection(dh.astype(hidden_dtype), dk.astype(student.kernel.dtype))
    return d_student, zeros(teacher), zeros(rows), zeros(extra)
  blocks = _blocks(student, teacher, rows, extra, block_rows)
  total = blocks.block * blocks.count
  g_values = _pad_rows(g_values, total)
  grad_stats = _pad_rows(grad_stats, total)
  vocab = student.kernel.shape[1]
  tile, tiles = tile_count(vocab, vocab_tile)
  anchor = _anchor(student, teacher, rows, extra, g_values)
  student_cols = _sliceable(student.kernel)
  teacher_cols = None if teacher is None else _sliceable(teacher.kernel)

  def one_tile(j, carry):
    d_hidden, d_kernel = carry
    start = j * tile
    ws = _columns(student_cols, start, tile, student.kernel.dtype)
    wt = None if teacher is None else _columns(teacher_cols, start, tile, teacher.kernel.dtype)

    def one_block(k, inner):
      d_hidden, d_tile = inner
      h = blocks.student(k)
      zs = _dot(h, ws)
      zt = None if teacher is None else _dot(blocks.teacher(k), wt)
      g = row_kernel.tile_vjp(
          zs,
          zt,
          blocks.extra_of(k),
          _slice(grad_stats, k, blocks.block),
          _slice(g_values, k, blocks.block),
          start,
      ).astype(hidden_dtype)
      dh = jnp.dot(g, ws.astype(hidden_dtype).T, preferred_element_type=jnp.float32)
      rows_k = jax.lax.dynamic_slice_in_dim(d_hidden, k * blocks.block, blocks.block)
      d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, rows_k + dh, k * blocks.block, 0)
      return d_hidden, d_tile + jnp.dot(h.T, g, preferred_element_type=jnp.float32)

    d_tile = jnp.zeros((student.kernel.shape[0], tile), jnp.float32) + anchor
    d_hidden, d_tile = jax.lax.fori_loop(0, blocks.count, one_block, (d_hidden, d_tile))
    d_tile = d_tile.astype(student.kernel.dtype)
    if d_kernel.dtype == jnp.uint16:  # written as bit patterns: see _sliceable
      d_tile = jax.lax.bitcast_convert_type(d_tile, jnp.uint16)
    if tile * tiles == vocab:
      d_kernel = jax.lax.dynamic_update_slice_in_dim(d_kernel, d_tile, start, 1)
    else:
      columns = start + jnp.arange(tile, dtype=jnp.int32)
      d_kernel = d_kernel.at[:, columns].set(d_tile, mode="drop")
    return d_hidden, d_kernel

  kernel_zeros = jnp.zeros(student.kernel.shape, student.kernel.dtype)
  init = (
      jnp.zeros((total, student.hidden.shape[1]), jnp.float32) + anchor,
      _sliceable(kernel_zeros + anchor.astype(kernel_zeros.dtype)),
  )
  d_hidden, d_kernel = jax.lax.fori_loop(0, tiles, one_tile, init)
  if d_kernel.dtype == jnp.uint16:
    d_kernel = jax.lax.bitcast_convert_type(d_kernel, student.kernel.dtype)
  d_student = Projection(d_hidden[: blocks.n].astype(hidden_dtype), d_kernel)
  return d_student, zeros(teacher), zeros(rows), zeros(extra)


_fused.defvjp(_fused_fwd, _fused_bwd)


def row_statistics(
    row_kernel: Any,
    student: Projection,
    teacher: Projection | None = None,
    teacher_rows: Array | None = None,
    extra: Any = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    vocab_tile: int = VOCAB_TILE,
) -> tuple[Array, Array]:
  """Per-row outputs of ``row_kernel`` over ``student.hidden @ student.kernel``.

  Args:
    row_kernel: a hashable row kernel (see the module docstring).
    student: ``[N, E]`` hidden states and ``[E, Vs]`` kernel; differentiated.
    teacher: ``[N, Et]`` (or ``[R, Et]`` with ``teacher_rows``) hidden states and
      ``[Et, Vt]`` kernel, or None; never differentiated.
    teacher_rows: ``[N]`` int32, the teacher row paired with each student row.
    extra: pytree of ``[N, ...]`` per-row arrays for the kernel (no gradient).
    block_rows: rows per block.
    vocab_tile: at most this many vocabulary columns per tile.

  Returns:
    ``(values [N, K] float32, stats [N, S])``; only ``values`` carry a gradient, to
    ``student.hidden`` and ``student.kernel``.
  """
  hidden, kernel = student
  if hidden.ndim != 2 or kernel.ndim != 2 or hidden.shape[1] != kernel.shape[0]:
    raise ValueError(
        f"student hidden states {hidden.shape} and kernel {kernel.shape} must be [N, E] and "
        "[E, V]; flatten the batch and sequence axes first."
    )
  if teacher is not None:
    teacher = Projection(*(jax.lax.stop_gradient(x) for x in teacher))
    if teacher_rows is None and teacher.hidden.shape[0] != hidden.shape[0]:
      raise ValueError(
          f"The teacher has {teacher.hidden.shape[0]} rows but the student {hidden.shape[0]}; "
          "pass teacher_rows to pair them."
      )
  if teacher_rows is not None and teacher_rows.shape != (hidden.shape[0],):
    raise ValueError(
        f"teacher_rows must have shape ({hidden.shape[0]},), got {teacher_rows.shape}."
    )
  extra = jax.tree.map(jax.lax.stop_gradient, extra)
  if hidden.shape[0] == 0:
    shapes = jax.eval_shape(
        lambda: row_kernel.forward(
            jnp.zeros((1, kernel.shape[1])),
            None if teacher is None else jnp.zeros((1, teacher.kernel.shape[1])),
            jax.tree.map(lambda a: jnp.zeros((1,) + a.shape[1:], a.dtype), extra),
        )[:2]
    )
    return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape[1:], s.dtype), shapes)
  if vocab_tile <= 0:
    raise ValueError(f"The vocabulary tile must be positive, got {vocab_tile}.")
  sizes = (int(block_rows), int(vocab_tile))
  return _fused(row_kernel, sizes, Projection(hidden, kernel), teacher, teacher_rows, extra)
