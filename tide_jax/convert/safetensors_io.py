"""Reading and writing HF safetensors checkpoints (single file or sharded with an index).

Tensors are read one at a time through ``safe_open`` so a caller can stream a checkpoint
shard by shard without holding all of it in memory.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def unreadable(path: str, reason: str) -> ValueError:
  """The one-sentence error for a damaged checkpoint file."""
  return ValueError(
      f"{path} is not a readable safetensors file ({reason}); it is truncated or corrupt, "
      "so download or export it again."
  )


def _open(path: str):
  """``safe_open`` with its errors (bad header, truncated data) turned into one sentence."""
  try:
    return safe_open(path, "np")
  except SafetensorError as err:
    raise unreadable(path, str(err)) from None


class SafetensorsCheckpoint:
  """Index of the tensors in a local HF model directory: name -> shard file."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
          raise TypeError("weight_map is not an object")
      except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_path} is not a valid safetensors index ({type(err).__name__}: {err}); "
            "download or export the model again."
        ) from None
      self.tensor_to_file = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    elif os.path.exists(single_path):
      with _open(single_path) as f:
        self.tensor_to_file = {k: single_path for k in f.keys()}
    else:
      raise FileNotFoundError(
          f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}; pass a directory "
          "saved by save_pretrained with safetensors weights."
      )
    missing_files = sorted({p for p in self.tensor_to_file.values() if not os.path.exists(p)})
    if missing_files:
      raise FileNotFoundError(
          f"The safetensors index of {model_dir} names missing shard files: "
          f"{', '.join(os.path.basename(p) for p in missing_files)}."
      )

  @property
  def names(self) -> set[str]:
    return set(self.tensor_to_file)

  def files(self) -> list[str]:
    """Shard files in a stable order."""
    return sorted(set(self.tensor_to_file.values()))

  def iter_file(
      self, path: str, wanted: set[str] | None = None
  ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` for the tensors of one shard, one at a time."""
    with _open(path) as f:
      for name in f.keys():
        if wanted is None or name in wanted:
          try:
            tensor = f.get_tensor(name)
          except SafetensorError as err:
            raise unreadable(path, f"tensor {name}: {err}") from None
          yield name, tensor

  def read(self, name: str) -> np.ndarray:
    path = self.tensor_to_file[name]
    with _open(path) as f:
      try:
        return f.get_tensor(name)
      except SafetensorError as err:
        raise unreadable(path, f"tensor {name}: {err}") from None


def write_sharded(
    tensors: Mapping[str, np.ndarray], out_dir: str, max_shard_bytes: int = 2 * 1024**3
) -> list[str]:
  """Writes tensors as safetensors shards (plus an index when more than one shard).

  Returns the written file names. The tensors are written in the order given.
  """
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(arr)
    size += arr.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fname, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  total = sum(a.nbytes for s in shards for a in s.values())
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names + [INDEX_FILE]
