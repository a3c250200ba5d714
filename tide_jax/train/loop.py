"""``train_and_evaluate(config, workdir)``: the training loop behind the entrypoint.

Order of work, chosen so that a bad input fails before anything is written:
validate the config -> resolve the model shape and the mesh -> refuse an incompatible
checkpoint -> build data -> create the state sharded (or restore it onto the shardings,
whatever mesh wrote it) -> load the teacher sharded -> compile the step once -> train.

Every process of a multi-host run executes this same function (SPMD): each reads its own
share of the data, the global batch is assembled from the hosts' rows, and only process 0
writes metrics, the config and the summary (orbax coordinates the checkpoint writes).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from tide_jax import configs_lib, teachers
from tide_jax.convert import hf_checkpoint, streaming
from tide_jax.data import pipeline, vocab
from tide_jax.distill import plan as plan_lib
from tide_jax.distill import recipes
from tide_jax.eval import bpb
from tide_jax.models import config as mcfg
from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig
from tide_jax.parallel import host_data, memory, placement, preemption, sharding
from tide_jax.train import checkpoint, metrics as metrics_lib, optimizer, step as step_lib
from tide_jax.train import workdir_lock

Preempted = preemption.Preempted


def _say(msg: str) -> None:
  """Progress for people: stdout of process 0, visible in terminals, notebooks and job logs."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def absolute_workdir(workdir: str) -> str:
  """Local workdirs become absolute (orbax requires it); URLs such as gs:// stay as they are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def load_hf_params(config, model_cfg: DecoderConfig) -> nnx.State:
  """The parameters of the HF directory ``config.model.init_from`` (host memory)."""
  _say(f"Loading student weights from {config.model.init_from}")
  model = hf_checkpoint.load_dense_from_hf(
      config.model.init_from, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype
  )
  return nnx.split(model, nnx.Param)[1]


def student_state_plan(config, model_cfg: DecoderConfig, tx, mesh):
  """GraphDef, abstract train state and its shardings (STUDENT_RULES), nothing allocated."""
  seed = int(config.seed)
  graphdef, abstract_params = nnx.split(dense.abstract_decoder(model_cfg), nnx.Param)
  abstract_state = jax.eval_shape(
      lambda p: step_lib.create_train_state(p, tx, seed), abstract_params
  )
  shardings = sharding.state_shardings(abstract_state, mesh, sharding.STUDENT_RULES)
  return graphdef, abstract_state, shardings


def init_student_state(config, model_cfg: DecoderConfig, tx, shardings) -> step_lib.TrainState:
  """A fresh train state, every leaf created on its shards (random init or ``init_from``)."""
  seed = int(config.seed)
  if config.model.init_from:
    params = placement.put_sharded(load_hf_params(config, model_cfg), shardings.params)
    return jax.jit(lambda p: step_lib.create_train_state(p, tx, seed), out_shardings=shardings)(
        params
    )

  def create():
    params = nnx.split(dense.build_decoder(model_cfg, seed=seed), nnx.Param)[1]
    return step_lib.create_train_state(params, tx, seed)

  return placement.init_sharded(create, shardings)


def make_sharded_eval(graphdef, config, mesh, params_shardings, batch_shardings):
  """``eval_fn(params, batch, index) -> metrics`` jitted on the mesh; the noise key of batch
  ``index`` is ``fold_in(key(seed + 1_000_003), index)`` (fixed, reproducible)."""
  eval_step = step_lib.make_eval_step(
      graphdef, plan_lib.Plan(plan_lib.Objective.from_config(config))
  )
  base = jax.random.key(int(config.seed) + 1_000_003)

  def eval_fn(params, batch, index):
    return eval_step(params, batch, jax.random.fold_in(base, index))

  rep = sharding.replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings, rep), out_shardings=rep)


def evaluate(eval_fn, params, eval_batches, mesh) -> dict[str, float]:
  """Mean held-out metrics over fixed (global) batches with fixed noise keys."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(eval_batches):
    index = jax.device_put(np.int32(i), sharding.replicated(mesh))
    with jax.set_mesh(mesh):  # traced on the first call; see _compile_train_step
      out = jax.device_get(eval_fn(params, batch, index))
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


