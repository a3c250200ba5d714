"""Compiled memory statistics of a program, printed at start-up and used by the benchmark.

XLA reports, per device: argument bytes (parameters, optimizer state, batch, teacher),
output bytes, aliased bytes (donated inputs reused as outputs) and temporary bytes
(activations kept for the backward pass, gradients, workspace). The peak a device needs
is about ``arguments + outputs - aliased + temporaries``.
"""

from __future__ import annotations

from typing import Any

import jax


def memory_stats(compiled) -> dict[str, int] | None:
  """Per-device byte counts of a compiled program, or None if the backend reports none."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    return None
  if stats is None:
    return None
  out = {
      "arguments": int(stats.argument_size_in_bytes),
      "outputs": int(stats.output_size_in_bytes),
      "aliased": int(stats.alias_size_in_bytes),
      "temporaries": int(stats.temp_size_in_bytes),
      "code": int(stats.generated_code_size_in_bytes),
  }
  out["peak_estimate"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def tree_bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays or sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sh = getattr(leaf, "sharding", None)
    shape = sh.shard_shape(leaf.shape) if sh is not None else leaf.shape
    n = 1
    for d in shape:
      n *= int(d)
    total += n * jax.numpy.dtype(leaf.dtype).itemsize
  return total


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def describe(stats: dict[str, int] | None, name: str = "train step") -> str:
  """One line for the start-up log."""
  if stats is None:
    return f"{name}: this backend reports no compiled memory statistics"
  return (
      f"{name} memory per device: arguments {gib(stats['arguments'])}, outputs "
      f"{gib(stats['outputs'])} ({gib(stats['aliased'])} donated), temporaries "
      f"{gib(stats['temporaries'])}; peak about {gib(stats['peak_estimate'])}"
  )
