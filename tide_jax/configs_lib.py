"""Config-time checks and the student's model config.

Everything a user can get wrong in a config is caught here, before any file is written,
with one sentence naming the field and the fix.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from tide_jax import teachers
from tide_jax.convert.safetensors_io import SafetensorsCheckpoint
from tide_jax.diffusion import forward, masks, sampler, schedules
from tide_jax.distill import recipes, terms
from tide_jax.models import config as mcfg

# Learning-rate decays of train/optimizer.py (named here, below the train package, so the
# checks need nothing from it).
LR_DECAYS = ("cosine", "linear", "constant")

# Fields that changed names, with their new names (refused with one sentence).
RENAMED = {
    "objective.loss_chunk": "objective.row_block",
    "distill.chunk_size": "objective.row_block",
}


def _enumerations(config) -> list[tuple[str, tuple[Any, ...]]]:
  """(field, allowed values) of every enumerated field the config has."""
  fields = [
      ("model.param_dtype", tuple(mcfg.DTYPES)),
      ("model.dtype", tuple(mcfg.DTYPES)),
      ("objective.kind", forward.OBJECTIVES),
      ("objective.schedule", schedules.SCHEDULES),
      ("optim.decay", LR_DECAYS),
      ("data.format", ("chat", "text")),
      ("sampler.order", sampler.ORDERS),
  ]
  if not config.model.init_from:  # otherwise config.json decides the architecture
    fields.append(("model.model_type", mcfg.DENSE_MODEL_TYPES))
  if config.data.teacher_tokenizer:
    fields.append(("data.alignment", recipes.ALIGNMENTS))
  if "distill" in config:
    fields += [
        ("distill.recipe", (*recipes.PRESETS, "custom")),
        ("distill.alignment", recipes.ALIGNMENTS),
        ("distill.tidal.growth", terms.GROWTHS),
        ("distill.tidal.axis", terms.AXES),
        ("distill.tidal.timestep_weight", terms.TIMESTEP_WEIGHTS),
        ("distill.compdemo.granularity", ("auto", "token", "chunk")),
        ("distill.custom.objective", (*recipes.TOKEN_OBJECTIVES, *recipes.CHUNK_OBJECTIVES)),
    ]
  if "teacher" in config:
    fields.append(("teacher.name", tuple(teachers.TEACHERS)))
  return fields


def _lookup(config, field: str) -> Any:
  for key in field.split("."):
    config = config[key]
  return config


def _number(config, field: str) -> float:
  value = _lookup(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{field}={value!r} is not a number; set it to a number.")
  return value


def _positive(x) -> bool:
  return x > 0


def _non_negative(x) -> bool:
  return x >= 0


def _fraction(x) -> bool:
  return 0 <= x <= 1


def _below_one(x) -> bool:
  return 0 <= x < 1


# field -> (condition, what it must be)
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "block_size": (_positive, "a positive integer (32 in the paper)"),
    "data.max_len": (_positive, "a positive multiple of block_size"),
    "objective.t_eps": (_below_one, "in [0, 1)"),
    "objective.mask_token_id": (_non_negative, "a token id (>= 0)"),
    "objective.row_block": (_positive, "a positive number of rows (256 is a good default)"),
    "objective.vocab_tile": (_positive, "a positive number of vocabulary columns"),
    "optim.learning_rate": (_positive, "positive (the paper uses 5e-5)"),
    "optim.warmup_steps": (_non_negative, "zero or more steps"),
    "optim.lr_end_fraction": (_fraction, "in [0, 1]"),
    "optim.b1": (_below_one, "in [0, 1)"),
    "optim.b2": (_below_one, "in [0, 1)"),
    "optim.eps": (_positive, "positive"),
    "optim.weight_decay": (_non_negative, "zero or positive"),
    "optim.grad_clip": (_positive, "a positive global-norm bound"),
    "train.num_steps": (_positive, "positive"),
    "train.batch_size": (_positive, "positive"),
    "train.microbatches": (_positive, "at least 1"),
    "train.log_every": (_positive, "positive"),
    "train.checkpoint_every": (_positive, "positive"),
    "train.keep_checkpoints": (_positive, "at least 1"),
    "train.eval_every": (_non_negative, "zero (no periodic eval) or positive"),
    "train.eval_batches": (_non_negative, "zero or positive"),
    "train.epochs": (_non_negative, "zero (use train.num_steps) or positive"),
    "train.stop_at_step": (_non_negative, "zero (no early stop) or a step"),
    "train.preemption_check_every": (_positive, "positive"),
    "train.rng_offset": (_non_negative, "zero or a positive integer"),
    "train.workdir_lock_stale_s": (_positive, "a positive number of seconds"),
    "sampler.max_new_tokens": (_positive, "positive"),
    "sampler.temperature": (_non_negative, "zero (greedy) or positive"),
    "sampler.context_len": (_positive, "positive"),
    "eval.bpb_max_texts": (_positive, "positive"),
    "eval.bpb_grid": (_positive, "positive"),
    "eval.humaneval_samples": (_positive, "positive"),
}


def validate(config) -> None:
  """Raises ValueError for inconsistent settings (see the individual messages).

  Runs before anything is prepared or written: every enumerated field must hold one of its
  values and every numeric field lie in its range, each error one sentence naming the field.
  """
  for old, new in RENAMED.items():
    section, name = old.split(".")
    if section in config and name in config[section]:
      raise ValueError(f"{old} was renamed {new}; set {new} instead.")
  for field, allowed in _enumerations(config):
    value = _lookup(config, field)
    if value not in allowed:
      raise ValueError(
          f"{field}={value!r} is not a known value; use one of {', '.join(map(str, allowed))}."
      )
  for field, (ok, what) in _RANGES.items():
    section, _, name = field.rpartition(".")
    if section and (section not in config or name not in config[section]):
      continue  # an optional field this config does not have
    value = _number(config, field)
    if not (math.isfinite(value) and ok(value)):
      raise ValueError(f"{field}={value} is out of range; it must be {what}.")
  block = int(config.block_size)
  max_len = int(config.data.max_len)
  if max_len % block:
    raise ValueError(
        f"data.max_len={max_len} is not a multiple of block_size={block}; set data.max_len "
        f"to a multiple of {block} (for example {-(-max_len // block) * block})."
    )
  masks.check_block_multiple(max_len, block)
  steps = int(config.sampler.steps_per_block)
  if not 1 <= steps <= block:
    raise ValueError(
        f"sampler.steps_per_block={steps} must lie in [1, block_size={block}] (one token per "
        f"step is {block})."
    )
  micro = int(config.train.microbatches)
  if int(config.train.batch_size) % micro:
    raise ValueError(
        f"train.microbatches={micro} does not divide train.batch_size="
        f"{config.train.batch_size}; use a divisor of the batch size."
    )
  if config.data.packing and (config.data.teacher_tokenizer or "teacher" in config):
    raise ValueError(
        "data.packing=True cannot be used with a teacher (data.teacher_tokenizer or a teacher "
        "section is set), since packed rows carry no teacher side; set data.packing=False to "
        "distill."
    )
  if config.data.restrict_vocab and config.model.init_from:
    raise ValueError(
        "data.restrict_vocab=True trains on the corpus's token ids from scratch, but "
        "model.init_from names a full-vocabulary checkpoint; set data.restrict_vocab=False "
        "to start from it."
    )
  if not 0 <= float(config.data.eval_fraction) < 1:
    raise ValueError(f"data.eval_fraction={config.data.eval_fraction} must lie in [0, 1).")
  _check_model_field("model.remat", config.model.remat, mcfg.remat_policy_name)
  _check_model_field("model.attention_impl", config.model.attention_impl, mcfg.check_attention_impl)
  if "teacher" in config:
    _check_model_field("teacher.remat", config.teacher.remat, mcfg.remat_policy_name)
    _check_model_field(
        "teacher.attention_impl", config.teacher.attention_impl, mcfg.check_attention_impl
    )


def _check_model_field(field: str, value, check) -> None:
  """Runs ``check(value)`` and names the config field in its error."""
  try:
    check(value)
  except ValueError as err:
    raise ValueError(f"{field}: {err}") from None


def student_model_config(config) -> mcfg.DecoderConfig:
  """The student's DecoderConfig: from ``model.init_from``'s config.json, else the fields."""
  m = config.model
  if m.init_from:
    hf = mcfg.read_hf_config(m.init_from)
    cfg = mcfg.decoder_config_from_hf(hf, param_dtype=m.param_dtype, dtype=m.dtype)
    # The weights' headers too (no tensor data): a truncated or corrupt file is reported
    # now, before the data is prepared, not when the weights are loaded.
    SafetensorsCheckpoint(m.init_from)
  else:
    cfg = mcfg.decoder_config_from_hf(
        {
            "model_type": m.model_type,
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "intermediate_size": m.intermediate_size,
            "rope_theta": m.rope_theta,
            "rms_norm_eps": m.rms_norm_eps,
            "tie_word_embeddings": m.tie_word_embeddings,
            "max_position_embeddings": m.max_position_embeddings,
        },
        param_dtype=m.param_dtype,
        dtype=m.dtype,
    )
  # remat: a policy name; the booleans of older configs are read as "full" / "none".
  cfg = cfg.replace(remat=m.remat, attention_impl=m.attention_impl)
  mask_id = int(config.objective.mask_token_id)
  if not 0 <= mask_id < cfg.vocab_size:
    raise ValueError(
        f"objective.mask_token_id={mask_id} is outside the student vocabulary of "
        f"{cfg.vocab_size} ids; pick an unused id below {cfg.vocab_size}."
    )
  return cfg
