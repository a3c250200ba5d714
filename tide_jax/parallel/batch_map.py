"""Run a loss or statistic per device over its own rows of the batch.

The objectives' row loops (``tide_jax.distill.fused``) must see only the rows a device
owns: a loop over blocks of a globally sharded array makes XLA gather the whole batch on
every device. :func:`batch_sums` and :func:`batch_outputs` wrap a function in
``jax.shard_map`` over the mesh set with ``jax.set_mesh``: batch-major inputs arrive as
each device's rows, shared inputs (output kernels, scalars) whole, so a kernel sharded
over ``fsdp``/``tensor`` is gathered once per call, not once per block.

Devices along mesh axes that do not split the batch (``tensor``, or a batch axis that
does not divide it) hold the same rows; :class:`RowSplit` gives each of them a share of
the rows for the expensive per-row work and recombines the results, so no device
repeats another's work. Without a mesh in context (one device, tests, notebooks) the
function runs as is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tide_jax.parallel import sharding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RowSplit:
  """How the devices holding the same rows share per-row work.

  Attributes:
    axes: mesh axes (size > 1) along which devices hold the same batch rows.
    all_axes: every mesh axis of size > 1 (differentiated shared inputs become
      device-varying over them, so their gradient is summed over every device's rows).
  """

  axes: tuple[str, ...] = ()
  all_axes: tuple[str, ...] = ()

  def _count_and_index(self) -> tuple[int, Array | int]:
    if not self.axes:
      return 1, 0
    index, count = 0, 1
    for axis in self.axes:
      size = jax.lax.axis_size(axis)
      index = index * size + jax.lax.axis_index(axis)
      count *= size
    return count, index

  def varying(self, tree: Any) -> Any:
    """Marks shared inputs as device-varying (inside ``shard_map`` only)."""
    if not self.all_axes:
      return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, self.all_axes, to="varying"), tree)

  def rowwise(self, fn: Callable[[Any, Any], Any], rows: Any, whole: Any = None) -> Any:
    """``fn(rows, whole)`` (per-row outputs ``[N, ...]``) with the rows shared over ``axes``.

    Each device of a replica group evaluates a contiguous share of the ``[N, ...]`` leaves
    of ``rows`` (``whole`` is passed as is); the shares' per-row outputs are put back
    together with a ``psum`` over ``axes``. Without replica axes this is ``fn(rows, whole)``.
    """
    n = _leading_rows(rows)
    count, index = self._count_and_index()
    if count == 1:
      return fn(rows, whole)
    if n % count:
      # Rows that do not split evenly: every replica computes them all; the mean makes
      # the (equal) results replicated again and shares the gradient among replicas.
      return jax.tree.map(lambda x: jax.lax.pmean(x, self.axes), fn(rows, whole))
    share = n // count
    start = index * share
    outs = fn(jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, share), rows), whole)

    def assemble(part):
      full = jnp.zeros((n,) + part.shape[1:], part.dtype)
      return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(full, part, start, 0), self.axes)

    return jax.tree.map(assemble, outs)


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or tuple(mesh.axis_names) != sharding.MESH_AXES:
    return None
  return mesh


def batch_axes(mesh, rows: int, rules: Mapping[str, Any] = sharding.STUDENT_RULES) -> tuple:
  """The mesh axes that split a batch of ``rows`` rows (those that divide it)."""
  entry = sharding.logical_to_spec(("batch",), rules, mesh, (rows,))[0]
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _leading_rows(tree: Any) -> int:
  """The smallest leading dimension of the leaves (batch-major pytrees may hold ``[2b, ...]``
  teacher rows next to ``[b, ...]`` student rows)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("Expected at least one batch-major array.")
  return min(leaf.shape[0] for leaf in leaves)


def _run(fn, per_example, shared, rules, out_spec_fn):
  mesh = _context_mesh()
  if mesh is None:
    return fn(per_example, shared, RowSplit())
  axes = batch_axes(mesh, _leading_rows(per_example), rules)
  replica = tuple(a for a in mesh.axis_names if a not in axes and mesh.shape[a] > 1)
  split = RowSplit(replica, axes + replica)
  spec = P(axes if axes else None)

  def body(local, shared_local):
    return out_spec_fn.reduce(fn(local, shared_local, split), axes)

  return jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(jax.tree.map(lambda _: spec, per_example), jax.tree.map(lambda _: P(), shared)),
      out_specs=out_spec_fn.spec(spec),
  )(per_example, shared)


class _Sums:

  @staticmethod
  def reduce(out, axes):
    return jax.tree.map(lambda x: jax.lax.psum(x, axes), out) if axes else out

  @staticmethod
  def spec(_):
    return P()


class _PerExample:

  @staticmethod
  def reduce(out, axes):
    return out

  @staticmethod
  def spec(spec):
    return spec


def batch_sums(
    fn: Callable[[Any, Any, RowSplit], Any],
    per_example: Any,
    shared: Any,
    *,
    rules: Mapping[str, Any] = sharding.STUDENT_RULES,
) -> Any:
  """``fn(local rows, shared, split)`` summed over all devices' rows.

  Args:
    fn: returns a pytree of scalars that add up over disjoint rows (partial sums); it
      should compute its per-row vocabulary statistics through ``split.rowwise`` and
      mark differentiated shared inputs with ``split.varying``.
    per_example: pytree of batch-major arrays ``[b, ...]`` (each device gets its rows).
    shared: pytree of arrays every device needs whole (output kernels, scalars).
    rules: logical-axis rules naming the batch axes.

  Returns:
    The pytree of ``fn``'s outputs summed over the batch (replicated).
  """
  return _run(fn, per_example, shared, rules, _Sums)


def batch_outputs(
    fn: Callable[[Any, Any, RowSplit], Any],
    per_example: Any,
    shared: Any,
    *,
    rules: Mapping[str, Any] = sharding.STUDENT_RULES,
) -> Any:
  """Like :func:`batch_sums` for per-example outputs ``[b_local, ...] -> [b, ...]``."""
  return _run(fn, per_example, shared, rules, _PerExample)


def shard_count(rows: int, rules: Mapping[str, Any] = sharding.STUDENT_RULES) -> int:
  """How many ways a batch of ``rows`` rows is split on the mesh in context (1 without)."""
  mesh = _context_mesh()
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rows, rules))
