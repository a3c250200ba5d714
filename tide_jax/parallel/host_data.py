"""Per-host batches -> global arrays, and the data-iterator position of every host.

Each host reads its own share of the data (``tide_jax.data.pipeline``: host p of P takes the
rows at positions p, p + P, ... of the epoch's order, which fill rows pad to a multiple of
B, so every host reads the same number per epoch) and gives this module its
``[B / P, ...]`` rows. ``global_batch`` assembles the ``[B, ...]`` array the step sees with
``jax.make_array_from_process_local_data`` and then interleaves the hosts' rows so that
global row ``p + P * j`` is host p's row j. That is exactly the order in which one process
reading the whole batch would see the records, so the noise drawn for each row, and hence
every loss, does not depend on how many hosts share the work.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from tide_jax.parallel import sharding


def check_host_rows(target: NamedSharding, global_rows: int, process_count: int) -> None:
  """Checks that this host's devices hold one contiguous block of ``B / P`` batch rows.

  That fails when the batch axis is replicated across hosts (e.g. a ``tensor`` axis that
  spans hosts while ``data x fsdp x expert`` does not cover them), in which case every host
  would have to feed identical rows.
  """
  if process_count == 1:
    return
  index_map = target.addressable_devices_indices_map((global_rows,))
  starts = {sl[0].start or 0 for sl in index_map.values()}
  stops = {sl[0].stop if sl[0].stop is not None else global_rows for sl in index_map.values()}
  covered = max(stops) - min(starts)
  if covered != global_rows // process_count:
    raise ValueError(
        f"This host's devices hold {covered} of the {global_rows} batch rows, not "
        f"{global_rows // process_count}: the mesh's batch axes (data x fsdp x expert) must "
        "span the hosts; put the tensor axis within a host (e.g. raise data or fsdp)."
    )


def _interleave(x: jax.Array, process_count: int) -> jax.Array:
  """``[P * b, ...]`` host-major rows -> row-major order ``p + P * j`` (see module doc)."""
  b = x.shape[0] // process_count
  x = x.reshape((process_count, b) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((process_count * b,) + x.shape[2:])


def make_global_batch_fn(mesh: Mesh, rules: Mapping[str, Any], process_count: int):
  """``fn(local: dict[str, np.ndarray [b, ...]]) -> dict[str, jax.Array [P * b, ...]]``."""
  reorder_cache: dict[Any, Any] = {}

  def reorder(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    key = tuple((k, v.shape, v.dtype) for k, v in sorted(arrays.items()))
    if key not in reorder_cache:
      out_sh = {
          k: sharding.batch_sharding(mesh, rules, v.ndim, v.shape[0]) for k, v in arrays.items()
      }
      reorder_cache[key] = jax.jit(
          lambda t: {k: _interleave(v, process_count) for k, v in t.items()}, out_shardings=out_sh
      )
    return reorder_cache[key](arrays)

  def global_batch(local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    out = {}
    for key, value in local.items():
      value = np.asarray(value)
      rows = value.shape[0] * process_count
      target = sharding.batch_sharding(mesh, rules, value.ndim, rows)
      check_host_rows(target, rows, process_count)
      out[key] = jax.make_array_from_process_local_data(target, value, (rows,) + value.shape[1:])
    return reorder(out) if process_count > 1 else out

  return global_batch


# ----------------------------------------------------------------- iterator positions

_POSITION_KEYS = ("epoch", "offset")


def gather_iterator_states(local_state: Mapping[str, Any]) -> dict[str, Any]:
  """Every host's iterator position, for the checkpoint (orbax writes JSON from host 0).

  Returns ``{"hosts": [state of host 0, ..., state of host P-1]}``.
  """
  count = jax.process_count()
  if count == 1:
    return {"hosts": [dict(local_state)]}
  mine = np.asarray([int(local_state[k]) for k in _POSITION_KEYS], np.int64)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(count, len(mine))
  hosts = []
  for p in range(count):
    state = dict(local_state)
    state.update({k: int(v) for k, v in zip(_POSITION_KEYS, every[p])})
    state["process_index"] = p
    hosts.append(state)
  return {"hosts": hosts}


def local_iterator_state(
    saved: Mapping[str, Any], process_index: int, process_count: int
) -> dict[str, Any]:
  """This host's iterator position from a checkpoint's ``gather_iterator_states`` record.

  A checkpoint written by a different number of hosts is converted. Every host reads the
  same number of rows per epoch and the hosts advance in lockstep, so all stood at the same
  (epoch, offset): R = P x offset rows of the epoch were consumed, R / P' for each of P'
  hosts. R is a whole number of global batches (epochs are padded to a multiple of the
  global batch B, and checkpoints fall between steps) and P' divides B, so this works in
  any epoch; the interleaved order of ``global_batch`` is the single reader's, so the run
  continues with the rows it would have read on P hosts. Only a record whose hosts stood
  at different places, or between global batches, is refused.
  """
  hosts: Sequence[Mapping[str, Any]] = saved["hosts"] if "hosts" in saved else [saved]
  if len(hosts) == process_count:
    return dict(hosts[process_index])
  epochs = {int(h["epoch"]) for h in hosts}
  offsets = {int(h["offset"]) for h in hosts}
  consumed = sum(int(h["offset"]) for h in hosts)
  if len(epochs) != 1 or len(offsets) != 1 or consumed % process_count:
    raise ValueError(
        f"The checkpoint's data position was written by {len(hosts)} hosts and cannot be "
        f"split over {process_count}: resume with {len(hosts)} hosts, or with a host count "
        f"that divides the {consumed} records read so far in the epoch."
    )
  state = dict(hosts[0])
  state.update(
      epoch=epochs.pop(),
      offset=consumed // process_count,
      process_index=process_index,
      process_count=process_count,
  )
  return state


def sum_over_hosts(counts: Mapping[str, int]) -> dict[str, int]:
  """Per-name integer counts summed over every process (each host counts its own rows)."""
  names = sorted(counts)
  mine = np.asarray([counts[n] for n in names], np.int64)
  if jax.process_count() == 1:
    return {n: int(c) for n, c in zip(names, mine)}
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(names))
  return {n: int(c) for n, c in zip(names, every.sum(axis=0))}
