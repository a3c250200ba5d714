"""Device mesh from configuration and logical-axis sharding rules.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``expert`` ...);
one rules table per role maps each name to zero or more mesh axes. The student is trained,
so its parameters and optimizer state spread over ``fsdp`` and ``tensor``, and over
``expert`` too: the student has no experts, so on a mesh laid out for an MoE teacher that
axis is one more data axis for it, and sharding its state there (rather than holding a
copy per expert group) divides the state by the axis size. The frozen teacher has no
optimizer state; its stacked expert weights split over ``expert``, the rest of it as the
student's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axes (a tuple shards over several axes; None replicates).
STUDENT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "expert": None,
    "length": None,
}

# The frozen teacher differs only in its experts: stacked expert weights split over the
# `expert` axis and their hidden width over `tensor` (the student has no experts).
TEACHER_RULES: dict[str, Any] = {**STUDENT_RULES, "expert": "expert", "expert_mlp": "tensor"}


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills at most one ``-1`` axis with the remaining devices; checks the product."""
  unknown = [k for k in sizes if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; use only {', '.join(MESH_AXES)}.")
  shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, n in shape.items() if n == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {fill}.")
  known = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"{num_devices} devices cannot be split as {dict(sizes)}: the fixed "
          f"axes multiply to {known}, which does not divide {num_devices}."
      )
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
        f"Mesh {shape} uses {math.prod(shape.values())} devices but "
        f"{num_devices} are present; make the axis sizes multiply to "
        f"{num_devices} or set one axis to -1."
    )
  return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh ``(data, fsdp, tensor, expert)`` over all (or the given) devices.

  Devices are laid out in process order, so the outer axes (``data`` first) span hosts and
  the inner ones (``tensor``, ``expert``) stay within a host, where links are fastest. On
  TPU the physical topology is respected through ``mesh_utils.create_device_mesh``.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(sizes, len(devices))
  dims = [shape[a] for a in MESH_AXES]
  arr = None
  if devices[0].platform == "tpu" and len(devices) == jax.device_count():
    from jax.experimental import mesh_utils

    try:
      arr = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      arr = None  # unusual slice shapes: fall back to process order below
  if arr is None:
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    arr = np.asarray(ordered).reshape(dims)
  return Mesh(arr, MESH_AXES)


def _fill_for_batch(
    sizes: Mapping[str, int], num_devices: int, global_batch: int, rules: Mapping[str, Any]
) -> int | None:
  """A smaller size for the ``-1`` batch axis when the full fill would not divide the batch.

  Returns None when no shrinking is needed or possible.
  """
  fill = [a for a, n in sizes.items() if int(n) == -1]
  target = rules.get("batch")
  batch_axes = (target,) if isinstance(target, str) else tuple(target or ())
  if len(fill) != 1 or fill[0] not in batch_axes:
    return None
  fixed = math.prod(int(n) for a, n in sizes.items() if int(n) != -1)
  full = num_devices // fixed if fixed and num_devices % fixed == 0 else None
  others = math.prod(int(sizes.get(a, 1)) for a in batch_axes if a != fill[0])
  if full is None or global_batch % (others * full) == 0 or global_batch % others:
    return None
  return max(d for d in range(1, full + 1) if global_batch % (others * d) == 0)


