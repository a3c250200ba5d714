"""``train_and_evaluate(config, workdir)``: the training loop behind the entrypoint.

Order of work, chosen so that a bad input fails before anything is written:
validate the config -> resolve the model shape -> refuse an incompatible checkpoint ->
build data -> build or load the model -> restore -> write the resolved config -> train.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from tide_jax import configs_lib
from tide_jax.data import pipeline
from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig
from tide_jax.train import checkpoint, metrics as metrics_lib, optimizer, step as step_lib


def _say(msg: str) -> None:
  """Progress for people: stdout, visible in terminals, notebooks and job logs."""
  print(msg, flush=True)


def absolute_workdir(workdir: str) -> str:
  """Local workdirs become absolute (orbax requires it); URLs such as gs:// stay as they are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def build_model(config, model_cfg: DecoderConfig) -> dense.DenseDecoder:
  """Random init from the config, or the weights of ``config.model.init_from``."""
  init_from = config.model.get("init_from", "")
  if init_from:
    from tide_jax.convert import hf_checkpoint
    _say(f"Loading student weights from {init_from}")
    return hf_checkpoint.load_dense_from_hf(init_from, param_dtype=model_cfg.param_dtype,
                                            dtype=model_cfg.dtype)
  return dense.build_decoder(model_cfg, seed=int(config.seed))


