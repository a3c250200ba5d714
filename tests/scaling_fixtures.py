"""Tiny-depth configs at real vocabularies for compiling the train step on fake devices.

``compile_step`` goes through ``tide_jax.train.abstract_step`` (the loop's own compile
path, nothing allocated), so a step at a 151,936-row vocabulary compiles in seconds and
its per-device program can be read.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from configs import common
from tests import teachers_fixtures
from tide_jax.parallel import sharding
from tide_jax.train import abstract_step

QWEN_VOCAB, LLAMA_VOCAB = 151936, 128256


@dataclasses.dataclass(frozen=True)
class Setup:
  """One recipe's teacher: registered family, architecture and vocabulary."""

  recipe: str
  alignment: str
  teacher: str  # a key of tide_jax.teachers.TEACHERS, "" without teacher
  teacher_vocab: int


SETUPS = {
    "bd3lm": Setup("bd3lm", "positions", "", 0),
    # Pipeline B: WeDLM-style [x0 ; x_t] teacher, shared tokenizer, TIDAL + CompDemo.
    "tide_shared": Setup("tide_shared", "positions", "wedlm", QWEN_VOCAB),
    # Pipeline A with a dense teacher of another tokenizer: chunks, Reverse CALM.
    "tide_cross": Setup("tide_cross", "chunks", "qwen_bidirectional", LLAMA_VOCAB),
    # Pipeline A with an LLaDA2 MoE teacher.
    "moe_tide_cross": Setup("tide_cross", "chunks", "llada2", QWEN_VOCAB + 64),
}


def teacher_hf_config(setup: Setup) -> dict:
  if setup.teacher == "llada2":
    return teachers_fixtures.tiny_llada2_config(
        vocab_size=setup.teacher_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
    )
  return {
      "model_type": "qwen3",
      "vocab_size": setup.teacher_vocab,
      "hidden_size": 128,
      "num_hidden_layers": 1,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
      "head_dim": 32,
      "intermediate_size": 256,
      "rope_theta": 1e6,
      "rms_norm_eps": 1e-6,
      "tie_word_embeddings": False,
  }


def step_config(setup: Setup, *, batch: int, length: int, row_block: int, microbatches: int):
  c = common.base_config()
  c.block_size = 16
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers = QWEN_VOCAB, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size = 4, 2, 16, 128
  m.param_dtype, m.dtype = "float32", "bfloat16"
  c.objective.row_block = row_block
  c.data.max_len = length
  c.train.batch_size = batch
  c.train.microbatches = microbatches
  c.train.num_steps = 100
  if setup.recipe == "bd3lm":
    return c
  c.data.teacher_tokenizer = "qwen3"
  c.data.teacher_max_len = length
  c.data.alignment = setup.alignment
  c.distill = common.distill_config()
  c.distill.recipe = setup.recipe
  c.distill.alignment = setup.alignment
  c.distill.max_chunks = length
  c.teacher = common.teacher_config(setup.teacher, mask_token_id=setup.teacher_vocab - 2)
  return c


def compile_step(
    name: str, sizes: dict, *, batch: int, length: int, row_block: int = 64, microbatches: int = 1
) -> abstract_step.CompiledStep:
  """The train step of setup ``name`` compiled on the mesh ``sizes`` (the first devices)."""
  setup = SETUPS[name]
  mesh = sharding.make_mesh(sizes, jax.devices()[: math.prod(sizes.values())])
  config = step_config(
      setup, batch=batch, length=length, row_block=row_block, microbatches=microbatches
  )
  hf = teacher_hf_config(setup) if setup.teacher else None
  return abstract_step.compile_abstract_step(config, mesh, hf)