def mesh_from_config(
    mesh_config: Mapping[str, Any] | None,
    global_batch: int | None = None,
    rules: Mapping[str, Any] = STUDENT_RULES,
) -> tuple[Mesh, str | None]:
  """The mesh a ``config.mesh`` section describes, and a notice for the log (or None).

  Fields: one size per axis of ``MESH_AXES`` (-1 = the remaining devices; absent = 1 except
  ``data``, which defaults to -1) and ``num_devices`` (0 = every device; n = the first n
  devices of this single-process run, for tests and notebooks).

  In a single process, when the ``-1`` axis is a batch axis and filling it with every
  device would not divide ``global_batch``, it is filled with the largest size that does
  and the remaining devices stay idle (rather than computing the same rows twice).
  """
  sizes = {k: v for k, v in dict(mesh_config or {}).items()}
  num_devices = int(sizes.pop("num_devices", 0) or 0)
  if not sizes:
    sizes = {"data": -1}
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise ValueError(
          f"mesh.num_devices={num_devices} selects a subset of devices, which a "
          "multi-host run cannot do; set mesh.num_devices=0."
      )
    if not 0 < num_devices <= len(devices):
      raise ValueError(
          f"mesh.num_devices={num_devices} but {len(devices)} devices are "
          f"present; use a value from 1 to {len(devices)} (0 = all)."
      )
    devices = devices[:num_devices]
  notice = None
  if global_batch is not None and jax.process_count() == 1:
    shrunk = _fill_for_batch(sizes, len(devices), global_batch, rules)
    if shrunk is not None:
      axis = next(a for a, n in sizes.items() if int(n) == -1)
      fixed = math.prod(int(n) for n in sizes.values() if int(n) != -1)
      used = fixed * shrunk
      notice = (
          f"notice: mesh {axis}=-1 is {shrunk}, not {len(devices) // fixed}, so that "
          f"train.batch_size={global_batch} splits evenly; {used} of {len(devices)} "
          "devices are used."
      )
      sizes[axis] = shrunk
      devices = devices[:used]
  return make_mesh(sizes, devices), notice


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Mapping[str, Any],
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """PartitionSpec for a tensor with these logical axes.

  A mesh axis is used at most once per tensor, and an axis is only applied when it divides
  the dimension (otherwise that dimension stays replicated, never unevenly split).
  """
  if logical_axes is None:
    return PartitionSpec()
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    chosen = []
    size = 1
    for axis in axes:
      n = mesh.shape[axis]
      if axis in used or n == 1:
        continue
      if shape is not None and shape[dim] % (size * n):
        continue
      chosen.append(axis)
      size *= n
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def batch_sharding(
    mesh: Mesh, rules: Mapping[str, Any], ndim: int, rows: int | None = None
) -> NamedSharding:
  """Sharding of a batch-major array: the batch axis over the rules' batch axes.

  With ``rows`` given, only the batch axes that divide it are used (see logical_to_spec).
  """
  shape = None if rows is None else (rows,) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh, shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
  """NamedShardings for any pytree holding nnx Variables (a model's State, a train state).

  Variables (parameters and the optimizer moments that mirror them) are sharded by their
  ``logical_axes``; every other leaf (step counters, RNG keys, scalars) is replicated.
  """

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get("logical_axes")
      value = leaf.get_value()
      spec = logical_to_spec(axes, rules, mesh, getattr(value, "shape", None))
      return leaf.replace(value=NamedSharding(mesh, spec))
    return replicated(mesh)

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shard_count(mesh: Mesh, rules: Mapping[str, Any]) -> int:
  """How many ways the batch axis is split by ``rules`` on ``mesh``."""
  target = rules.get("batch")
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(
    global_batch: int, mesh: Mesh, rules: Mapping[str, Any], process_count: int
) -> tuple[int, str | None]:
  """Rows per host for a global batch, and a notice when devices would repeat work.

  A batch that the batch axes (data x fsdp x expert) do not divide is still correct: the
  axes that do not divide it are left out and the devices along them compute the same
  rows. That wastes devices, hence the notice; across hosts it cannot work at all (every
  host reads different rows), which ``host_data.check_host_rows`` refuses.
  """
  if global_batch % process_count:
    raise ValueError(
        f"train.batch_size={global_batch} cannot be split over {process_count} "
        f"hosts; use a multiple of {process_count}."
    )
  ways = batch_shard_count(mesh, rules)
  used = 1
  spec = batch_sharding(mesh, rules, 1, global_batch).spec[0]
  for axis in (spec,) if isinstance(spec, str) else tuple(spec or ()):
    used *= mesh.shape[axis]
  notice = None
  if used < ways:
    notice = (
        f"notice: train.batch_size={global_batch} is split {used} ways, not over all "
        f"{ways} batch shards of mesh {dict(mesh.shape)}, so {ways // used} devices "
        f"compute each row; use a multiple of {ways} to use every device."
    )
  return global_batch // process_count, notice


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], rules: Mapping[str, Any] = STUDENT_RULES
) -> jax.Array:
  """Pins an activation's layout by logical names, e.g. ``("batch", "length", "embed")``.

  Uses the mesh set with ``jax.set_mesh(mesh)`` around tracing; without one (single
  device, tests, notebooks) it returns ``x`` unchanged. Without such constraints XLA's
  propagation may keep large activations (``[b, L, V]`` logits) replicated over the batch
  axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
    return x
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)
