"""Multi-host start: ``jax.distributed.initialize`` when more than one process is present.

Call ``maybe_initialize()`` before anything touches a JAX backend (the entrypoint does it
first thing). One process per host; JAX's own runtime does every collective.

Where the process layout comes from, first match wins:
  1. explicit values (arguments, or the environment variables
     ``TIDE_COORDINATOR_ADDRESS`` host:port, ``TIDE_NUM_PROCESSES``, ``TIDE_PROCESS_ID``);
  2. a cluster that JAX detects by itself, when it reports several processes: a TPU VM
     slice with more than one worker, a SLURM step with more than one task, Open MPI, or
     ``TIDE_DISTRIBUTED=auto`` (set by launch/tpu_vm.sh for multi-worker slices);
  3. otherwise a single process, and nothing is initialised.

Local devices: with no ``local_device_ids``, JAX binds each process of a SLURM (or Open
MPI) GPU job to the single GPU numbered ``SLURM_LOCALID``, which is right for one task per
GPU but leaves seven of eight GPUs idle with one task per node. ``local_device_ids`` below
therefore gives every GPU of the node to a process that is its node's only task
(``JAX_LOCAL_DEVICE_IDS``, set by launch/gpu_slurm.sh, wins when present). TPU hosts are
never restricted.
"""

from __future__ import annotations

import os
from typing import Mapping

ENV_COORDINATOR = "TIDE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "TIDE_NUM_PROCESSES"
ENV_PROCESS_ID = "TIDE_PROCESS_ID"


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  raw = env.get(name, "").strip()
  if not raw:
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(
        f"{name}={raw!r} is not an integer; set it to a whole number or unset " "it."
    ) from None


def detected_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process cluster this process runs in, or None (single process)."""
  env = os.environ if env is None else env
  if env.get("TIDE_DISTRIBUTED", "").strip().lower() == "auto":
    return "auto"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
    if (_int_env(env, name) or 1) > 1:
      return "slurm"
  if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "mpi"
  return None


def _tasks_per_node(env: Mapping[str, str]) -> list[int]:
  """Task counts per node from ``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``"1(x2)"``, ``"2,1"``)."""
  raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
  counts = []
  for item in filter(None, raw.split(",")):
    number = item.split("(")[0]
    if number.isdigit():
      counts.append(int(number))
  return counts


def _gpus_on_node(env: Mapping[str, str]) -> int | None:
  """GPUs SLURM gave this node: ``SLURM_GPUS_ON_NODE``, else ``CUDA_VISIBLE_DEVICES``."""
  count = _int_env(env, "SLURM_GPUS_ON_NODE")
  if count is not None:
    return count
  visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
  return len(visible.split(",")) if visible else None


def local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The accelerator ids this process drives, or None for JAX's own choice.

  ``JAX_LOCAL_DEVICE_IDS`` (comma-separated) when set; under SLURM with one task on every
  node and the node's GPU count known, all of them (``[0, ..., n - 1]``); else None.
  """
  env = os.environ if env is None else env
  explicit = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  if explicit:
    try:
      return [int(i) for i in explicit.split(",")]
    except ValueError:
      raise ValueError(
          f"JAX_LOCAL_DEVICE_IDS={explicit!r} is not a comma-separated list of "
          "device numbers; write for example 0,1,2,3,4,5,6,7."
      ) from None
  if detected_cluster(env) != "slurm":
    return None
  per_node = _tasks_per_node(env)
  gpus = _gpus_on_node(env)
  if per_node and all(n == 1 for n in per_node) and gpus:
    return list(range(gpus))
  return None


def explicit_layout(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from arguments or TIDE_* variables, or None."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR, "").strip() or None
  num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if not any(given):
    return None
  if not all(given):
    raise ValueError(
        f"A multi-process run needs all of {ENV_COORDINATOR} (host:port), "
        f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}; set the missing ones."
    )
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
        f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}="
        f"{num_processes}); fix the process numbering."
    )
  if ":" not in coordinator:
    raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} needs a port, e.g. 10.0.0.2:8476.")
  return coordinator, num_processes, process_id


def maybe_initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
  """Initialises JAX's distributed runtime when needed; returns (process_index, count)."""
  import jax

  layout = explicit_layout(coordinator, num_processes, process_id)
  if layout is not None and layout[1] > 1:
    jax.distributed.initialize(
        coordinator_address=layout[0],
        num_processes=layout[1],
        process_id=layout[2],
        local_device_ids=local_device_ids(),
    )
  elif layout is None and detected_cluster() is not None:
    jax.distributed.initialize(local_device_ids=local_device_ids())
  return jax.process_index(), jax.process_count()
