"""Hidden states x output kernel -> per-row statistics, one block of rows at a time.

Every objective of the project that needs a softmax over the vocabulary (the student's
cross-entropy, every distillation term, bits per byte, evaluation) goes through
:func:`row_statistics`. It never holds the ``[rows, vocab]`` logits of either model: a
``fori_loop`` projects ``block_rows`` rows of hidden states onto the output kernel, hands
the float32 block of logits to a *row kernel*, keeps only the kernel's per-row outputs
and moves on. The backward pass is written by hand (a ``custom_vjp``): it recomputes each
block's logits, asks the row kernel for the vector-Jacobian product with respect to them,
and turns that into the gradients of the hidden states (one ``[block, E]`` slice per
block) and of the kernel (one float32 ``[E, V]`` accumulator, the gradient itself). So
neither pass keeps more than one block of float32 logits alive, whatever the vocabulary.

A row kernel is a frozen, hashable dataclass with two methods over one block
(``zs [c, Vs]`` float32 student logits, ``zt [c, Vt]`` float32 teacher logits or None,
``extra`` a pytree of per-row arrays ``[c, ...]``):

* ``forward(zs, zt, extra) -> (values [c, K], stats [c, S])``: ``values`` are
  differentiable in ``zs``; ``stats`` (argmax agreement, correctness) are not;
* ``vjp(zs, zt, extra, g [c, K]) -> [c, Vs]``: ``sum_k g[:, k] d values[:, k] / d zs``.

Rows are visited in contiguous blocks of the arrays this function receives; on a mesh the
caller runs it per device (``tide_jax.parallel.batch_map``), so blocks never span devices
and the loop is local. Teacher rows are read through ``teacher_rows`` (a local gather of
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


def _pad_rows(x: Array, total: int) -> Array:
  if x.shape[0] == total:
    return x
  return jnp.pad(x, [(0, total - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _project(hidden: Array, kernel: Array) -> Array:
  """float32 logits ``[c, V]`` of a block of hidden states (the kernel in their dtype)."""
  return jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _slice(x: Array, k: Array, block: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, k * block, block)


def _blocks(student, teacher, rows, extra, block_rows):
  """Padded inputs and the per-block reader shared by the forward and backward loops."""
  n = student.hidden.shape[0]
  block, num_blocks = block_count(n, block_rows)
  total = block * num_blocks
  hidden = _pad_rows(student.hidden, total)
  rows = None if rows is None else _pad_rows(rows.astype(jnp.int32), total)
  teacher_hidden = None
  if teacher is not None:
    teacher_hidden = teacher.hidden if rows is not None else _pad_rows(teacher.hidden, total)
  extra = jax.tree.map(lambda a: _pad_rows(a, total), extra)

  def read(k):
    h = _slice(hidden, k, block)
    zs = _project(h, student.kernel)
    zt = None
    if teacher is not None:
      if rows is None:
        ht = _slice(teacher_hidden, k, block)
      else:
        ht = jnp.take(teacher_hidden, _slice(rows, k, block), axis=0, mode="clip")
      zt = _project(ht, teacher.kernel)
    return h, zs, zt, jax.tree.map(lambda a: _slice(a, k, block), extra)

  return n, block, num_blocks, read


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


def _forward(row_kernel, block_rows, student, teacher, rows, extra):
  n, block, num_blocks, read = _blocks(student, teacher, rows, extra, block_rows)
  if num_blocks == 1:
    return row_kernel.forward(*read(0)[1:])
  shapes = jax.eval_shape(lambda k: row_kernel.forward(*read(k)[1:]), 0)
  anchor = _anchor(student, teacher, rows, extra)
  init = jax.tree.map(
      lambda s: jnp.zeros((num_blocks,) + s.shape, s.dtype) + anchor.astype(s.dtype), shapes
  )

  def body(k, buffers):
    _, zs, zt, ex = read(k)
    outs = row_kernel.forward(zs, zt, ex)
    return jax.tree.map(lambda buf, y: buf.at[k].set(y), buffers, outs)

  outs = jax.lax.fori_loop(0, num_blocks, body, init)
  return jax.tree.map(lambda o: o.reshape((num_blocks * block,) + o.shape[2:])[:n], outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(row_kernel, block_rows, student, teacher, rows, extra):
  return _forward(row_kernel, block_rows, student, teacher, rows, extra)


def _fused_fwd(row_kernel, block_rows, student, teacher, rows, extra):
  _, _, num_blocks, read = _blocks(student, teacher, rows, extra, block_rows)
  if num_blocks == 1:
    # Every row fits in one block: the block's logits (the memory row_block allows) are
    # kept for the backward pass instead of being projected again.
    _, zs, zt, ex = read(0)
    return row_kernel.forward(zs, zt, ex), (student, teacher, rows, extra, (zs, zt))
  outs = _forward(row_kernel, block_rows, student, teacher, rows, extra)
  # Otherwise the residuals are the inputs themselves: no logits, no float32 copies.
  return outs, (student, teacher, rows, extra, None)


def _grads_of_block(row_kernel, student, h, zs, zt, ex, g):
  """``(d hidden [c, E] float32, d kernel [E, V] float32)`` of one block."""
  hidden_dtype = student.hidden.dtype
  g_compute = row_kernel.vjp(zs, zt, ex, g).astype(hidden_dtype)  # [c, V]
  dh = jnp.dot(g_compute, student.kernel.astype(hidden_dtype).T, preferred_element_type=jnp.float32)
  dk = jnp.dot(h.T, g_compute, preferred_element_type=jnp.float32)
  return dh, dk


def _fused_bwd(row_kernel, block_rows, residuals, cotangents):
  student, teacher, rows, extra, logits = residuals
  g_values = cotangents[0].astype(jnp.float32)  # stats carry no gradient
  n, block, num_blocks, read = _blocks(student, teacher, rows, extra, block_rows)
  zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
  if logits is not None:
    h, _, _, ex = read(0)
    dh, dk = _grads_of_block(row_kernel, student, h, *logits, ex, g_values)
    d_student = Projection(dh.astype(h.dtype), dk.astype(student.kernel.dtype))
    return d_student, zeros(teacher), zeros(rows), zeros(extra)
  g_values = _pad_rows(g_values, block * num_blocks)
  hidden_dtype = student.hidden.dtype

  def body(k, carry):
    d_hidden, d_kernel = carry
    h, zs, zt, ex = read(k)
    dh, dk = _grads_of_block(row_kernel, student, h, zs, zt, ex, _slice(g_values, k, block))
    d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, dh.astype(hidden_dtype), k * block, 0)
    return d_hidden, d_kernel + dk

  anchor = _anchor(student, teacher, rows, extra, g_values)
  init = (
      jnp.zeros((block * num_blocks, student.hidden.shape[1]), hidden_dtype)
      + anchor.astype(hidden_dtype),
      jnp.zeros(student.kernel.shape, jnp.float32) + anchor,
  )
  d_hidden, d_kernel = jax.lax.fori_loop(0, num_blocks, body, init)
  d_student = Projection(d_hidden[:n], d_kernel.astype(student.kernel.dtype))
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
        )
    )
    return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape[1:], s.dtype), shapes)
  return _fused(
      row_kernel, int(block_rows), Projection(hidden, kernel), teacher, teacher_rows, extra
  )
