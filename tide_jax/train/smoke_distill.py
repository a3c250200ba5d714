"""The CPU smoke distillation: train a teacher, distill a student, compare with BD3LM.

Stages, each resumable (re-running the command continues where it stopped):
  1. ``<workdir>/teacher``: a larger bidirectional masked-diffusion (MDLM) teacher of the
     Qwen3 family trained on the same corpus with its own tokenizer, then written as an HF
     directory (``teacher/hf``) exactly like a downloaded teacher;
  2. ``<workdir>/student_<recipe>``: the student trained with the configured recipe
     (``tide_shared``, or ``tide_cross`` for the cross-tokenizer variant) against it;
  3. ``<workdir>/student_bd3lm``: the same student, same batches and steps, BD3LM only.
Finally the held-out masked-token loss of both students is printed side by side and
written to ``<workdir>/comparison.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
from flax import nnx
from ml_collections import config_dict

from tide_jax import configs_lib
from tide_jax.convert import hf_checkpoint
from tide_jax.distill import recipes
from tide_jax.train import loop


def _unlocked_copy(config, root: str | None = None) -> config_dict.ConfigDict:
  copy = config_dict.ConfigDict(config.copy_and_resolve_references())
  copy.unlock()
  if root is not None and not copy.data.cache_dir:
    # One prepared dataset per tokenizer setting, shared by the stages.
    copy.data.cache_dir = os.path.join(root, "data")
  return copy


def teacher_training_config(config, root: str | None = None) -> config_dict.ConfigDict:
  """The teacher stage: same corpus, the teacher's tokenizer/mask id/shape, MDLM objective."""
  t = _unlocked_copy(config, root)
  smoke = config.smoke
  for key, value in smoke.teacher_model.items():
    t.model[key] = value
  t.model.init_from = ""
  t.objective.kind = "mdlm"
  t.objective.mask_token_id = int(config.teacher.mask_token_id)
  t.data.tokenizer = config.data.teacher_tokenizer
  t.data.max_len = int(config.data.teacher_max_len)
  t.data.teacher_tokenizer = ""
  t.data.alignment = ""
  t.train.num_steps = int(smoke.teacher_steps)
  t.train.eval_every = int(smoke.teacher_steps)
  t.train.checkpoint_every = int(smoke.teacher_steps)
  t.optim.learning_rate = float(smoke.teacher_learning_rate)
  t.eval.bpb_during_training = False  # the bound is the BD3LM student's, not an MDLM's
  del t["distill"], t["teacher"], t["smoke"], t["runner"]
  return t


def student_config(
    config, recipe: str, teacher_hf_dir: str, teacher_ckpt: str, root: str | None = None
):
  s = _unlocked_copy(config, root)
  s.distill.recipe = recipe
  s.teacher.hf_dir = teacher_hf_dir
  s.teacher.checkpoint = teacher_ckpt
  del s["smoke"], s["runner"]
  return s


def _export_teacher(result: dict[str, Any], hf_dir: str) -> None:
  model = nnx.merge(result["graphdef"], result["state"].params)
  hf_checkpoint.save_dense_as_hf(model, hf_dir)


def run(config, workdir: str) -> dict[str, Any]:
  root = loop.absolute_workdir(workdir)
  recipe = config.distill.recipe
  # Fail on any bad setting of any stage now, not after the teacher has trained.
  configs_lib.validate(config)
  model_cfg = configs_lib.student_model_config(config)
  recipes.validate_distill_config(
      config.distill,
      student_vocab=model_cfg.vocab_size,
      teacher_vocab=int(config.smoke.teacher_model.vocab_size),
  )
  teacher_stage = teacher_training_config(config, root)
  configs_lib.validate(teacher_stage)
  configs_lib.student_model_config(teacher_stage)
  configs_lib.validate(student_config(config, "bd3lm", "", "", root))
  print(
      f"== smoke distillation ({config.smoke.variant}): teacher -> {recipe} student "
      f"vs bd3lm student, in {root}",
      flush=True,
  )

  teacher_dir = os.path.join(root, "teacher")
  teacher_hf = os.path.join(teacher_dir, "hf")
  teacher_ckpt = os.path.join(teacher_dir, "converted")
  print("== stage 1/3: teacher (bidirectional masked diffusion)", flush=True)
  teacher_result = loop.train_and_evaluate(teacher_training_config(config, root), teacher_dir)
  if not (epath.Path(teacher_hf) / "config.json").exists():
    _export_teacher(teacher_result, teacher_hf)
    print(f"teacher written as an HF directory: {teacher_hf}", flush=True)

  print(f"== stage 2/3: student with recipe {recipe}", flush=True)
  distilled = loop.train_and_evaluate(
      student_config(config, recipe, teacher_hf, teacher_ckpt, root),
      os.path.join(root, f"student_{recipe}"),
  )
  print("== stage 3/3: student with recipe bd3lm (baseline)", flush=True)
  baseline = loop.train_and_evaluate(
      student_config(config, "bd3lm", teacher_hf, teacher_ckpt, root),
      os.path.join(root, "student_bd3lm"),
  )

  comparison = {
      "variant": config.smoke.variant,
      "steps": int(config.train.num_steps),
      "teacher_eval_masked_nll": teacher_result["eval"]["masked_nll"],
      f"{recipe}_eval_masked_nll": distilled["eval"]["masked_nll"],
      "bd3lm_eval_masked_nll": baseline["eval"]["masked_nll"],
      f"{recipe}_eval_ce_loss": distilled["eval"]["ce_loss"],
      "bd3lm_eval_ce_loss": baseline["eval"]["ce_loss"],
  }
  epath.Path(root, "comparison.json").write_text(json.dumps(comparison, indent=2))
  width = max(len(recipe), len("bd3lm"))
  print("\nHeld-out masked-token loss of the student (nats per masked token, fixed noise):")
  print(f"  {'recipe':<{width}}  masked NLL  weighted CE")
  print(
      f"  {recipe:<{width}}  {distilled['eval']['masked_nll']:10.4f}  "
      f"{distilled['eval']['ce_loss']:11.4f}"
  )
  print(
      f"  {'bd3lm':<{width}}  {baseline['eval']['masked_nll']:10.4f}  "
      f"{baseline['eval']['ce_loss']:11.4f}"
  )
  print(
      f"  (teacher's own held-out masked NLL: {teacher_result['eval']['masked_nll']:.4f}, "
      "in its tokenizer)",
      flush=True,
  )
  return comparison
