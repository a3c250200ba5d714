"""The config of a bidirectional masked-diffusion (MDLM) teacher trained here.

The smoke distillation and the replication study both train their teachers on the
distillation run's own corpus before distilling from them: same data and optimizer, the
teacher's tokenizer, length, mask id and shape, and the MDLM objective. One function builds
that config from the distillation config, so the two runners cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Mapping

from ml_collections import config_dict

from tide_jax.data import restricted, tokenizers

# Sections that describe the distillation (or a runner), not a training run of the teacher.
_DISTILL_ONLY = ("distill", "teacher", "smoke", "replicate", "runner")


def mdlm_teacher_config(
    config,
    shape: Mapping[str, Any],
    *,
    num_steps: int,
    learning_rate: float,
    batch_size: int | None = None,
) -> config_dict.ConfigDict:
  """Returns the run config that trains the teacher of a distillation config.

  Args:
    config: the distillation run's config (``data.teacher_tokenizer``,
      ``data.teacher_max_len`` and ``teacher.mask_token_id`` set; restricted vocabularies
      already resolved when ``data.restrict_vocab`` is on). Not modified.
    shape: model fields of the teacher (``hidden_size``, ``num_layers``, ...); fields not
      given keep the student's values.
    num_steps: training steps.
    learning_rate: peak learning rate (the schedule is the config's).
    batch_size: global batch; None keeps the config's.

  Returns:
    An unlocked config: the MDLM objective on the teacher's tokenizer, with the
    distillation-only sections removed. The embedding has exactly the restricted
    tokenizer's ids (the mask slot included) when the vocabulary is restricted, else
    ``shape["vocab_size"]`` or, without it, the tokenizer's ids and the mask slot.
  """
  t = config_dict.ConfigDict(config.copy_and_resolve_references())
  t.unlock()
  for key, value in shape.items():
    t.model[key] = value
  mask_id = int(config.teacher.mask_token_id)
  if restricted.is_restricted_folder(config.data.teacher_tokenizer):
    t.model.vocab_size = len(tokenizers.get_tokenizer(config.data.teacher_tokenizer))
  elif "vocab_size" not in shape:
    size = len(tokenizers.get_tokenizer(config.data.teacher_tokenizer))
    t.model.vocab_size = max(size, mask_id + 1)
  t.model.init_from = ""
  t.objective.kind = "mdlm"
  t.objective.mask_token_id = mask_id
  t.data.tokenizer = config.data.teacher_tokenizer
  t.data.max_len = int(config.data.teacher_max_len)
  t.data.teacher_tokenizer = ""
  t.data.alignment = ""
  t.train.num_steps = int(num_steps)
  if batch_size is not None:
    t.train.batch_size = int(batch_size)
  t.optim.learning_rate = float(learning_rate)
  for key in _DISTILL_ONLY:
    if key in t:
      del t[key]
  return t
