"""Export a trained student to a HuggingFace directory that ``transformers`` loads.

The directory holds ``config.json`` and safetensors (Qwen2/Qwen3 ``*ForCausalLM`` layout,
written by :func:`tide_jax.convert.hf_checkpoint.save_dense_as_hf`), the tokenizer files
(``tokenizer.save_pretrained``: tokenizer.json, tokenizer_config.json with the chat
template), ``generation_config.json`` (EOS / pad ids) and ``bd3lm.json`` with what a
block-diffusion sampler needs beyond the weights (block size, mask token, schedule).
Evaluation harnesses that load HF directories (lm-evaluation-harness) can read it as is.
"""

from __future__ import annotations

import json
import os
import shutil

from tide_jax.convert import output_dir
from tide_jax.convert.hf_checkpoint import save_dense_as_hf

SAMPLER_FILE = "bd3lm.json"


def export_student(
    model,
    tokenizer,
    out_dir: str,
    *,
    block_size: int,
    mask_token_id: int,
    schedule: str = "linear",
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> str:
  """Writes the student, its tokenizer and sampler settings to ``out_dir``.

  The export is assembled in a temporary sibling directory and renamed at the end, so an
  interrupted export never leaves a half-written model. A non-empty ``out_dir`` is refused
  unless ``overwrite``; with it, only a directory that holds nothing but a previous export's
  files is replaced, so nothing the export did not write is ever removed. Files and
  directories follow the process umask.

  Args:
    model: a :class:`tide_jax.models.dense.DenseDecoder` (parameters are written in their
      stored dtype, ``model.cfg.param_dtype``).
    tokenizer: the student's ``PreTrainedTokenizerFast``; its ids must fit the model's vocabulary.
    out_dir: local target directory.
    block_size, mask_token_id, schedule: the student's BD3LM settings (written to bd3lm.json).
    overwrite: replace a previous export in ``out_dir``.

  Returns:
    The absolute path of the export.
  """
  vocab = model.cfg.vocab_size
  if len(tokenizer) > vocab:
    raise ValueError(
        f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
        f"{vocab}; export the student with the tokenizer it was trained with."
    )
  if not 0 <= mask_token_id < vocab:
    raise ValueError(f"mask_token_id {mask_token_id} is outside the model's vocabulary of {vocab}.")
  if tokenizer.eos_token_id is None:
    raise ValueError("The tokenizer defines no eos_token; set one before exporting.")
  out_dir = os.path.abspath(out_dir)
  output_dir.check_target(out_dir, overwrite=overwrite)
  staging = output_dir.make_staging(out_dir)
  try:
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    generation = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad_id}
    sampler_settings = {
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "schedule": schedule,
        "eos_token_id": tokenizer.eos_token_id,
    }
    model_dir = os.path.join(staging, "model")
    save_dense_as_hf(
        model,
        model_dir,
        max_shard_bytes=max_shard_bytes,
        extra_files={
            "generation_config.json": json.dumps(generation, indent=2),
            SAMPLER_FILE: json.dumps(sampler_settings, indent=2),
        },
    )
    tokenizer.save_pretrained(model_dir)
    _set_special_ids(os.path.join(model_dir, "config.json"), generation)
    output_dir.publish(model_dir, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out_dir


def _set_special_ids(config_path: str, ids: dict) -> None:
  """Records the tokenizer's EOS / pad ids in config.json where the model config lacks them."""
  with open(config_path) as f:
    config = json.load(f)
  for name, value in ids.items():
    if config.get(name) is None:
      config[name] = value
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)


def read_sampler_settings(model_dir: str) -> dict:
  """The ``bd3lm.json`` settings of an exported student."""
  path = os.path.join(model_dir, SAMPLER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{model_dir} has no {SAMPLER_FILE}; it was not written by "
        "export_student, so pass block_size and mask_token_id explicitly."
    )
  with open(path) as f:
    return json.load(f)