def _teacher_vocab(section) -> int:
  """The teacher's vocabulary size from its converted checkpoint or its HF directory."""
  if section.checkpoint and (epath.Path(section.checkpoint) / streaming.MANIFEST).exists():
    return int(streaming.read_manifest(section.checkpoint)["hf_config"]["vocab_size"])
  if section.hf_dir:
    return int(mcfg.read_hf_config(section.hf_dir)["vocab_size"])
  raise ValueError(
      "The recipe needs a teacher but neither teacher.checkpoint (a converted "
      "teacher) nor teacher.hf_dir is set; set one of them."
  )


def validate_recipe(config, model_cfg) -> recipes.Recipe | None:
  """``config.distill`` checked against both vocabularies, before anything is written.

  Returns the recipe, or None for a config without a ``distill`` section.
  """
  if "distill" not in config:
    return None
  teacher_vocab = None
  if config.distill.recipe != "bd3lm":
    if "teacher" not in config:
      raise ValueError(
          f"Recipe {config.distill.recipe!r} needs a teacher section; add "
          "config.teacher or use recipe 'bd3lm'."
      )
    teacher_vocab = _teacher_vocab(config.teacher)
  return recipes.validate_distill_config(
      config.distill, student_vocab=model_cfg.vocab_size, teacher_vocab=teacher_vocab
  )


def make_plan(config, recipe: recipes.Recipe | None, mesh) -> tuple[plan_lib.Plan, Any]:
  """The run's distillation plan and the teacher's parameters (None without a teacher).

  The frozen teacher is loaded sharded by TEACHER_RULES when the recipe uses one.
  """
  objective = plan_lib.Objective.from_config(config)
  if recipe is None or not recipe.uses_teacher:
    return plan_lib.Plan(objective, recipe), None
  section = config.teacher
  _say(f"Loading teacher {section.name!r} from {section.checkpoint or section.hf_dir}")
  teacher, params = teachers.load_teacher(
      section, mesh, sharding.TEACHER_RULES, block_size=int(config.block_size)
  )
  return plan_lib.Plan(objective, recipe, teacher), params


def _compile_train_step(step_fn, state, state_shardings, example_batch, teacher_params, mesh):
  """Jits the step once with explicit in/out shardings and donated state (AOT compiled).

  A ``Compiled`` object never retraces: a batch of another shape or sharding is an error
  instead of a silent second compilation.
  """
  batch_sh = placement.batch_shardings(example_batch, mesh, sharding.STUDENT_RULES)
  jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_sh, placement.shardings_of(teacher_params)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  # The mesh context lets sharding.constrain pin activation layouts inside the step.
  with jax.set_mesh(mesh):
    compiled = jitted.lower(state, example_batch, teacher_params).compile()
  return compiled, batch_sh


def resolve_num_steps(config, epoch_rows: int) -> int:
  """``train.num_steps``, or ``ceil(train.epochs * epoch rows / batch_size)`` when epochs > 0
  (an epoch's rows are the records plus the fill rows that make it a whole number of
  global batches)."""
  epochs = float(config.train.epochs)
  if epochs <= 0:
    return int(config.train.num_steps)
  return max(1, math.ceil(epochs * epoch_rows / int(config.train.batch_size)))


