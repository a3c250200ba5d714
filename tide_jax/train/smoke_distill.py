"""The CPU smoke distillation: train a teacher, distill a student, compare with BD3LM.

Stages, each resumable (re-running the command continues where it stopped):
  1. ``<workdir>/teacher``: a larger bidirectional masked-diffusion (MDLM) teacher of the
     Qwen3 family trained on the same corpus with its own tokenizer, then written as an HF
     directory (``teacher/hf``) exactly like a downloaded teacher;
  2. ``<workdir>/student_<recipe>``: the student trained with the configured recipe
     (``tide_shared``, or ``tide_cross`` for the cross-tokenizer variant) against it;
  3. ``<workdir>/student_bd3lm``: the same student, same batches and steps, BD3LM only.

With ``data.restrict_vocab`` the config is resolved once, before stage 1, so that the
three stages share one restricted vocabulary per tokenizer (``tide_jax/data/vocab.py``).
Finally each model's held-out bits per byte (``eval.bpb_files``, under its own bound: the
teacher's bidirectional MDLM bound, the students' BD3LM bound) and held-out masked-token
loss are printed side by side and written to ``<workdir>/comparison.json``.
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
from tide_jax.data import tokenizers, vocab
from tide_jax.distill import recipes
from tide_jax.eval import bpb
from tide_jax.train import loop, mdlm_teacher


def _unlocked_copy(config, root: str | None = None) -> config_dict.ConfigDict:
  copy = config_dict.ConfigDict(config.copy_and_resolve_references())
  copy.unlock()
  if root is not None and not copy.data.cache_dir:
    # One prepared dataset per tokenizer setting, shared by the stages.
    copy.data.cache_dir = os.path.join(root, "data")
  return copy


def teacher_training_config(config, root: str | None = None) -> config_dict.ConfigDict:
  """The teacher stage: same corpus, the teacher's tokenizer/mask id/shape, MDLM objective."""
  smoke = config.smoke
  t = mdlm_teacher.mdlm_teacher_config(
      _unlocked_copy(config, root),
      smoke.teacher_model,
      num_steps=smoke.teacher_steps,
      learning_rate=smoke.teacher_learning_rate,
  )
  t.train.eval_every = int(smoke.teacher_steps)
  t.train.checkpoint_every = int(smoke.teacher_steps)
  t.eval.bpb_during_training = False  # measured once at the end, under the MDLM bound
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


def held_out_bits_per_byte(model, stage_config) -> bpb.BpbResult:
  """Bits per byte of ``eval.bpb_files`` under the stage's own bound (``objective.kind``:
  ``mdlm`` for the teacher, ``bd3lm`` for a student), with the stage's tokenizer, window
  length and fixed noise (the same numbers on a resumed run)."""
  ev = stage_config.eval
  return bpb.bits_per_byte(
      model,
      tokenizers.get_tokenizer(stage_config.data.tokenizer),
      bpb.held_out_texts(stage_config, int(ev.bpb_max_texts)),
      block_size=int(stage_config.block_size),
      max_len=int(stage_config.data.max_len),
      mask_token_id=int(stage_config.objective.mask_token_id),
      grid=int(ev.bpb_grid),
      schedule=stage_config.objective.schedule,
      kind=stage_config.objective.kind,
  )


def _trained_model(result: dict[str, Any]) -> nnx.Module:
  return nnx.merge(result["graphdef"], result["state"].params)


