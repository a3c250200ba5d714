"""Create, restore and compile against sharded state without materialising it on one host.

The recipe (DESIGN.md): ``jax.eval_shape`` of the state -> NamedShardings from the logical
axis rules -> a jitted initialiser with those ``out_shardings`` (each device computes only
its shard), or an orbax restore onto them (resharding a checkpoint written on any mesh).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from tide_jax.parallel import sharding


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (what orbax restores onto)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def init_sharded(create: Callable[..., Any], shardings: Any, *args: Any) -> Any:
  """Runs ``create(*args)`` under jit so every output leaf is born with its sharding."""
  return jax.jit(create, out_shardings=shardings)(*args)


def put_sharded(tree: Any, shardings: Any) -> Any:
  """Places an existing (host or device) pytree onto ``shardings``."""
  return jax.device_put(tree, shardings)


def shardings_of(tree: Any) -> Any:
  """The sharding of every array leaf of a concrete pytree (None for a None tree)."""
  if tree is None:
    return None
  return jax.tree.map(lambda x: x.sharding, tree)


def batch_shardings(
    example: Mapping[str, np.ndarray], mesh: Mesh, rules: Mapping[str, Any]
) -> dict[str, Any]:
  """Per-key batch shardings for a global batch dict (only ranks and rows matter)."""
  return {
      k: sharding.batch_sharding(mesh, rules, np.ndim(v), np.shape(v)[0])
      for k, v in example.items()
  }
