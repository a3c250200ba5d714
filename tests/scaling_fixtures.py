"""The compiled train step at real vocabularies on meshes of fake devices, without data.

Everything is abstract (``ShapeDtypeStruct`` with shardings): the state, the batch and the
teacher are never allocated, so a step at a 151,936-row vocabulary compiles in seconds on
a laptop and its per-device program can be read (``memory_analysis``, HLO text). The
step is built and compiled exactly as ``train.loop`` does (``student_state_plan``,
``make_train_step``, ``_compile_train_step`` under ``jax.set_mesh``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from configs import common
from tests import teachers_fixtures
from tide_jax import configs_lib
from tide_jax.distill import plan as plan_lib
from tide_jax.distill import recipes
from tide_jax.models import config as mcfg
from tide_jax.models import dense, llada2
from tide_jax.parallel import placement, sharding
from tide_jax.teachers import Teacher
from tide_jax.train import loop, optimizer, step as step_lib

QWEN_VOCAB, LLAMA_VOCAB = 151936, 128256


@dataclasses.dataclass(frozen=True)
class Setup:
  """One recipe's shapes: student and teacher lengths, teacher kind and vocabulary."""

  recipe: str
  alignment: str
  teacher: str  # "qwen" (dense) or "llada2" (MoE)
  teacher_vocab: int
  builder: str


SETUPS = {
    "bd3lm": Setup("bd3lm", "positions", "", 0, ""),
    "tide_shared": Setup("tide_shared", "positions", "qwen", QWEN_VOCAB, "bd3lm_x0_first"),
    "tide_cross": Setup("tide_cross", "chunks", "qwen", LLAMA_VOCAB, "bidirectional"),
    "moe_tide_cross": Setup("tide_cross", "chunks", "llada2", QWEN_VOCAB + 64, "bidirectional"),
}


def step_config(setup: Setup, *, batch: int, length: int, row_block: int, microbatches: int = 1):
  c = common.base_config()
  c.block_size = 16
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers = QWEN_VOCAB, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size = 4, 2, 16, 128
  c.objective.row_block = row_block
  c.data.max_len = length
  c.train.batch_size = batch
  c.train.microbatches = microbatches
  c.distill = recipes.default_config()
  c.distill.recipe = setup.recipe
  c.distill.alignment = setup.alignment
  c.distill.max_chunks = length
  if setup.recipe != "bd3lm" and setup.teacher_vocab != QWEN_VOCAB and setup.alignment == "positions":
    c.distill.shared_vocab = QWEN_VOCAB
  return c


def _teacher(setup: Setup, mesh, block_size: int):
  if setup.teacher == "qwen":
    cfg = mcfg.decoder_config_from_hf(
        {
            "model_type": "qwen3",
            "vocab_size": setup.teacher_vocab,
            "hidden_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "intermediate_size": 256,
            "tie_word_embeddings": False,
        },
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    abstract = dense.abstract_decoder(cfg)
  else:
    hf = teachers_fixtures.tiny_llada2_config(
        vocab_size=setup.teacher_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
    )
    cfg = llada2.llada2_config_from_hf(hf, param_dtype="bfloat16", dtype="bfloat16")
    cfg = cfg.replace(moe_dispatch="tiled", expert_mesh=mesh)
    abstract = llada2.abstract_llada2(cfg)
  graphdef, state = nnx.split(abstract)
  shardings = sharding.state_shardings(state, mesh, sharding.TEACHER_RULES)
  params = placement.abstract_with_shardings(state, shardings)
  teacher = Teacher("abstract", cfg, graphdef, cfg.vocab_size - 2, setup.builder, block_size)
  return teacher, params


def _batch(setup: Setup, batch: int, length: int, mesh) -> dict:
  spec = {
      "input_ids": jnp.int32,
      "valid": jnp.bool_,
      "maskable": jnp.bool_,
  }
  if setup.recipe != "bd3lm":
    spec.update(teacher_input_ids=jnp.int32, teacher_valid=jnp.bool_, teacher_maskable=jnp.bool_)
    if setup.alignment == "positions":
      spec.update(pair_student=jnp.int32, pair_teacher=jnp.int32)
    else:
      spec.update(student_chunk=jnp.int32, teacher_chunk=jnp.int32)
  shapes = {k: jax.ShapeDtypeStruct((batch, length), v) for k, v in spec.items()}
  shardings = placement.batch_shardings(shapes, mesh, sharding.STUDENT_RULES)
  return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[k]) for k, s in shapes.items()}


def compile_step(name: str, sizes: dict, *, batch: int, length: int, row_block: int = 64,
                 microbatches: int = 1):
  """The compiled train step of setup ``name`` on the mesh ``sizes`` (first devices)."""
  setup = SETUPS[name]
  devices = math.prod(sizes.values())
  mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
  config = step_config(setup, batch=batch, length=length, row_block=row_block,
                       microbatches=microbatches)
  model_cfg = configs_lib.student_model_config(config)
  tx, schedule = optimizer.make_optimizer(config.optim, 100)
  graphdef, abstract_state, state_sh = loop.student_state_plan(config, model_cfg, tx, mesh)
  state = placement.abstract_with_shardings(abstract_state, state_sh)
  recipe = recipes.validate_distill_config(
      config.distill, student_vocab=model_cfg.vocab_size,
      teacher_vocab=setup.teacher_vocab or None,
  )
  teacher, teacher_params = (None, None)
  if recipe.uses_teacher:
    teacher, teacher_params = _teacher(setup, mesh, int(config.block_size))
  plan = plan_lib.Plan(plan_lib.Objective.from_config(config), recipe, teacher)
  step_fn = step_lib.make_train_step(graphdef, tx, schedule, plan, 100, microbatches)
  compiled, _ = loop._compile_train_step(
      step_fn, state, state_sh, _batch(setup, batch, length, mesh), teacher_params, mesh
  )
  return compiled
