"""Streaming conversion of HF safetensors into a sharded orbax checkpoint, and loading it back.

Conversion reads the checkpoint one shard file at a time and one tensor at a time, turns each
tensor into its Flax parameter(s) with the family's name map (split fused projections,
transpose, stack experts), casts it to the parameter's dtype and places it directly into its
``NamedSharding`` (``jax.make_array_from_callback``: each process materialises only the
shards its devices hold). Stacked expert weights are assembled in one host buffer per
parameter, which is freed as soon as the last expert arrives.

Finished parameter groups (one per decoder layer, one per top-level parameter such as the
embedding) are written at once as their own orbax checkpoint and dropped, so neither the
host nor the devices ever hold the whole model during conversion. Layout of the output::

  OUT/teacher.json         manifest, written last: model config, dtype, groups, sizes
  OUT/<group>/             one orbax (StandardCheckpointer) checkpoint per group

Loading restores every group straight onto the shardings of an abstract model.
The raw safetensors reader here supports bfloat16, which the ``safetensors`` NumPy
backend does not.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from tide_jax.convert import name_map as nm
from tide_jax.convert.safetensors_io import SafetensorsCheckpoint, unreadable

MANIFEST = "teacher.json"
FORMAT = "tide_jax.teacher.v1"

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

Progress = Callable[[str], None]


def _names(items, limit: int = 20) -> str:
  items = sorted(items)
  more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- reading


def read_safetensors_header(path: str) -> tuple[dict[str, dict], int]:
  """``(header, data_offset)``: per tensor its dtype, shape and byte range in the file.

  A file too short for its header, a header that is not JSON, or tensors that reach past
  the end of the file (a truncated download) are one-sentence ValueErrors naming the file.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise unreadable(path, f"{file_size} bytes, shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", prefix)
    if size > file_size - 8:
      raise unreadable(path, f"header length {size} exceeds the file's {file_size} bytes")
    try:
      header = json.loads(f.read(size))
      entries = [v for k, v in header.items() if k != "__metadata__"]
      end = max((int(v["data_offsets"][1]) for v in entries), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
      raise unreadable(path, f"its header is not valid ({type(err).__name__}: {err})") from None
  if 8 + size + end > file_size:
    raise unreadable(path, f"its tensors need {8 + size + end} bytes, the file has {file_size}")
  header.pop("__metadata__", None)
  return header, 8 + size


def iter_safetensors(path: str, wanted: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(name, array)`` for the tensors of one file in file order, one copy each.

  Each tensor is read with ``readinto`` into a fresh array, so only the current tensor
  (and what the caller keeps) is resident; the file is never memory-mapped.
  """
  header, start = read_safetensors_header(path)
  entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
  with open(path, "rb") as f:
    for name, info in entries:
      if wanted is not None and name not in wanted:
        continue
      if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
      begin, end = info["data_offsets"]
      arr = np.empty(info["shape"], _SAFETENSORS_DTYPES[info["dtype"]])
      if arr.nbytes != end - begin:
        raise ValueError(
            f"{path}: tensor {name} occupies {end - begin} bytes but its shape "
            f"{info['shape']} and dtype {info['dtype']} need {arr.nbytes}."
        )
      f.seek(start + begin)
      if arr.nbytes and f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != arr.nbytes:
        raise ValueError(f"{path} is truncated inside tensor {name}.")
      yield name, arr


def checkpoint_bytes(ckpt: SafetensorsCheckpoint) -> int:
  """Total tensor bytes of a checkpoint, from the file headers only."""
  total = 0
  for path in ckpt.files():
    header, _ = read_safetensors_header(path)
    total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
  return total


# --------------------------------------------------------------------------- helpers


def release_freed_memory_eagerly() -> bool:
  """Makes glibc return freed tensor memory to the OS (Linux/glibc only; no-op elsewhere).

  glibc raises its mmap threshold after large frees, so later tensor-sized buffers come
  from the heap and stay resident after being freed; over a conversion this looks like the
  model accumulating in memory. Fixing the threshold (and limiting arenas, which the
  orbax/tensorstore threads would otherwise multiply) keeps RSS near the working set.
  A process-wide setting: call it from entry points (the convert CLI), not from libraries.
  Returns whether it was applied.
  """
  try:
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold, m_arena_max = -3, -8
    return bool(libc.mallopt(m_mmap_threshold, 1 << 16)) and bool(libc.mallopt(m_arena_max, 2))
  except (OSError, AttributeError):
    return False


def group_of(path: tuple) -> tuple:
  """Parameters are saved in groups: one per decoder layer, one per other top-level name."""
  return path[:2] if path[0] == "layers" else path[:1]


def group_dir(group: tuple) -> str:
  return "_".join(str(p) for p in group)


def _nest(items: Mapping[tuple, Any]) -> dict:
  """``{("layers", 3, "attn", "q"): x}`` -> ``{"layers": {"3": {"attn": {"q": x}}}}``."""
  tree: dict = {}
  for path, value in items.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = value
  return tree


def _lookup(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[str(key)]
  return tree


def flat_shardings(abstract_state: nnx.State, shardings: nnx.State | None) -> dict[tuple, Any]:
  """Path -> sharding; without ``shardings`` everything goes to the first local device."""
  if shardings is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    return {p: device for p, _ in nnx.to_flat_state(abstract_state)}
  return {p: v.get_value() for p, v in nnx.to_flat_state(shardings)}


def place(array: np.ndarray, sharding: Any) -> jax.Array:
  """Puts a host array onto its sharding; each process builds only its addressable shards."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _check_names(
    ckpt: SafetensorsCheckpoint, sources: Mapping[str, nm.Source], params: set[tuple]
) -> None:
  covered = {p for s in sources.values() for p in s.paths}
  unmapped = [nm.format_path(p) for p in params - covered]
  if unmapped:
    raise ValueError(f"The name map does not cover model parameters: {_names(unmapped)}.")
  missing, unexpected = set(sources) - ckpt.names, ckpt.names - set(sources)
  if missing or unexpected:
    parts = ([f"missing tensors: {_names(missing)}"] if missing else []) + (
        [f"unexpected tensors: {_names(unexpected)}"] if unexpected else []
    )
    raise ValueError(
        f"Checkpoint {ckpt.model_dir} does not match its config.json ("
        + "; ".join(parts)
        + "); check that config.json belongs to these weights."
    )


# --------------------------------------------------------------------------- conversion


class _GroupWriter:
  """Collects placed parameters per group and saves each group once it is complete."""

  def __init__(self, out: epath.Path, params: Sequence[tuple]):
    self.out = out
    self.remaining: dict[tuple, set[tuple]] = {}
    for path in params:
      self.remaining.setdefault(group_of(path), set()).add(path)
    self.values: dict[tuple, dict[tuple, jax.Array]] = {}
    self.saved: list[str] = []
    self.checkpointer = ocp.StandardCheckpointer()

  def add(self, path: tuple, value: jax.Array) -> None:
    group = group_of(path)
    self.values.setdefault(group, {})[path] = value
    self.remaining[group].discard(path)
    if not self.remaining[group]:
      # Saved synchronously: overlapping the next layer's reading with this save measured no
      # faster here and holds one more layer in memory.
      self.checkpointer.save(self.out / group_dir(group), _nest(self.values.pop(group)))
      self.checkpointer.wait_until_finished()
      self.saved.append(group_dir(group))

  def finish(self) -> list[str]:
    self.checkpointer.wait_until_finished()
    self.checkpointer.close()
    return self.saved


def stream_convert(
    abstract_model: nnx.Module,
    ckpt: SafetensorsCheckpoint,
    rules: Sequence[nm.AnyRule],
    ranges: Mapping[str, Any],
    out_dir: str,
    *,
    shardings: nnx.State | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
  """Converts an HF checkpoint into the orbax layout described in the module docstring.

  Args:
    abstract_model: the target model under ``nnx.eval_shape``; its parameter dtypes are the
      stored dtypes.
    ckpt: the HF checkpoint index.
    rules, ranges: the family's name map.
    out_dir: local directory or ``gs://`` path; must not exist unless ``overwrite``.
    shardings: optional State of NamedShardings mirroring the model (each tensor is placed
      straight into it); default: the first local device.
    metadata: extra JSON entries for the manifest (for example the HF config).
    overwrite: replace an existing ``out_dir``.
    progress: called with one line per finished shard file.

  Returns:
    Statistics: ``bytes_read``, ``seconds``, ``tensors``, ``groups``, ``param_bytes``.
  """
  final = epath.Path(out_dir)
  if final.exists() and not overwrite:
    raise ValueError(
        f"Output {out_dir} already exists; choose a new path or pass "
        "overwrite=True (--overwrite) to replace it."
    )
  _, abstract_state = nnx.split(abstract_model)
  targets = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
  sources, stack_sizes = nm.expand_sources(rules, ranges)
  _check_names(ckpt, sources, set(targets))
  where = flat_shardings(abstract_state, shardings)
  # Written into a sibling and renamed at the end: a failed conversion leaves no partial
  # output (and, with overwrite, the previous conversion stays until the new one is done).
  # The name is the same on every host, which all write into it.
  out = final.parent / f".{final.name}.converting"
  _sync_hosts("tide_jax_convert_start")
  if jax.process_index() == 0:
    if out.exists():  # left by an earlier conversion into the same target that failed
      out.rmtree()
    out.mkdir(parents=True)
  _sync_hosts("tide_jax_convert_staged")
  try:
    stats = _convert_into(out, ckpt, sources, stack_sizes, targets, where, metadata or {}, progress)
  except BaseException:
    # No barrier here: a failure may reach the hosts at different points.
    if jax.process_index() == 0:
      out.rmtree(missing_ok=True)
    raise
  _sync_hosts("tide_jax_convert_done")
  if jax.process_index() == 0:
    _replace_dir(out, final)
  _sync_hosts("tide_jax_convert_published")
  return stats


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _replace_dir(staged: epath.Path, final: epath.Path) -> None:
  """Renames ``staged`` to ``final``; an existing ``final`` is moved aside, then removed."""
  if not final.exists():
    staged.rename(final)
    return
  aside = final.parent / f".{final.name}.replaced"
  if aside.exists():
    aside.rmtree()
  final.rename(aside)
  staged.rename(final)
  aside.rmtree()


def _convert_into(
    out: epath.Path,
    ckpt: SafetensorsCheckpoint,
    sources: Mapping[str, nm.Source],
    stack_sizes: Mapping[tuple, int],
    targets: Mapping[tuple, Any],
    where: Mapping[tuple, Any],
    metadata: Mapping[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
  """The conversion proper, into the directory ``out`` (see :func:`stream_convert`)."""
  writer = _GroupWriter(out, list(targets))
  buffers: dict[tuple, list] = {}  # stacked path -> [host buffer, slots filled]
  total = checkpoint_bytes(ckpt)
  done_bytes, tensors, start = 0, 0, time.perf_counter()
  files = ckpt.files()
  for file_index, path_file in enumerate(files):
    for hf_name, tensor in iter_safetensors(path_file, wanted=set(sources)):
      source = sources[hf_name]
      done_bytes += tensor.nbytes
      tensors += 1
      try:
        parts = source.convert(tensor)
      except ValueError as err:  # a transform's own shape check, made before it reshapes
        raise ValueError(
            f"Tensor {hf_name} in {path_file}: {err}; config.json does not describe these "
            "weights (check head_dim and the head counts)."
        ) from None
      del tensor
      for path, part in zip(source.paths, parts):
        target = targets[path]
        want = tuple(target.shape) if source.index is None else tuple(target.shape[1:])
        if tuple(part.shape) != want:
          raise ValueError(
              f"Tensor {hf_name} has shape {tuple(part.shape)} "
              f"after conversion but {nm.format_path(path)} expects {want}; "
              "config.json does not describe these weights."
          )
        if source.index is None:
          writer.add(path, place(np.asarray(part, target.dtype), where[path]))
          continue
        slot = buffers.setdefault(path, [np.empty(target.shape, target.dtype), 0])
        slot[0][source.index] = part
        slot[1] += 1
        if slot[1] == stack_sizes[path]:
          writer.add(path, place(buffers.pop(path)[0], where[path]))
      del parts
    if progress:
      elapsed = time.perf_counter() - start
      progress(
          f"[{file_index + 1}/{len(files)}] {epath.Path(path_file).name}: "
          f"{done_bytes / 1e9:.2f}/{total / 1e9:.2f} GB read, "
          f"{done_bytes / 1e9 / max(elapsed, 1e-9):.2f} GB/s"
      )
  groups = writer.finish()
  param_bytes = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in targets.values())
  manifest = {
      "format": FORMAT,
      "groups": groups,
      "param_bytes": param_bytes,
      "source_bytes": total,
      **metadata,
  }
  (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
  return {
      "bytes_read": done_bytes,
      "seconds": time.perf_counter() - start,
      "tensors": tensors,
      "groups": len(groups),
      "param_bytes": param_bytes,
  }


# --------------------------------------------------------------------------- loading


def read_manifest(out_dir: str) -> dict[str, Any]:
  """The manifest of a converted checkpoint; a clear error when it is absent or foreign."""
  path = epath.Path(out_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(
        f"{out_dir} is not a converted teacher checkpoint (no {MANIFEST}); run "
        "`python -m tide_jax.convert --hf_dir=... --out=...` first, or let it finish."
    )
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}.")
  return manifest


def load_converted(
    out_dir: str, abstract_model: nnx.Module, shardings: nnx.State | None = None
) -> nnx.Module:
  """Restores a converted checkpoint group by group straight onto ``shardings``.

  Args:
    out_dir: what :func:`stream_convert` wrote.
    abstract_model: the model under ``nnx.eval_shape`` with the stored parameter dtypes.
    shardings: optional State of NamedShardings (default: the first local device).

  Returns:
    The concrete model.
  """
  manifest = read_manifest(out_dir)
  graphdef, abstract_state = nnx.split(abstract_model)
  flat = list(nnx.to_flat_state(abstract_state))
  where = flat_shardings(abstract_state, shardings)
  by_group: dict[tuple, dict[tuple, jax.ShapeDtypeStruct]] = {}
  for path, var in flat:
    value = var.get_value()
    by_group.setdefault(group_of(path), {})[path] = jax.ShapeDtypeStruct(
        value.shape, value.dtype, sharding=where[path]
    )
  expected = {group_dir(g) for g in by_group}
  if expected != set(manifest["groups"]):
    raise ValueError(
        f"{out_dir} holds parameter groups that do not match the model: missing "
        f"{_names(expected - set(manifest['groups'])) or 'none'}, unexpected "
        f"{_names(set(manifest['groups']) - expected) or 'none'}."
    )
  values: dict[tuple, jax.Array] = {}
  with ocp.StandardCheckpointer() as checkpointer:
    for group, items in by_group.items():
      restored = checkpointer.restore(epath.Path(out_dir) / group_dir(group), _nest(items))
      for path in items:
        values[path] = _lookup(restored, path)
  return nnx.merge(
      graphdef, nnx.from_flat_state([(p, v.replace(value=values[p])) for p, v in flat])
  )
