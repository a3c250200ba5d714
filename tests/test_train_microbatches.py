"""Gradient accumulation inside the step: k micro-batches give the full batch's update.

One AdamW step of the tiny student (tests/plan_fixtures.py) with ``microbatches`` = 1, 2 and
4 (and 3 on a batch of 6) from the same state: parameters, optimizer moments and every
metric agree within 1e-6 (float32). The noise is drawn once for the whole batch and each
micro-batch is normalised by the whole batch's totals, so the update cannot depend on k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.plan_fixtures import decoder, make_batch, make_plan, VS
from tide_jax.train import step as step_lib

TOL = 1e-6


def one_step(recipe, alignment, microbatches, batch):
  plan, tparams = make_plan(recipe, alignment)
  _, graphdef, params = decoder(VS, seed=1)
  tx = optax.adamw(1e-2)
  state = step_lib.create_train_state(params, tx, seed=0)
  step = step_lib.make_train_step(graphdef, tx, lambda s: 1e-2, plan, 10, microbatches)
  new_state, metrics = jax.jit(step)(state, batch, tparams)
  return new_state, metrics


def double(batch):
  return {k: jnp.concatenate([v, v[::-1]], axis=0) for k, v in batch.items()}


@pytest.mark.parametrize(
    "recipe,alignment", [("tide_shared", "positions"), ("tide_cross", "chunks")]
)
def test_micro_batched_update_equals_the_full_batch(recipe, alignment):
  batch = double(make_batch(alignment))  # 6 rows: splits into 1, 2, 3 micro-batches
  ref_state, ref_metrics = one_step(recipe, alignment, 1, batch)
  assert float(ref_metrics["distill/loss"]) > 0
  for k in (2, 3):
    state, metrics = one_step(recipe, alignment, k, batch)
    for key in ("loss", "ce_loss", "masked_nll", "distill/loss", "distill/agreement", "grad_norm"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=TOL, atol=TOL, err_msg=key)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(b, a, rtol=0, atol=TOL)
    for a, b in zip(jax.tree.leaves(ref_state.opt_state), jax.tree.leaves(state.opt_state)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=TOL)
  # The step really moved the parameters, far beyond the tolerance.
  _, _, start = decoder(VS, seed=1)
  moved = max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(ref_state.params))
  )
  assert moved > 1e-3


def test_micro_batches_must_divide_the_batch():
  batch = make_batch("positions")  # 3 rows
  with pytest.raises(ValueError, match="does not split into train.microbatches=2"):
    one_step("kl", "positions", 2, batch)
