"""Config-time checks and the student's model config.

Everything a user can get wrong in a config is caught here, before any file is written,
with one sentence naming the field and the fix.
"""

from __future__ import annotations

from tide_jax.diffusion import masks, schedules
from tide_jax.models import config as mcfg
from tide_jax.train import objective


def validate(config) -> None:
  """Raises ValueError for inconsistent settings (see the individual messages)."""
  block = int(config.block_size)
  max_len = int(config.data.max_len)
  if max_len % block:
    raise ValueError(
        f"data.max_len={max_len} is not a multiple of block_size={block}; set data.max_len "
        f"to a multiple of {block} (for example {-(-max_len // block) * block})."
    )
  masks.check_block_multiple(max_len, block)
  if config.objective.kind not in objective.OBJECTIVES:
    raise ValueError(
        f"objective.kind={config.objective.kind!r} is unknown; choose one of "
        f"{', '.join(objective.OBJECTIVES)}."
    )
  schedules.check_schedule(config.objective.schedule)
  if not 0.0 <= float(config.objective.t_eps) < 1.0:
    raise ValueError(f"objective.t_eps={config.objective.t_eps} must lie in [0, 1).")
  for field in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config.train[field]) <= 0:
      raise ValueError(f"train.{field} must be positive, got {config.train[field]}.")
  mcfg.resolve_dtype(config.model.param_dtype)
  mcfg.resolve_dtype(config.model.dtype)
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
  if m.get("init_from", ""):
    hf = mcfg.read_hf_config(m.init_from)
    cfg = mcfg.decoder_config_from_hf(hf, param_dtype=m.param_dtype, dtype=m.dtype)
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
            "max_position_embeddings": m.get("max_position_embeddings", 32768),
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
