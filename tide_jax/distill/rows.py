"""Row-chunked evaluation of per-position vocabulary statistics.

With a 151,936-token vocabulary a float32 ``[positions, vocab]`` array is gigabytes, so
every quantity that needs a softmax over the vocabulary is computed here one block of
``chunk_size`` rows at a time (a ``fori_loop`` over position blocks). Differentiable
quantities go through :func:`rowwise`, a ``custom_vjp`` whose backward pass is also
chunked and uses closed-form gradients, so neither pass keeps more than one block of
float32 intermediates alive and the only full-size array of the backward pass is the
student's gradient itself (in the student's dtype).

A *row kernel* is a frozen dataclass with two methods over one block (float32 inputs):

* ``value(zs, zt, extra) -> [c]``: the per-row quantity;
* ``grad(zs, zt, extra) -> [c, V']``: its derivative with respect to ``zs`` (only the
  first ``V'`` columns; the rest of the gradient is zero).

``zt`` is None for single-model kernels. Teacher logits never receive a gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_CHUNK_SIZE = 128


def _block_size(num_rows: int, chunk_size: int) -> int:
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  return max(1, min(chunk_size, num_rows))


def _strided(x: Array, block: int) -> Array:
  """``[N, ...] -> [block, nb, ...]`` with row ``j * nb + k`` at ``[j, k]`` (zero-padded).

  Block k is column k: rows ``k, nb + k, 2 nb + k, ...``. When N is sharded over devices
  in contiguous pieces, that sharding lands on the first axis, so the loop over the
  second axis stays local to each device instead of gathering the whole array. When
  ``block`` divides N the reshape is free; otherwise the padding copies ``x``.
  """
  n = x.shape[0]
  nb = -(-n // block)
  if nb * block != n:
    x = jnp.pad(x, [(0, nb * block - n)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(block, nb, *x.shape[1:])


def map_blocks(fn, xs: Any, n: int, block: int) -> Any:
  """Applies ``fn`` (pytree of ``[block, ...]`` -> pytree of ``[block, ...]``) to every
  block of the ``[N, ...]`` leaves of ``xs``, one block at a time; returns ``[N, ...]``.

  The results are written into preallocated buffers in place (``fori_loop`` with
  dynamic updates), so no per-block intermediate outlives its iteration.
  """
  xs = jax.tree.map(lambda a: _strided(a, block), xs)
  nb = -(-n // block)
  take = lambda a, k: jax.lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda a: take(a, 0), xs))
  init = jax.tree.map(lambda s: jnp.zeros((block, nb) + s.shape[1:], s.dtype), shapes)

  def body(k, buffers):
    ys = fn(jax.tree.map(lambda a: take(a, k), xs))
    return jax.tree.map(
        lambda buf, y: jax.lax.dynamic_update_index_in_dim(buf, y, k, axis=1), buffers, ys
    )

  out = jax.lax.fori_loop(0, nb, body, init)
  return jax.tree.map(lambda o: o.reshape(block * nb, *o.shape[2:])[:n], out)


def _block_inputs(student, teacher, teacher_rows, extra):
  xs = {"zs": to_bits(student), "extra": extra}
  if teacher is not None:
    if teacher_rows is None:
      xs["zt"] = to_bits(teacher)
    else:
      xs["rows"] = teacher_rows.astype(jnp.int32)
  return xs


_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def carry_as_bits() -> bool:
  """Whether 16-bit float logits travel through the block loops as uint16 bit patterns.

  Only on XLA's CPU backend: it has no native bfloat16 dynamic-slice or
  dynamic-update-slice, rewrites the sliced operand to float32 and then hoists the
  conversion of the whole input out of the loop, one full float32 copy per model.
  Integer slices are left alone. The price there is that the bitcasts are compiled as
  copies (16-bit, half a float32 array each); accelerators slice bfloat16 natively.
  """
  return jax.default_backend() == "cpu"


def to_bits(x: Array) -> Array:
  """``x`` as uint16 bit patterns when :func:`carry_as_bits` and ``x`` is a 16-bit float."""
  if carry_as_bits() and x.dtype in _HALF_FLOATS:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_bits(x: Array, dtype) -> Array:
  """Inverse of :func:`to_bits` for an array that held ``dtype`` values."""
  if x.dtype == jnp.uint16 and jnp.dtype(dtype) in _HALF_FLOATS:
    return jax.lax.bitcast_convert_type(x, dtype)
  return x


def as_float32(block: Array, dtype) -> Array:
  """float32 values of one block that travelled as :func:`to_bits` of ``dtype``."""
  return from_bits(block, dtype).astype(jnp.float32)


def _block_teacher(teacher, xs):
  """The teacher logits of one block as float32, gathering rows when indexed."""
  if teacher is None:
    return None
  if "zt" in xs:
    return as_float32(xs["zt"], teacher.dtype)
  return as_float32(jnp.take(to_bits(teacher), xs["rows"], axis=0, mode="clip"), teacher.dtype)


def check_inputs(student: Array, teacher: Array | None, teacher_rows: Array | None) -> None:
  """Raises a clear error for mismatched shapes (static checks, at trace time)."""
  if student.ndim != 2:
    raise ValueError(
        f"student logits must be [positions, vocab], got shape {student.shape}; "
        "flatten the batch and sequence axes first."
    )
  if teacher is None:
    return
  if teacher.ndim != 2:
    raise ValueError(
        f"teacher logits must be [rows, vocab], got shape {teacher.shape}; "
        "flatten the batch and sequence axes first."
    )
  if teacher_rows is None and teacher.shape[0] != student.shape[0]:
    raise ValueError(
        f"teacher logits have {teacher.shape[0]} rows but the student has "
        f"{student.shape[0]} positions; pass teacher_rows to pair them."
    )
  if teacher_rows is not None and teacher_rows.shape != (student.shape[0],):
    raise ValueError(
        f"teacher_rows must have shape ({student.shape[0]},), got " f"{teacher_rows.shape}."
    )


def _map_value(kernel, chunk_size, student, teacher, teacher_rows, extra):
  n = student.shape[0]
  xs = _block_inputs(student, teacher, teacher_rows, extra)

  def one_block(b):
    zt = _block_teacher(teacher, b)
    return kernel.value(as_float32(b["zs"], student.dtype), zt, b["extra"])

  return map_blocks(one_block, xs, n, _block_size(n, chunk_size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rowwise(kernel, chunk_size, student, teacher, teacher_rows, extra):
  return _map_value(kernel, chunk_size, student, teacher, teacher_rows, extra)


def _rowwise_fwd(kernel, chunk_size, student, teacher, teacher_rows, extra):
  out = _map_value(kernel, chunk_size, student, teacher, teacher_rows, extra)
  # Residuals are the inputs themselves (no copies, no float32 intermediates).
  return out, (student, teacher, teacher_rows, extra)


def _rowwise_bwd(kernel, chunk_size, res, cotangent):
  student, teacher, teacher_rows, extra = res
  n, vocab = student.shape
  xs = _block_inputs(student, teacher, teacher_rows, extra)
  xs["g"] = cotangent.astype(jnp.float32)

  def one_block(b):
    zt = _block_teacher(teacher, b)
    grad = kernel.grad(as_float32(b["zs"], student.dtype), zt, b["extra"]) * b["g"][:, None]
    if grad.shape[1] < vocab:  # columns beyond the shared vocabulary get no gradient
      grad = jnp.pad(grad, [(0, 0), (0, vocab - grad.shape[1])])
    return to_bits(grad.astype(student.dtype))

  grad = from_bits(map_blocks(one_block, xs, n, _block_size(n, chunk_size)), student.dtype)
  return grad, None, None, jax.tree.map(lambda _: None, extra)


_rowwise.defvjp(_rowwise_fwd, _rowwise_bwd)


def rowwise(
    kernel: Any,
    student: Array,
    teacher: Array | None = None,
    teacher_rows: Array | None = None,
    extra: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Array:
  """Per-row values ``[N]`` of ``kernel``, differentiable in ``student`` only.

  Args:
    kernel: a hashable row kernel (see the module docstring).
    student: ``[N, Vs]`` logits (any float dtype).
    teacher: ``[N, Vt]`` logits, or ``[R, Vt]`` with ``teacher_rows``; never differentiated.
    teacher_rows: ``[N]`` int32, the teacher row paired with each student row.
    extra: pytree of ``[N, ...]`` per-row arrays passed to the kernel (no gradient).
    chunk_size: rows per block.
  """
  check_inputs(student, teacher, teacher_rows)
  if student.shape[0] == 0:
    return jnp.zeros((0,), jnp.float32)
  if teacher is not None:
    teacher = jax.lax.stop_gradient(teacher)
  extra = jax.tree.map(jax.lax.stop_gradient, extra)
  return _rowwise(kernel, chunk_size, student, teacher, teacher_rows, extra)


def map_rows(
    fn,
    logits: Array,
    rows: Array | None = None,
    extra: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Any:
  """Non-differentiable per-row statistics ``fn(block [c, V] raw dtype, extra) -> [c, ...]``.

  ``rows`` (``[N]`` int32) gathers the rows to visit from ``logits [R, V]``; without it
  the N rows of ``logits`` are visited in order. The result is under ``stop_gradient``.
  """
  logits = jax.lax.stop_gradient(logits)
  n = logits.shape[0] if rows is None else rows.shape[0]
  if n == 0:
    return fn(logits[:0], jax.tree.map(lambda a: a[:0], extra))
  xs = {"extra": extra}
  bits = to_bits(logits)
  if rows is None:
    xs["z"] = bits
  else:
    xs["rows"] = rows.astype(jnp.int32)

  def one_block(b):
    z = b["z"] if rows is None else jnp.take(bits, b["rows"], axis=0, mode="clip")
    return fn(from_bits(z, logits.dtype), b["extra"])

  return map_blocks(one_block, xs, n, _block_size(n, chunk_size))
