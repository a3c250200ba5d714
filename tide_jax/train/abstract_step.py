"""The train step compiled on abstract inputs: per-device memory and traffic before a run.

Nothing is allocated: the student's state, the teacher's parameters and the batch are
``ShapeDtypeStruct`` leaves carrying their shardings, and the step is built and compiled
by the same functions as ``loop.train_and_evaluate`` (``student_state_plan``,
``make_train_step``, ``_compile_train_step`` under ``jax.set_mesh``). On a CPU with fake
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) this gives the program
each of N devices would run: its compiled memory (``parallel.memory``) and its matmul work
and collective bytes (``parallel.hlo_counts``). The memory plan benchmark and the scaling
tests read the step this way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from tide_jax import configs_lib, teachers
from tide_jax.data import features
from tide_jax.distill import plan as plan_lib
from tide_jax.distill import recipes
from tide_jax.parallel import hlo_counts, memory, placement, sharding
from tide_jax.train import loop, optimizer, step as step_lib


@dataclasses.dataclass
class CompiledStep:
  """A compiled step and the abstract inputs it was compiled for.

  Attributes:
    compiled: the ``jax.stages.Compiled`` train step.
    state: the student's abstract train state (with shardings).
    teacher_params: the teacher's abstract parameters (with shardings), or None.
    batch: the abstract global batch.
  """

  compiled: Any
  state: Any
  teacher_params: Any
  batch: dict

  def memory(self) -> dict[str, int] | None:
    """Per-device compiled memory (``parallel.memory.memory_stats``)."""
    return memory.memory_stats(self.compiled)

  def counts(self) -> hlo_counts.HloCounts:
    """Per-device matmul FLOPs and collective bytes, loops times their trip counts."""
    return hlo_counts.count_hlo(self.compiled.as_text())

  def parameter_shapes(self) -> set[tuple[int, ...]]:
    """The shapes of every student and teacher parameter."""
    return {tuple(x.shape) for x in jax.tree.leaves((self.state.params, self.teacher_params))}


def abstract_batch(config, mesh, rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch a run of ``config`` feeds the step, as sharded ``ShapeDtypeStruct``."""
  d = config.data
  teacher_len = int(d.teacher_max_len or d.max_len) if d.teacher_tokenizer else 0
  shapes = features.Shapes(
      int(d.max_len),
      int(config.block_size),
      teacher_len,
      int(config.block_size),
      d.alignment if d.teacher_tokenizer else "",
      int(d.max_len),
      bool(d.packing),
  )
  rows = int(config.train.batch_size) if rows is None else rows
  out = {}
  for key, value in features.empty_row(shapes, 0, 0).items():
    shape = (rows,) + np.shape(value)
    row_sharding = sharding.batch_sharding(mesh, sharding.STUDENT_RULES, len(shape), rows)
    out[key] = jax.ShapeDtypeStruct(shape, np.asarray(value).dtype, sharding=row_sharding)
  return out


def compile_abstract_step(
    config, mesh, teacher_hf_config: Mapping[str, Any] | None = None
) -> CompiledStep:
  """Compiles the train step ``config`` describes on ``mesh`` without allocating anything.

  Args:
    config: a run config (``model.init_from`` is not read: the shape fields are).
    mesh: the target mesh (fake CPU devices stand in for accelerators).
    teacher_hf_config: the teacher's HF ``config.json`` as a dict when the recipe uses one.
  """
  model_cfg = configs_lib.student_model_config(config)
  tx, schedule = optimizer.make_optimizer(config.optim, int(config.train.num_steps))
  graphdef, abstract_state, state_sh = loop.student_state_plan(config, model_cfg, tx, mesh)
  state = placement.abstract_with_shardings(abstract_state, state_sh)
  teacher_vocab = None if teacher_hf_config is None else int(teacher_hf_config["vocab_size"])
  recipe = None
  if "distill" in config:
    recipe = recipes.validate_distill_config(
        config.distill, student_vocab=model_cfg.vocab_size, teacher_vocab=teacher_vocab
    )
  teacher, teacher_params = None, None
  if recipe is not None and recipe.uses_teacher:
    teacher, teacher_params = teachers.abstract_teacher(
        config.teacher, teacher_hf_config, mesh, block_size=int(config.block_size)
    )
  plan = plan_lib.Plan(plan_lib.Objective.from_config(config), recipe, teacher)
  step_fn = step_lib.make_train_step(
      graphdef,
      tx,
      schedule,
      plan,
      int(config.train.num_steps),
      int(config.train.microbatches),
      int(config.train.rng_offset),
  )
  batch = abstract_batch(config, mesh)
  compiled, _ = loop._compile_train_step(step_fn, state, state_sh, batch, teacher_params, mesh)
  return CompiledStep(compiled, state, teacher_params, batch)
