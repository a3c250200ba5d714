"""Load HF Qwen2/Qwen3 checkpoints into :class:`DenseDecoder` and save them back.

Both directions are driven by the declarative rules of ``tide_jax.convert.qwen``. Loading
streams the checkpoint shard by shard; every expected tensor must be present exactly once
and every checkpoint tensor must be used, otherwise the error lists the offending names.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from tide_jax.convert import name_map as nm
from tide_jax.convert import output_dir
from tide_jax.convert import qwen
from tide_jax.convert.safetensors_io import SafetensorsCheckpoint, write_sharded
from tide_jax.models import config as mcfg
from tide_jax.models import dense

Placer = Callable[[tuple, np.ndarray], jax.Array]


def _list(names, limit: int = 20) -> str:
  names = sorted(names)
  more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def fill_state_from_checkpoint(
    abstract_model: nnx.Module,
    ckpt: SafetensorsCheckpoint,
    rules: Sequence[nm.Rule],
    ranges: Mapping[str, int],
    place: Placer | None = None,
) -> nnx.Module:
  """Materialises ``abstract_model``'s parameters from a safetensors checkpoint.

  Args:
    abstract_model: a model built under ``nnx.eval_shape`` (ShapeDtypeStruct leaves).
    ckpt: the checkpoint index.
    rules, ranges: the family's name map and placeholder ranges.
    place: optional ``(flax_path, array) -> jax.Array`` that puts a converted tensor on its
      devices (for example with a NamedSharding); defaults to ``jax.device_put``.

  Returns:
    A concrete model of the same structure.
  """
  graphdef, abstract_state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(abstract_state))
  expected = {hf: (path, rule) for hf, path, rule in nm.expand(rules, ranges)}
  unmapped = [
      nm.format_path(p) for p, _ in flat.items() if p not in {path for path, _ in expected.values()}
  ]
  if unmapped:
    raise ValueError(f"The name map does not cover model parameters: {_list(unmapped)}.")
  missing = set(expected) - ckpt.names
  unexpected = ckpt.names - set(expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors: {_list(missing)}")
    if unexpected:
      parts.append(f"unexpected tensors: {_list(unexpected)}")
    raise ValueError(
        f"Checkpoint {ckpt.model_dir} does not match the model config ("
        + "; ".join(parts)
        + "); check that config.json belongs to these weights."
    )
  place = place or (lambda path, arr: jax.device_put(arr))
  values: dict[tuple, Any] = {}
  shape_errors = []
  for path_file in ckpt.files():
    for hf_name, tensor in ckpt.iter_file(path_file, wanted=set(expected)):
      path, rule = expected[hf_name]
      target = flat[path]
      want = target.get_value()
      try:
        arr = rule.to_flax(tensor)
      except ValueError as err:  # a transform's own shape check, made before it reshapes
        shape_errors.append(f"{hf_name} {err} ({nm.format_path(path)} expects {want.shape})")
        continue
      if tuple(arr.shape) != tuple(want.shape):
        shape_errors.append(
            f"{hf_name} {tuple(tensor.shape)} -> {nm.format_path(path)} "
            f"expects {tuple(want.shape)}"
        )
        continue
      values[path] = place(path, arr.astype(want.dtype))
  if shape_errors:
    raise ValueError(
        f"Checkpoint tensor shapes in {ckpt.model_dir} do not match its config.json ("
        + "; ".join(shape_errors[:10])
        + "); check head_dim and the head counts in config.json."
    )
  new_flat = [(p, v.replace(value=values[p])) for p, v in flat.items()]
  return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def load_dense_from_hf(
    model_dir: str,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    place: Placer | None = None,
) -> dense.DenseDecoder:
  """Builds a :class:`DenseDecoder` from a local HF Qwen2/Qwen3 directory."""
  hf_config = mcfg.read_hf_config(model_dir)
  cfg = mcfg.decoder_config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype)
  ckpt = SafetensorsCheckpoint(model_dir)
  return fill_state_from_checkpoint(
      dense.abstract_decoder(cfg), ckpt, qwen.qwen_rules(cfg), qwen.qwen_ranges(cfg), place
  )


def model_tensors_for_hf(
    model: nnx.Module, rules: Sequence[nm.Rule], ranges: Mapping[str, int]
) -> dict[str, np.ndarray]:
  """HF-named NumPy tensors of a model, in name-map order."""
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  return {
      hf: rule.to_hf(np.asarray(jax.device_get(flat[path].get_value())))
      for hf, path, rule in nm.expand(rules, ranges)
  }


def save_dense_as_hf(
    model: dense.DenseDecoder,
    out_dir: str,
    *,
    extra_files: Mapping[str, str] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> None:
  """Writes ``config.json`` + safetensors that ``transformers`` loads as ``*ForCausalLM``.

  The directory is written under a temporary sibling name and renamed at the end, so a
  failure never leaves a partial checkpoint behind. A non-empty ``out_dir`` is refused
  unless ``overwrite``, and even then only when it holds nothing but HF model files (see
  :mod:`tide_jax.convert.output_dir`). ``extra_files`` maps file names to text contents
  (for example a generation config).
  """
  output_dir.check_target(out_dir, overwrite=overwrite, what="HF model", flag="overwrite=True")
  cfg = model.cfg
  hf_config = cfg.to_hf_dict()
  tensors = model_tensors_for_hf(model, qwen.qwen_rules(cfg), qwen.qwen_ranges(cfg))
  staging = output_dir.make_staging(out_dir)
  try:
    write_sharded(tensors, staging, max_shard_bytes)
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    for name, text in (extra_files or {}).items():
      with open(os.path.join(staging, name), "w") as f:
        f.write(text)
    output_dir.publish(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
