"""The student's diffusion loss (the plan without a recipe) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.diffusion import masks
from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig
from tide_jax.distill import plan as plan_lib


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def tiny_model():
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=40,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=8,
      intermediate_size=24,
      rope_theta=1e4,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
  )
  return dense.build_decoder(cfg, seed=3)


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
@pytest.mark.parametrize("row_block", [5, 256])
def test_diffusion_loss_matches_numpy(kind, row_block):
  model = tiny_model()
  b, length, block = 3, 8, 4
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 39, size=(b, length)).astype(np.int32)
  maskable = np.ones((b, length), bool)
  maskable[0, :3] = False  # a prompt
  valid = np.ones((b, length), bool)
  valid[2, 4:] = False  # padding
  maskable &= valid
  batch = {
      "input_ids": jnp.asarray(ids),
      "maskable": jnp.asarray(maskable),
      "valid": jnp.asarray(valid),
  }
  plan = plan_lib.Plan(plan_lib.Objective(kind, "linear", 1e-3, 39, block, row_block))
  noise = plan.draw(jax.random.key(0), batch)
  totals = plan.totals(batch, noise)
  metrics = plan.metrics(plan.loss_parts(model, None, batch, noise, 0.0), totals)
  x_t, masked, t = (np.asarray(a) for a in (noise.x_t, noise.masked, noise.t))
  assert not masked[~maskable].any()
  # Re-derive: logits from the full model call with the objective's own mask layout.
  pos = np.broadcast_to(np.arange(length), (b, length))
  if kind == "bd3lm":
    logits = np.asarray(
        model(
            jnp.concatenate([x_t, ids], 1),
            jnp.concatenate([pos, pos], 1),
            masks.bd3lm_attention_mask(length, block),
        )
    )[:, :length]
  else:
    logits = np.asarray(
        model(jnp.asarray(x_t), jnp.asarray(pos), masks.padding_attention_mask(valid))
    )
  logp = np_log_softmax(logits)[np.arange(b)[:, None], np.arange(length)[None], ids]
  weight = (1.0 / t.astype(np.float64))[:, None] * masked
  expected = -(weight * logp).sum() / maskable.sum()
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["ce_loss"]), expected, rtol=2e-5)
  expected_nll = -(logp * masked).sum() / max(masked.sum(), 1)
  np.testing.assert_allclose(float(metrics["masked_nll"]), expected_nll, rtol=2e-5)
  accuracy = (logits.argmax(-1) == ids)[masked].mean()
  np.testing.assert_allclose(float(metrics["masked_accuracy"]), accuracy, rtol=1e-6)
