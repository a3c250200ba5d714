"""A tiny student, teacher and batch for the distillation plan and train-step tests.

Student vocabulary 46, teacher vocabularies 50 (shared tokenizer, cut to 38 columns) and
36 (cross tokenizer); lengths 16 / 20 with block 4; weights scaled up so logits are of
order 10, where numerical differences show.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import common
from tide_jax.distill import plan as plan_lib
from tide_jax.distill import recipes
from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig
from tide_jax.teachers import Teacher

B, LS, LT, BLOCK = 3, 16, 20, 4
VS, VT_POS, VT_CHUNK = 46, 50, 36
MASK_S, MASK_T = 45, 35
TOL = 1e-5


def decoder(vocab, seed, hidden=16):
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=vocab,
      hidden_size=hidden,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=8,
      intermediate_size=24,
      rope_theta=1e4,
      rms_norm_eps=1e-6,
      tie_word_embeddings=seed % 2 == 0,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
  )
  model = dense.build_decoder(cfg, seed=seed)
  # Larger weights than the init: logits of order 10, where errors would show.
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda p: p * 4.0, params)
  return cfg, graphdef, params


def make_batch(alignment, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VS - 2, (B, LS)).astype(np.int32)
  valid = np.ones((B, LS), bool)
  valid[2, 12:] = False
  maskable = valid.copy()
  maskable[0, :5] = False  # a prompt
  vt = VT_POS if alignment == "positions" else VT_CHUNK
  t_ids = rng.integers(0, vt - 2, (B, LT)).astype(np.int32)
  t_valid = np.ones((B, LT), bool)
  t_valid[2, 15:] = False
  t_maskable = t_valid.copy()
  t_maskable[0, :6] = False
  batch = {
      "input_ids": ids,
      "valid": valid,
      "maskable": maskable,
      "teacher_input_ids": t_ids,
      "teacher_valid": t_valid,
      "teacher_maskable": t_maskable,
  }
  if alignment == "positions":
    # Student position i pairs with teacher position i + 2 (the teacher's longer header).
    pair_s = np.tile(np.arange(LS, dtype=np.int32), (B, 1))
    pair_t = pair_s + 2
    pair_s[1, ::3] = -1  # some unpaired positions
    pair_t[1, ::3] = -1
    batch.update(pair_student=pair_s, pair_teacher=pair_t)
  else:
    s_chunk = np.full((B, LS), -1, np.int32)
    t_chunk = np.full((B, LT), -1, np.int32)
    for b in range(B):
      # Student tokens in chunks of 2, teacher tokens in chunks of 2 or 3 (other splits).
      s_chunk[b, :14] = np.arange(14) // 2
      t_chunk[b, : 7 * 2 + 3] = np.concatenate([np.arange(14) // 2, [6, 6, 6]])[:17]
    batch.update(student_chunk=s_chunk, teacher_chunk=t_chunk)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def distill_config(recipe, alignment, **custom):
  c = common.distill_config()
  c.recipe = recipe
  c.alignment = alignment
  c.max_chunks = 8
  c.chunk_temperature = 1.5
  c.tidal.timestep_weight = "midrange"
  if alignment == "positions":
    c.shared_vocab = 38
  for k, v in custom.items():
    c.custom[k] = v
  return c


def make_plan(recipe, alignment, vocab_tile=16384, **custom):
  vt = VT_POS if alignment == "positions" else VT_CHUNK
  tcfg, tgraph, tparams = decoder(vt, seed=7)
  builder = "bd3lm_x0_first" if alignment == "positions" else "bidirectional"
  teacher = Teacher("tiny", tcfg, tgraph, MASK_T, builder, BLOCK)
  validated = recipes.validate_distill_config(
      distill_config(recipe, alignment, **custom), student_vocab=VS, teacher_vocab=vt
  )
  objective = plan_lib.Objective(
      "bd3lm", "linear", 1e-3, MASK_S, BLOCK, row_block=5, vocab_tile=vocab_tile
  )
  return plan_lib.Plan(objective, validated, teacher if validated.uses_teacher else None), tparams