def evaluate(eval_step, params, eval_batches, seed: int) -> dict[str, float]:
  """Mean held-out metrics over fixed batches with fixed noise keys (reproducible)."""
  base = jax.random.key(seed + 1_000_003)
  totals: dict[str, float] = {}
  for i, batch in enumerate(eval_batches):
    out = jax.device_get(eval_step(params, batch, jax.random.fold_in(base, i)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {k: v / max(len(eval_batches), 1) for k, v in totals.items()}


def _check_resume(workdir: str, model_cfg: DecoderConfig) -> int | None:
  latest = checkpoint.find_latest_step(workdir)
  if latest is not None:
    saved = checkpoint.read_model_meta(workdir, latest)
    if saved is not None:
      checkpoint.check_same_model(workdir, saved, checkpoint.model_meta(model_cfg))
  return latest


def _teacher_hf_config(section) -> dict[str, Any]:
  """The teacher's HF config from its converted checkpoint or its HF directory (no weights)."""
  from tide_jax.convert import streaming
  from tide_jax.models import config as mcfg
  if section.checkpoint and (epath.Path(section.checkpoint) / streaming.MANIFEST).exists():
    return streaming.read_manifest(section.checkpoint)["hf_config"]
  if section.hf_dir:
    return mcfg.read_hf_config(section.hf_dir)
  raise ValueError("The recipe needs a teacher but neither teacher.checkpoint (a converted "
                   "teacher) nor teacher.hf_dir is set; set one of them.")


def _validate_distillation(config, model_cfg):
  """Validates ``config.distill`` against both vocabularies before anything is written.

  Returns the teacher section when the recipe needs a teacher, else None.
  """
  from tide_jax.distill import recipes
  if "distill" not in config:
    return None
  teacher_vocab = None
  needs_teacher = config.distill.recipe != "bd3lm"
  if needs_teacher:
    if "teacher" not in config:
      raise ValueError(f"Recipe {config.distill.recipe!r} needs a teacher section; add "
                       "config.teacher or use recipe 'bd3lm'.")
    teacher_vocab = int(_teacher_hf_config(config.teacher)["vocab_size"])
  recipes.validate_distill_config(config.distill, student_vocab=model_cfg.vocab_size,
                                  teacher_vocab=teacher_vocab)
  return config.teacher if needs_teacher else None


def _load_distillation(config, model_cfg, teacher_section):
  """Loads the frozen teacher and builds the step's distillation pieces."""
  from tide_jax.models import teachers
  from tide_jax.train import distillation
  if teacher_section is None:
    return None, None
  _say(f"Loading teacher {teacher_section.name!r} from "
       f"{teacher_section.checkpoint or teacher_section.hf_dir}")
  teacher = teachers.load_teacher(teacher_section)
  plan = distillation.make_distillation(
      config, model_cfg, teacher_graphdef=teacher.graphdef,
      teacher_vocab=teacher.config.vocab_size, teacher_mask_token_id=teacher.mask_token_id,
      teacher_input_builder=teacher.family.input_builder)
  return plan, teacher.params


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains the student described by ``config``; resumes from the latest checkpoint.

  Args:
    config: an ml_collections ConfigDict (see ``configs/smoke.py`` for every field). With a
      ``distill`` section whose recipe needs a teacher, the frozen teacher of
      ``config.teacher`` is loaded and its term added to the one train step.
    workdir: local directory or ``gs://`` URL for checkpoints, metrics and the config.

  Returns:
    A summary: final step, last train metrics and the final held-out evaluation.
  """
  workdir = absolute_workdir(workdir)
  configs_lib.validate(config)
  model_cfg = configs_lib.student_model_config(config)
  teacher_section = _validate_distillation(config, model_cfg)
  latest = _check_resume(workdir, model_cfg)

  num_steps = int(config.train.num_steps)
  batch_size = int(config.train.batch_size)
  train_iter = pipeline.make_iterator(
      config.data, split="train", batch_size=batch_size, seed=int(config.seed),
      process_index=jax.process_index(), process_count=jax.process_count(),
      workdir_cache=workdir)
  eval_iter = pipeline.make_iterator(
      config.data, split="eval", batch_size=batch_size, seed=0,
      process_index=jax.process_index(), process_count=jax.process_count(),
      workdir_cache=workdir)
  eval_batches = [next(eval_iter) for _ in range(int(config.train.eval_batches))]

  model = build_model(config, model_cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  del model
  tx, lr_schedule = optimizer.make_optimizer(config.optim, num_steps)
  state = step_lib.create_train_state(params, tx, int(config.seed))

  plan, teacher_params = _load_distillation(config, model_cfg, teacher_section)
  extra_loss = plan.extra_loss if plan is not None else None
  mask_fn = plan.mask_fn if plan is not None else None

  ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep_checkpoints),
                                 async_save=bool(config.train.get("async_checkpoint", False)))
  start_step = 0
  if latest is not None:
    state, data_state = ckpt.restore(latest, checkpoint.abstract_like(state))
    train_iter.set_state(data_state)
    start_step = int(state.step)
    _say(f"Resuming from checkpoint at step {start_step} in {workdir}")

  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step if latest is not None else None)

  step_fn = step_lib.make_train_step(graphdef, tx, lr_schedule, config, num_steps, extra_loss,
                                    mask_fn)
  train_step = jax.jit(step_fn, donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, config))
  meta = checkpoint.model_meta(model_cfg)
  log_every = int(config.train.log_every)
  eval_every = int(config.train.eval_every)
  ckpt_every = int(config.train.checkpoint_every)
  progress = metrics_lib.Progress(start_step, num_steps)
  tokens_per_step = batch_size * train_iter.seq_len
  history: list[dict[str, float]] = []
  if start_step == 0 and eval_every > 0:
    initial = evaluate(eval_step, state.params, eval_batches, int(config.seed))
    writer.write(0, initial, prefix="eval/")
    _say(f"step 0  eval masked_nll {initial['masked_nll']:.4f}")

  last_metrics: dict[str, float] = {}
  stop_at = int(config.train.get("stop_at_step", 0)) or num_steps
  for step in range(start_step + 1, min(stop_at, num_steps) + 1):
    batch = next(train_iter)
    state, step_metrics = train_step(state, batch, teacher_params)
    host = metrics_lib.to_python(jax.device_get(step_metrics))
    step_lib.check_finite(step, host)
    progress.add_tokens(tokens_per_step)
    last_metrics = host
    history.append({"step": step, **host})
    writer.write(step, host, prefix="train/")
    if step % log_every == 0 or step == num_steps:
      _say(progress.line(step, host["loss"]))
    if eval_every > 0 and (step % eval_every == 0 or step == num_steps):
      ev = evaluate(eval_step, state.params, eval_batches, int(config.seed))
      writer.write(step, ev, prefix="eval/")
      _say(f"step {step}  eval masked_nll {ev['masked_nll']:.4f}  ce_loss {ev['ce_loss']:.4f}")
    if step % ckpt_every == 0 or step in (num_steps, stop_at):
      ckpt.save(step, state, train_iter.get_state(), meta, force=True)

  ckpt.close()
  writer.close()
  final_eval = evaluate(eval_step, state.params, eval_batches, int(config.seed))
  summary = {"step": int(state.step), "train": last_metrics, "eval": final_eval,
             "train_step_compilations": step_fn.traces, "history": history}
  (wd / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                               if k != "history"}, indent=2))
  return {**summary, "state": state, "graphdef": graphdef}