def run(config, workdir: str) -> dict[str, Any]:
  root = loop.absolute_workdir(workdir)
  recipe = config.distill.recipe
  # Fail on any bad setting of any stage now, not after the teacher has trained.
  configs_lib.validate(config)
  model_cfg = configs_lib.student_model_config(config)
  teacher_stage = teacher_training_config(config, root)  # also for an already resolved config
  recipes.validate_distill_config(
      config.distill,
      student_vocab=model_cfg.vocab_size,
      teacher_vocab=int(teacher_stage.model.vocab_size),
  )
  configs_lib.validate(teacher_stage)
  configs_lib.validate(student_config(config, "bd3lm", "", "", root))
  # One restricted vocabulary per tokenizer for all three stages (a no-op when off).
  config = vocab.restricted_config(_unlocked_copy(config, root), root)
  teacher_stage = teacher_training_config(config, root)
  configs_lib.student_model_config(teacher_stage)
  print(
      f"== smoke distillation ({config.smoke.variant}): teacher -> {recipe} student "
      f"vs bd3lm student, in {root}",
      flush=True,
  )

  teacher_dir = os.path.join(root, "teacher")
  teacher_hf = os.path.join(teacher_dir, "hf")
  teacher_ckpt = os.path.join(teacher_dir, "converted")
  print("== stage 1/3: teacher (bidirectional masked diffusion)", flush=True)
  teacher_result = loop.train_and_evaluate(teacher_stage, teacher_dir)
  if not (epath.Path(teacher_hf) / "config.json").exists():
    _export_teacher(teacher_result, teacher_hf)
    print(f"teacher written as an HF directory: {teacher_hf}", flush=True)
  teacher_bpb = held_out_bits_per_byte(_trained_model(teacher_result), teacher_stage)

  print(f"== stage 2/3: student with recipe {recipe}", flush=True)
  distilled_stage = student_config(config, recipe, teacher_hf, teacher_ckpt, root)
  distilled = loop.train_and_evaluate(distilled_stage, os.path.join(root, f"student_{recipe}"))
  distilled_bpb = held_out_bits_per_byte(_trained_model(distilled), distilled_stage)
  print("== stage 3/3: student with recipe bd3lm (baseline)", flush=True)
  baseline_stage = student_config(config, "bd3lm", teacher_hf, teacher_ckpt, root)
  baseline = loop.train_and_evaluate(baseline_stage, os.path.join(root, "student_bd3lm"))
  baseline_bpb = held_out_bits_per_byte(_trained_model(baseline), baseline_stage)

  rows = [  # (model, bound, held-out bits per byte, final held-out eval)
      ("teacher", "mdlm", teacher_bpb, teacher_result["eval"]),
      (recipe, "bd3lm", distilled_bpb, distilled["eval"]),
      ("bd3lm", "bd3lm", baseline_bpb, baseline["eval"]),
  ]
  teacher_below = all(teacher_bpb.bits_per_byte < row[2].bits_per_byte for row in rows[1:])
  comparison = {
      "variant": config.smoke.variant,
      "steps": int(config.train.num_steps),
      "teacher_steps": int(config.smoke.teacher_steps),
      "bpb_files": list(config.eval.bpb_files),
      "bpb_bytes": teacher_bpb.num_bytes,
      "teacher_below_students": teacher_below,
  }
  for name, _, measured, ev in rows:
    comparison[f"{name}_bits_per_byte"] = measured.bits_per_byte
    comparison[f"{name}_eval_masked_nll"] = ev["masked_nll"]
    comparison[f"{name}_eval_ce_loss"] = ev["ce_loss"]
  epath.Path(root, "comparison.json").write_text(json.dumps(comparison, indent=2))
  width = max(len(recipe), len("teacher"))
  print(
      "\nHeld-out bits per byte and masked-token loss: bits per byte of "
      f"{', '.join(config.eval.bpb_files)} ({teacher_bpb.num_bytes:,} bytes) under each "
      "model's own bound; masked NLL and weighted CE in nats per masked token of the "
      "model's tokenizer (fixed noise):"
  )
  print(f"  {'model':<{width}}  bound  bits/byte  masked NLL  weighted CE")
  for name, bound, measured, ev in rows:
    print(
        f"  {name:<{width}}  {bound:<5}  {measured.bits_per_byte:9.4f}  "
        f"{ev['masked_nll']:10.4f}  {ev['ce_loss']:11.4f}"
    )
  print(
      f"  the teacher is {'below' if teacher_below else 'NOT below'} both students in bits "
      "per byte",
      flush=True,
  )
  return comparison
