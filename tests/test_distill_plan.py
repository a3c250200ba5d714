"""The distillation plan: fused objectives equal a materialised re-derivation.

For every recipe and both alignments, the plan's loss (student cross-entropy plus the
recipe's term, computed from hidden states and output kernels a block of rows at a time)
and its gradient with respect to every student parameter equal a straightforward
formulation written here from the full ``[b, L, V]`` logits of both models, within 1e-5
in float32. Also: the noise is drawn once and is chunk-consistent, the totals count what
the loss divides by, and no full-vocabulary array appears in the compiled step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.plan_fixtures import BLOCK, LS, MASK_S, TOL, VS, VT_POS, B, decoder, make_batch, make_plan
from tide_jax.diffusion import forward, schedules
from tide_jax.distill import compdemo, terms

# ----------------------------------------------------------------------------- reference


def reference_loss(plan, model, tparams, batch, noise, progress):
  """The loss from materialised float32 logits of both models (the formulas of docs/method.md §3)."""
  recipe = plan.recipe
  ids = batch["input_ids"]
  hidden = forward.denoiser_hidden(model, ids, noise.x_t, kind="bd3lm", block_size=BLOCK)
  zs = model.logits(hidden)  # [b, Ls, Vs]
  logp_all = jax.nn.log_softmax(zs, axis=-1)
  logp = jnp.take_along_axis(logp_all, ids[..., None], axis=-1)[..., 0]
  w_t = schedules.loss_weight(noise.t, "linear")[:, None]
  ce = -jnp.sum(w_t * noise.masked * logp) / jnp.sum(batch["maskable"])
  if not plan.distills:
    return ce
  teacher = plan.teacher
  hidden_t = plan.teacher_hidden(tparams, batch, noise)
  zt_all = teacher.model(tparams).logits(hidden_t)  # [P b, Lt, Vt]
  zt = zt_all if noise.in_a is None else compdemo.select_from_passes(zt_all, noise.in_a)
  progress = jnp.float32(progress)
  if recipe.alignment == "positions":
    pos = noise.alignment.teacher_pos
    zt_s = jnp.take_along_axis(zt, jnp.maximum(pos, 0)[..., None], axis=1)
    cut = recipe.shared_vocab
    a, b = zs[..., :cut] / recipe.temperature, zt_s[..., :cut] / recipe.temperature
    T2 = recipe.temperature**2
    ls, lt = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    if recipe.term == "tidal":
      lam = terms.tidal_lambda(progress, noise.t, recipe.tidal_options)[:, None, None]
      lr = jax.lax.stop_gradient(jax.nn.log_softmax((1 - lam) * a + lam * b, -1))
      per = T2 * jnp.sum(jnp.exp(lr) * (lr - ls), -1)
      per = per * terms.timestep_weight(noise.t, "midrange")[:, None]
    elif recipe.term == "forward_kl":
      per = T2 * jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    else:
      per = T2 * jnp.sum(jnp.exp(ls) * (ls - lt), -1)
    distilled = noise.masked & (pos >= 0)
    term = jnp.sum(jnp.where(distilled, per, 0.0)) / jnp.maximum(jnp.sum(distilled), 1)
    return ce + recipe.weight * term
  # Chunks: dense one-hot chunk membership (deliberately not the segment sums under test).
  c = recipe.max_chunks
  onehot_s = jax.nn.one_hot(noise.alignment.student, c)  # -1 -> all zeros
  onehot_t = jax.nn.one_hot(noise.alignment.teacher, c)
  t_targets = batch["teacher_input_ids"]
  logp_t = jnp.take_along_axis(jax.nn.log_softmax(zt, -1), t_targets[..., None], -1)[..., 0]
  temp = recipe.chunk_temperature
  s = jnp.clip(jnp.exp(jnp.einsum("bl,blc->bc", logp, onehot_s) / temp), 1e-7, 1 - 1e-7)
  q = jnp.clip(jnp.exp(jnp.einsum("bl,blc->bc", logp_t, onehot_t) / temp), 1e-7, 1 - 1e-7)
  q = jax.lax.stop_gradient(q)
  has = lambda flags, oh: jnp.einsum("bl,blc->bc", flags.astype(jnp.float32), oh) > 0
  prompt_s = batch["valid"] & ~batch["maskable"]
  prompt_t = batch["teacher_valid"] & ~batch["teacher_maskable"]
  active = (
      has(noise.masked, onehot_s)
      & ~has(prompt_s, onehot_s)
      & ~has(prompt_t, onehot_t)
      & has(jnp.ones_like(t_targets), onehot_t)
  )
  if recipe.tidal:
    lam = terms.tidal_lambda(progress, noise.t, recipe.tidal_options)[:, None]
    m = jax.lax.stop_gradient(jnp.clip((1 - lam) * s + lam * q, 1e-7, 1 - 1e-7))
    per = -(m * jnp.log(s) + (1 - m) * jnp.log1p(-s))
    per = per * terms.timestep_weight(noise.t, "midrange")[:, None]
  elif recipe.objective == "calm":
    per = -(q * jnp.log(s) + (1 - q) * jnp.log1p(-s))
  elif recipe.objective == "reverse_calm":
    per = -(s * jnp.log(q) + (1 - s) * jnp.log1p(-q))
  else:
    per = s * (jnp.log(s) - jnp.log(q)) + (1 - s) * (jnp.log1p(-s) - jnp.log1p(-q))
  term = jnp.sum(jnp.where(active, per, 0.0)) / jnp.maximum(jnp.sum(active), 1)
  return ce + recipe.weight * term


CASES = [
    ("bd3lm", "positions", {}),
    ("kl", "positions", {}),
    ("reverse_kl", "positions", {}),
    ("tide_shared", "positions", {}),
    ("tide_cross", "positions", {}),
    ("bd3lm", "chunks", {}),
    ("calm", "chunks", {}),
    ("tide_shared", "chunks", {}),
    ("tide_cross", "chunks", {}),
    ("custom", "chunks", dict(objective="reverse_binary_kl", compdemo=True)),
]


@pytest.mark.parametrize(
    "recipe,alignment,custom,vocab_tile",
    [(*case, 16384) for case in CASES]
    # Vocabulary tiles of 16 columns: 3 tiles over the 46 student columns (2 zero-filled).
    + [("tide_shared", "positions", {}, 16), ("tide_cross", "chunks", {}, 16)],
)
def test_fused_loss_and_gradients_equal_the_materialised_formulas(
    recipe, alignment, custom, vocab_tile
):
  plan, tparams = make_plan(recipe, alignment, vocab_tile, **custom)
  _, graphdef, params = decoder(VS, seed=1)
  batch = make_batch(alignment)
  noise = plan.draw(jax.random.key(3), batch)
  totals = plan.totals(batch, noise)
  progress = 0.3

  def fused_loss(p):
    parts = plan.loss_parts(nnx.merge(graphdef, p), tparams, batch, noise, progress)
    return plan.loss(parts, totals)

  def materialised(p):
    return reference_loss(plan, nnx.merge(graphdef, p), tparams, batch, noise, progress)

  value, grads = jax.jit(jax.value_and_grad(fused_loss))(params)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(materialised))(params)
  np.testing.assert_allclose(value, ref_value, rtol=TOL, atol=TOL)
  if plan.distills:
    parts = plan.loss_parts(nnx.merge(graphdef, params), tparams, batch, noise, progress)
    assert totals["distilled"] > 0 and abs(float(parts["distill_sum"])) > 1e-3
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, atol=TOL * max(scale, 1.0), rtol=TOL)


def test_chunk_noise_is_consistent_and_drawn_once():
  plan, _ = make_plan("tide_cross", "chunks")
  batch = make_batch("chunks")
  noise = plan.draw(jax.random.key(0), batch)
  again = plan.draw(jax.random.key(0), batch)
  for a, b in zip(jax.tree.leaves(noise), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  s_chunk, t_chunk = np.asarray(batch["student_chunk"]), np.asarray(batch["teacher_chunk"])
  masked, t_masked = np.asarray(noise.masked), np.asarray(noise.teacher_masked)
  for b in range(B):
    for c in range(7):
      on_s, on_t = masked[b, s_chunk[b] == c], t_masked[b, t_chunk[b] == c]
      assert on_s.all() or not on_s.any()
      assert (
          on_t.all() == on_s.all()
          or not np.asarray(batch["teacher_maskable"])[b, t_chunk[b] == c].all()
      )
  assert not masked[~np.asarray(batch["maskable"])].any()
  x_t = np.asarray(noise.x_t)
  assert (x_t[masked] == MASK_S).all() and (
      x_t[~masked] == np.asarray(batch["input_ids"])[~masked]
  ).all()


def test_totals_count_what_the_loss_divides_by():
  plan, tparams = make_plan("kl", "positions")
  batch = make_batch("positions")
  noise = plan.draw(jax.random.key(1), batch)
  totals = plan.totals(batch, noise)
  assert totals["maskable"] == np.asarray(batch["maskable"]).sum()
  assert totals["masked"] == np.asarray(noise.masked).sum()
  pos = np.asarray(noise.alignment.teacher_pos)
  assert totals["distilled"] == (np.asarray(noise.masked) & (pos >= 0)).sum()
  # Position i of a paired row reads teacher position i + 2.
  assert (pos[0] == np.arange(LS) + 2).all() and (pos[1, ::3] == -1).all()


def test_compdemo_teacher_call_is_one_interleaved_doubled_batch():
  plan, tparams = make_plan("tide_shared", "positions")
  batch = make_batch("positions")
  noise = plan.draw(jax.random.key(2), batch)
  hidden = plan.teacher_hidden(tparams, batch, noise)
  assert hidden.shape[0] == 2 * B
  # Sequence i's two passes sit at rows 2i (M_A revealed) and 2i + 1 (M_A masked).
  single = plan.teacher.prediction_hidden(
      tparams,
      batch["teacher_input_ids"][1:2],
      (noise.teacher_masked & ~noise.in_a)[1:2],
      batch["teacher_valid"][1:2],
  )
  np.testing.assert_allclose(hidden[2:3], single, atol=1e-5)


def test_compiled_step_holds_no_full_vocabulary_array():
  plan, tparams = make_plan("tide_shared", "positions")
  _, graphdef, params = decoder(VS, seed=1)
  batch = make_batch("positions")

  def loss(p):
    noise = plan.draw(jax.random.key(0), batch)
    parts = plan.loss_parts(nnx.merge(graphdef, p), tparams, batch, noise, 0.5)
    return plan.loss(parts, plan.totals(batch, noise))

  text = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
  shapes = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([0-9,]+)\]", text)}
  for vocab in (VS, VT_POS):
    wide = [s for s in shapes if len(s) >= 2 and s[-1] == vocab and np.prod(s[:-1]) > 5]
    # Only the [E, V] kernels and their gradients are vocabulary-wide.
    assert all(s[:-1] == (16,) for s in wide), wide


@pytest.mark.parametrize(
    "recipe,alignment", [("tide_shared", "positions"), ("tide_cross", "chunks")]
)
def test_nothing_distilled_gives_zero_without_nan(recipe, alignment):
  plan, tparams = make_plan(recipe, alignment)
  _, graphdef, params = decoder(VS, seed=1)
  batch = make_batch(alignment)
  batch["maskable"] = jnp.zeros_like(batch["maskable"])  # nothing can be masked

  def loss(p):
    noise = plan.draw(jax.random.key(0), batch)
    totals = plan.totals(batch, noise)
    parts = plan.loss_parts(nnx.merge(graphdef, p), tparams, batch, noise, 0.5)
    return plan.loss(parts, totals), plan.metrics(parts, totals)

  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert float(value) == 0.0 and float(metrics["distill/count"]) == 0.0
  assert float(metrics["distill/loss"]) == 0.0 and float(metrics["masked_nll"]) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
