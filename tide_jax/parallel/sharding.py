"""Device mesh from configuration and logical-axis sharding rules.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``expert`` ...);
one rules table per role maps each name to zero or more mesh axes. The student is trained,
so its parameters and optimizer state spread over ``fsdp`` and ``tensor``; the frozen
teacher has no optimizer state and spreads over ``tensor``, ``expert`` and ``fsdp``.
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
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "expert": None,
    "length": None,
}

TEACHER_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert_mlp": "tensor",
    "norm": None,
    "expert": "expert",
    "length": None,
}


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
      raise ValueError(f"{num_devices} devices cannot be split as {dict(sizes)}: the fixed "
                       f"axes multiply to {known}, which does not divide {num_devices}.")
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"Mesh {shape} uses {math.prod(shape.values())} devices but "
                     f"{num_devices} are present; make the axis sizes multiply to "
                     f"{num_devices} or set one axis to -1.")
  return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh ``(data, fsdp, tensor, expert)`` over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(sizes, len(devices))
  arr = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Mapping[str, Any],
                    mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
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


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any]) -> nnx.State:
  """A State of NamedShardings mirroring ``state`` (abstract or concrete) by logical axes."""

  def one(var):
    axes = var.get_metadata().get("logical_axes")
    value = var.get_value()
    return var.replace(value=NamedSharding(mesh, logical_to_spec(axes, rules, mesh, value.shape)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any], ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: the batch axis over the rules' batch axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
