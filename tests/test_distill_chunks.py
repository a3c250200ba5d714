"""Chunk-level objectives and chunk-consistent masking vs float64 NumPy (docs/method.md §3.1, §3.3)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.distill import chunks

# The clamp happens in float32, where 1 - 1e-7 rounds to 1 - 2**-23; the oracle uses the
# same representable bounds (log(1 - HI) is -15.9, not -16.1).
LO, HI = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))


def random_chunk_ids(rng, b, length, max_chunks, p_none=0.2):
  """Contiguous runs of chunk ids 0.. per example, some tokens in no chunk (-1)."""
  ids = np.full((b, length), -1, np.int32)
  for i in range(b):
    pos, chunk = 0, 0
    while pos < length and chunk < max_chunks:
      run = int(rng.integers(1, 4))
      if rng.random() >= p_none:
        ids[i, pos : pos + run] = chunk
        chunk += 1
      pos += run
  return ids


def np_chunk_sums(values, ids, max_chunks):
  out = np.zeros((ids.shape[0], max_chunks))
  for i in range(ids.shape[0]):
    for j in range(ids.shape[1]):
      if 0 <= ids[i, j] < max_chunks:
        out[i, ids[i, j]] += values[i, j]
  return out


def np_prob(log_p, T):
  return np.clip(np.exp(np.asarray(log_p, np.float64) / T), LO, HI)


def np_objective(name, s, q, lam=None):
  if name == "calm":
    return -(q * np.log(s) + (1 - q) * np.log(1 - s))
  if name == "reverse_calm":
    return -(s * np.log(q) + (1 - s) * np.log(1 - q))
  if name == "reverse_binary_kl":
    return s * np.log(s / q) + (1 - s) * np.log((1 - s) / (1 - q))
  m = np.clip((1 - lam) * s + lam * q, LO, HI)
  return -(m * np.log(s) + (1 - m) * np.log(1 - s))


def test_chunk_sums_match_loops():
  rng = np.random.default_rng(0)
  ids = random_chunk_ids(rng, 3, 20, 6)
  ids[0, 0] = 9  # out of range: treated as no chunk
  values = rng.normal(size=(3, 20)).astype(np.float32)
  np.testing.assert_allclose(
      chunks.chunk_sums(values, ids, 6), np_chunk_sums(values, ids, 6), rtol=1e-6, atol=1e-6
  )
  with pytest.raises(ValueError, match="max_chunks"):
    chunks.check_chunk_ids(ids, 6)


@pytest.mark.parametrize("name", ["calm", "reverse_calm", "reverse_binary_kl", "chunk_tidal"])
def test_chunk_objectives_match_float64(name):
  rng = np.random.default_rng(1)
  b, ls, lt, c, T = 2, 16, 20, 8, 5.0
  s_ids, t_ids = random_chunk_ids(rng, b, ls, c), random_chunk_ids(rng, b, lt, c)
  # Token log-probs from extreme logits (|z| up to 50): some chunk probabilities clamp.
  s_logp = rng.uniform(-60, 0, (b, ls)).astype(np.float32) * (rng.random((b, ls)) < 0.5)
  t_logp = rng.uniform(-60, 0, (b, lt)).astype(np.float32) * (rng.random((b, lt)) < 0.5)
  s = chunks.chunk_probability(s_logp, s_ids, c, T)
  q = chunks.chunk_probability(t_logp, t_ids, c, T)
  s64 = np_prob(np_chunk_sums(s_logp, s_ids, c), T)
  q64 = np_prob(np_chunk_sums(t_logp, t_ids, c), T)
  np.testing.assert_allclose(s, s64, rtol=1e-5)
  masked = rng.random((b, ls)) < 0.5
  prompt = np.zeros((b, ls), bool)
  prompt[:, :2] = True
  active = chunks.active_chunks(masked, prompt, s_ids, t_ids, c)
  lam = np.array([[0.3], [0.7]], np.float32)
  weight = np.array([[0.5], [2.0]], np.float32)
  loss_sum, count = chunks.chunk_objective(name, s, q, active, lam=lam, weight=weight)
  active64 = (
      (np_chunk_sums(masked, s_ids, c) > 0)
      & ~(np_chunk_sums(prompt, s_ids, c) > 0)
      & (np_chunk_sums(np.ones((b, lt)), t_ids, c) > 0)
  )
  np.testing.assert_array_equal(active, active64)
  expected = (np_objective(name, s64, q64, lam) * weight * active64).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-4)
  assert count == active64.sum() and count > 0


@pytest.mark.parametrize("name", ["calm", "reverse_calm", "reverse_binary_kl", "chunk_tidal"])
def test_no_active_chunk_gives_exact_zero(name):
  s = jnp.full((2, 4), 0.5)
  q = jnp.full((2, 4), HI)
  active = jnp.zeros((2, 4), bool)
  fn = lambda s: chunks.chunk_objective(name, s, q, active, lam=jnp.full((2, 1), 0.4))[0]
  loss_sum, count = chunks.chunk_objective(name, s, q, active, lam=jnp.full((2, 1), 0.4))
  assert loss_sum == 0 and count == 0
  assert np.all(np.asarray(jax.grad(fn)(s)) == 0)


def test_reverse_calm_gradient_is_log_one_minus_q_over_q():
  rng = np.random.default_rng(2)
  s = rng.uniform(1e-3, 1 - 1e-3, (3, 7)).astype(np.float32)
  q = rng.uniform(1e-6, 1 - 1e-6, (3, 7)).astype(np.float32)
  active = jnp.ones((3, 7), bool)
  grad_s, grad_q = jax.grad(
      lambda a, b: chunks.chunk_objective("reverse_calm", a, b, active)[0], argnums=(0, 1)
  )(s, q)
  q64 = np.asarray(q, np.float64)
  np.testing.assert_allclose(grad_s, np.log((1 - q64) / q64), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(grad_q) == 0)
  # Bounded by the clamp: |d/ds| <= log((1 - 1e-7) / 1e-7) ~ 16.1 for any teacher.
  q_extreme = chunks.chunk_probability(jnp.array([[0.0, -500.0]]), jnp.array([[0, 1]]), 2, 1.0)
  g = jax.grad(lambda a: chunks.reverse_calm(a, q_extreme).sum())(jnp.array([[0.5, 0.5]]))
  np.testing.assert_allclose(g, [[np.log((1 - HI) / HI), np.log((1 - LO) / LO)]], rtol=1e-3)
  assert np.abs(np.asarray(g)).max() <= np.log((1 - LO) / LO) * (1 + 1e-6)


def test_calm_and_binary_kl_gradients():
  s = np.array([[0.2, 0.6]], np.float32)
  q = np.array([[0.7, 0.1]], np.float32)
  s64, q64 = s.astype(np.float64), q.astype(np.float64)
  g = jax.grad(lambda a: chunks.calm(a, q).sum())(s)
  np.testing.assert_allclose(g, -q64 / s64 + (1 - q64) / (1 - s64), rtol=1e-5)
  g = jax.grad(lambda a: chunks.reverse_binary_kl(a, q).sum())(s)
  np.testing.assert_allclose(g, np.log(s64 / q64) - np.log((1 - s64) / (1 - q64)), rtol=1e-5)
  # Chunk TIDAL's mixed target is a constant: d/ds = -m/s + (1 - m)/(1 - s).
  lam = 0.25
  m = (1 - lam) * s64 + lam * q64
  g = jax.grad(lambda a: chunks.chunk_tidal(a, q, lam).sum())(s)
  np.testing.assert_allclose(g, -m / s64 + (1 - m) / (1 - s64), rtol=1e-5)


def test_chunk_probability_gradient_flows_to_token_log_probs():
  ids = jnp.array([[0, 0, 1, -1]])
  logp = jnp.array([[-0.5, -0.25, -1.0, -3.0]])
  g = jax.grad(lambda x: chunks.chunk_probability(x, ids, 2, 2.0).sum())(logp)
  np.testing.assert_allclose(
      g, [[np.exp(-0.375) / 2, np.exp(-0.375) / 2, np.exp(-0.5) / 2, 0]], rtol=1e-6
  )


def test_consistent_masking_example():
  student_mask = np.array([[False, True, False, False, True, False]])
  s_ids = np.array([[0, 0, 1, 1, 2, -1]])
  t_ids = np.array([[0, 1, 1, 2, 2, 2, -1]])
  maskable = np.array([[True, True, True, True, True, True]])
  s_out, t_out = chunks.chunk_consistent_masks(student_mask, s_ids, t_ids, 4, maskable)
  np.testing.assert_array_equal(s_out, [[True, True, False, False, True, False]])
  np.testing.assert_array_equal(t_out, [[True, False, False, True, True, True, False]])
  # A chunk holding a prompt token is never masked.
  maskable[0, 0] = False
  s_out, t_out = chunks.chunk_consistent_masks(student_mask, s_ids, t_ids, 4, maskable)
  np.testing.assert_array_equal(s_out, [[False, False, False, False, True, False]])
  np.testing.assert_array_equal(t_out, [[False, False, False, True, True, True, False]])


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    ls=st.integers(1, 24),
    lt=st.integers(1, 30),
    rate=st.floats(0, 1),
    prompt=st.integers(0, 5),
)
def test_property_chunk_consistent_masking(seed, b, ls, lt, rate, prompt):
  rng = np.random.default_rng(seed)
  c = 10
  s_ids, t_ids = random_chunk_ids(rng, b, ls, c), random_chunk_ids(rng, b, lt, c)
  maskable = np.ones((b, ls), bool)
  maskable[:, :prompt] = False
  mask = (rng.random((b, ls)) < rate) & maskable
  s_out, t_out = map(np.asarray, chunks.chunk_consistent_masks(mask, s_ids, t_ids, c, maskable))
  for i in range(b):
    for chunk in range(c):
      s_sel, t_sel = s_ids[i] == chunk, t_ids[i] == chunk
      values = np.concatenate([s_out[i][s_sel], t_out[i][t_sel]])
      assert values.all() or not values.any()  # all or nothing across both sides
      if s_sel.any():
        touched = mask[i][s_sel].any() and maskable[i][s_sel].all()
        assert bool(values.any()) == bool(touched)
  assert not (s_out & ~maskable).any()  # prompts stay clean
  assert np.array_equal(s_out[s_ids < 0], mask[s_ids < 0])  # unchunked tokens unchanged
  assert not t_out[t_ids < 0].any()