def _peek(iterator) -> dict[str, np.ndarray]:
  """The next batch without consuming it (shapes and keys for compilation)."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return batch


def _eval_line(ev: dict[str, float]) -> str:
  line = f"masked_nll {ev['masked_nll']:.4f}  ce_loss {ev['ce_loss']:.4f}"
  if "bits_per_byte" in ev:
    line += f"  bits/byte {ev['bits_per_byte']:.4f}"
  return line


def _acquire_lock(config, workdir: str):
  """The workdir's lock (``workdir_lock.acquire``) with the config's staleness rule."""
  return workdir_lock.acquire(
      workdir, stale_after_s=float(config.train.workdir_lock_stale_s), say=_say
  )


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains the student described by ``config``; resumes from the latest checkpoint.

  Args:
    config: an ml_collections ConfigDict (see ``configs/smoke.py`` for every field). With a
      ``distill`` section whose recipe needs a teacher, the frozen teacher of
      ``config.teacher`` is loaded and its term added to the one train step. ``config.mesh``
      gives the device mesh (``tide_jax.parallel.sharding.mesh_from_config``).
    workdir: local directory or ``gs://`` URL for checkpoints, metrics and the config.

  Returns:
    A summary: final step, last train metrics, the final held-out evaluation, the mesh,
    the step's compiled memory statistics, plus the final ``state`` and ``graphdef``.

  Raises:
    Preempted: after SIGTERM, once the checkpoint of the current step is written.
  """
  workdir = absolute_workdir(workdir)
  configs_lib.validate(config)  # a bad field fails before anything is written
  configs_lib.student_model_config(config)  # so does a bad model.init_from
  lock = None
  if config.data.restrict_vocab:
    # Building the restricted vocabulary writes files: one run per workdir comes first.
    lock = _acquire_lock(config, workdir)
  try:
    config = vocab.restricted_config(config, workdir)  # data.restrict_vocab, once per corpus
    configs_lib.validate(config)
    model_cfg = configs_lib.student_model_config(config)
    recipe = validate_recipe(config, model_cfg)
    batch_size = int(config.train.batch_size)
    mesh, mesh_notice = sharding.mesh_from_config(config.mesh, batch_size)
    process_index, process_count = jax.process_index(), jax.process_count()
    host_rows, batch_notice = sharding.check_batch_size(
        batch_size, mesh, sharding.STUDENT_RULES, process_count
    )
    latest = _check_resume(workdir, model_cfg)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  # One run per workdir, refused before the data is prepared or anything else written.
  lock = lock or _acquire_lock(config, workdir)
  primary = process_index == 0

  train_iter = pipeline.make_iterator(
      config.data,
      split="train",
      batch_size=host_rows,
      seed=int(config.seed),
      process_index=process_index,
      process_count=process_count,
      workdir_cache=workdir,
  )
  eval_iter = pipeline.make_iterator(
      config.data,
      split="eval",
      batch_size=host_rows,
      seed=0,
      process_index=process_index,
      process_count=process_count,
      workdir_cache=workdir,
  )
  num_steps = resolve_num_steps(config, train_iter.epoch_rows)
  to_global = host_data.make_global_batch_fn(mesh, sharding.STUDENT_RULES, process_count)
  eval_batches = [to_global(next(eval_iter)) for _ in range(int(config.train.eval_batches))]

  tx, lr_schedule = optimizer.make_optimizer(config.optim, num_steps)
  graphdef, abstract_state, state_sh = student_state_plan(config, model_cfg, tx, mesh)
  ckpt = checkpoint.Checkpointer(
      workdir,
      keep=int(config.train.keep_checkpoints),
      async_save=bool(config.train.async_checkpoint),
  )
  start_step = 0
  restored = None
  if latest is not None:  # a damaged newest step is reported and passed over
    restored = ckpt.restore_newest_intact(
        placement.abstract_with_shardings(abstract_state, state_sh),
        checkpoint.model_meta(model_cfg),
        _say,
    )
    latest = None if restored is None else restored[0]
  if restored is not None:
    _, state, data_state = restored
    train_iter.set_state(host_data.local_iterator_state(data_state, process_index, process_count))
    start_step = int(state.step)
    _say(f"Resuming from checkpoint at step {start_step} in {workdir}")
  else:
    state = init_student_state(config, model_cfg, tx, state_sh)

  plan, teacher_params = make_plan(config, recipe, mesh)

  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  if primary:
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricsWriter(
      workdir, resume_step=start_step if latest is not None else None, active=primary
  )

  step_fn = step_lib.make_train_step(
      graphdef,
      tx,
      lr_schedule,
      plan,
      num_steps,
      int(config.train.microbatches),
      int(config.train.rng_offset),
  )
  example = to_global(_peek(train_iter))
  train_step, batch_sh = _compile_train_step(
      step_fn, state, state_sh, example, teacher_params, mesh
  )
  del example
  mem = memory.memory_stats(train_step)
  _say(
      f"mesh {dict(mesh.shape)} over {mesh.size} devices, {process_count} process(es); "
      f"global batch {batch_size} ({host_rows} rows per host)"
  )
  for notice in (mesh_notice, batch_notice):
    if notice:
      _say(notice)
  _say(memory.describe(mem))
  eval_fn = make_sharded_eval(graphdef, config, mesh, state_sh.params, batch_sh)
  periodic_bpb = bpb.make_periodic_bpb(config, mesh)

  def held_out(params) -> dict[str, float]:
    out = evaluate(eval_fn, params, eval_batches, mesh)
    if periodic_bpb is not None:
      out["bits_per_byte"] = periodic_bpb(nnx.merge(graphdef, params))
    return out

  meta = checkpoint.model_meta(model_cfg)
  log_every = int(config.train.log_every)
  eval_every = int(config.train.eval_every)
  ckpt_every = int(config.train.checkpoint_every)
  progress = metrics_lib.Progress(start_step, num_steps)
  tokens_per_step = batch_size * train_iter.seq_len
  history: list[dict[str, float]] = []
  if start_step == 0 and eval_every > 0:
    initial = held_out(state.params)
    writer.write(0, initial, prefix="eval/")
    _say(f"step 0  eval {_eval_line(initial)}")

  def save(step: int) -> None:
    writer.flush()  # metrics up to this step are durable before the checkpoint claims it
    ckpt.save(
        step, state, host_data.gather_iterator_states(train_iter.get_state()), meta, force=True
    )
    _say(f"checkpoint of step {step} {'queued' if ckpt.async_save else 'written'}")
    guard.saved()  # the wall-clock cadence counts from here

  last_metrics: dict[str, float] = {}
  stop_at = int(config.train.stop_at_step) or num_steps
  check_every = int(config.train.preemption_check_every)
  save_every_s = 60.0 * float(config.train.checkpoint_every_minutes)
  with preemption.PreemptionGuard(check_every, save_every_s) as guard:
    for step in range(start_step + 1, min(stop_at, num_steps) + 1):
      local = next(train_iter)
      state, step_metrics = train_step(state, to_global(local), teacher_params)
      host = metrics_lib.to_python(jax.device_get(step_metrics))
      if len(train_iter.source_names) > 1:  # a mixture: rows of each source in this step
        rows = host_data.sum_over_hosts(train_iter.source_counts(local))
        host.update({f"rows/{name}": count for name, count in rows.items()})
      step_lib.check_finite(step, host)
      progress.add_tokens(tokens_per_step)
      last_metrics = host
      history.append({"step": step, **host})
      writer.write(step, host, prefix="train/")
      if step % log_every == 0 or step == num_steps:
        _say(progress.line(step, host["loss"]))
        writer.flush()
      if eval_every > 0 and (step % eval_every == 0 or step == num_steps):
        ev = held_out(state.params)
        writer.write(step, ev, prefix="eval/")
        _say(f"step {step}  eval {_eval_line(ev)}")
      stop, save_due = guard.poll(step)  # the same answers on every host
      if stop or save_due or step % ckpt_every == 0 or step in (num_steps, stop_at):
        save(step)
      if stop and step < min(stop_at, num_steps):
        ckpt.close()
        writer.close()
        _say(f"SIGTERM received: checkpoint of step {step} written; exiting.")
        lock.release()
        raise Preempted(step, workdir)

  ckpt.close()
  writer.close()
  final_eval = evaluate(eval_fn, state.params, eval_batches, mesh)
  summary = {
      "step": int(state.step),
      "train": last_metrics,
      "eval": final_eval,
      "train_step_compilations": step_fn.traces,
      "mesh": dict(mesh.shape),
      "process_count": process_count,
      "memory": mem,
      "history": history,
  }
  if primary:
    (wd / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2)
    )
  lock.release()
  return {**summary, "state": state, "graphdef": graphdef, "teacher_params": teacher_params}
