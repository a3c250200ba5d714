"""``model.remat`` / ``teacher.remat`` policies: same gradients, less kept for the backward pass.

Tolerance: float32 gradients within 1e-6 max-abs of the run without remat.

Memory is measured as the bytes the forward pass keeps for the backward pass (the
residuals held by ``jax.vjp``), which is what a policy decides, and, for "full", as the
per-layer growth of the temporaries the CPU compiler assigns to a compiled step: with
``jax.checkpoint`` alone that compiler schedules every recomputation ahead of the backward
pass and reports as much memory as without recomputation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from tests import teachers_fixtures
from tide_jax import configs_lib
from tide_jax.diffusion import masks
from tide_jax.models import dense, llada2
from tide_jax.models.config import REMAT_POLICIES, DecoderConfig

TOL = 1e-6


def student(remat, impl="xla", layers=3) -> dense.DenseDecoder:
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=64,
      hidden_size=32,
      num_layers=layers,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      intermediate_size=96,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
      remat=remat,
      attention_impl=impl,
  )
  return dense.build_decoder(cfg, seed=0)


def bd3lm_batch(vocab, length=32, block=8, b=2):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, vocab, (b, 2 * length)), jnp.int32)
  positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), (b, 2))
  return ids, positions, masks.bd3lm_attention_mask(length, block)


def loss_fn(model, batch):
  graphdef, params = nnx.split(model)
  ids, positions, mask = batch

  def loss(p):
    logits = nnx.merge(graphdef, p)(ids, positions, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  return loss, params


def grads(model, batch):
  loss, params = loss_fn(model, batch)
  return jax.jit(jax.value_and_grad(loss))(params)


def residual_bytes(model, batch) -> int:
  loss, params = loss_fn(model, batch)
  _, backward = jax.vjp(loss, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))


def test_every_policy_gives_the_same_gradients():
  batch = bd3lm_batch(64)
  ref_loss, ref_grads = grads(student("none"), batch)
  for policy in REMAT_POLICIES[1:]:
    got_loss, got_grads = grads(student(policy), batch)
    np.testing.assert_allclose(got_loss, ref_loss, atol=TOL, rtol=0)
    for g_got, g_ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g_got, g_ref, atol=TOL, rtol=0, err_msg=policy)


def test_llada2_teacher_policies_give_the_same_gradients():
  cfg = llada2.llada2_config_from_hf(teachers_fixtures.tiny_llada2_config(num_hidden_layers=2))
  cfg = cfg.replace(moe_dispatch="dense")  # differentiable (the ragged dispatch loops)
  batch = bd3lm_batch(cfg.vocab_size)
  results = {}
  for policy in ("none", "full", "save_attention"):
    model = llada2.LLaDA2Model(cfg.replace(remat=policy), rngs=nnx.Rngs(params=0))
    results[policy] = grads(model, batch)
  for policy in ("full", "save_attention"):
    np.testing.assert_allclose(results[policy][0], results["none"][0], atol=TOL, rtol=0)
    for g_got, g_ref in zip(
        jax.tree.leaves(results[policy][1]), jax.tree.leaves(results["none"][1])
    ):
      np.testing.assert_allclose(g_got, g_ref, atol=TOL, rtol=0, err_msg=policy)


def test_policies_keep_less_for_the_backward_pass():
  batch = bd3lm_batch(64, length=64, block=16)
  kept = {policy: residual_bytes(student(policy), batch) for policy in REMAT_POLICIES}
  # Without remat the attention probabilities and MLP activations of every layer stay
  # alive; "full" keeps each layer's inputs only.
  assert kept["full"] < 0.1 * kept["none"], kept
  for policy in ("dots_saveable", "dots_with_no_batch_dims_saveable", "save_attention"):
    assert kept["full"] < kept[policy] < kept["none"], (policy, kept)
  # Keeping every matmul includes the attention scores, which the projections-only policy
  # does not keep.
  assert kept["dots_with_no_batch_dims_saveable"] < kept["dots_saveable"], kept


def compiled_step_temporaries(model, batch) -> int:
  """Temporary bytes XLA's CPU compiler assigns to one jitted step: gradients and an
  AdamW update (the update makes the schedule a training step's)."""
  loss, params = loss_fn(model, batch)
  tx = optax.adamw(1e-3)

  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step).lower(params, tx.init(params)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_full_recomputation_is_not_scheduled_ahead_of_the_backward_pass():
  # With jax.checkpoint alone, the CPU compiler runs every layer's recomputation as soon as
  # the layer's input exists, so the compiled step grows per layer as much as without
  # recomputation. "full" ties the recomputation to the layer's cotangent: the step grows
  # by about the layer's input per layer (32 KiB here; an attention buffer is 1 MiB).
  batch = bd3lm_batch(64, length=128, block=16)
  growth = {}
  for policy in ("none", "full"):
    small, large = (compiled_step_temporaries(student(policy, layers=n), batch) for n in (2, 6))
    growth[policy] = (large - small) / 4
  assert growth["none"] > 1 << 20, growth
  assert growth["full"] < 0.1 * growth["none"], growth


def test_old_booleans_are_translated_and_unknown_names_refused():
  assert student(True).cfg.remat == "full"
  assert student(False).cfg.remat == "none"
  hf = teachers_fixtures.tiny_llada2_config()
  assert llada2.llada2_config_from_hf(hf).replace(remat=True).remat == "full"
  with pytest.raises(ValueError, match="Unknown remat policy 'sometimes'; use one of none, full"):
    student("sometimes")

  config = common.base_config()
  config.model.remat = True  # a config written for the old on/off field still loads
  assert configs_lib.student_model_config(config).remat == "full"
  config.model.remat = "dots_saveable"
  assert configs_lib.student_model_config(config).remat == "dots_saveable"
  config.model.remat = "everything"
  with pytest.raises(ValueError, match="model.remat: Unknown remat policy 'everything'"):
    configs_lib.validate(config)
  config.model.remat = "none"
  config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match="model.attention_impl: Unknown attention implementation"):
    configs_lib.validate(config)
  config.model.attention_impl = "blocked"
  assert configs_lib.student_model_config(config).attention_impl == "blocked"
