"""BD3LM masks, schedules and noising against independent constructions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tide_jax.diffusion import masks, noising, schedules


def brute_force_bd3lm(length: int, block: int, x0_first: bool) -> np.ndarray:
  """Element-by-element construction from the three rules of docs/method.md §2."""
  out = np.zeros((2 * length, 2 * length), bool)
  for q in range(2 * length):
    for k in range(2 * length):
      q_half, k_half = q // length, k // length
      q_is_x0 = (q_half == 1) != x0_first
      k_is_x0 = (k_half == 1) != x0_first
      qb, kb = (q % length) // block, (k % length) // block
      if q_half == k_half and qb == kb:
        out[q, k] = True
      elif not q_is_x0 and k_is_x0 and qb > kb:
        out[q, k] = True
      elif q_is_x0 and k_is_x0 and qb >= kb:
        out[q, k] = True
  return out


@pytest.mark.parametrize("length,block", [(4, 1), (8, 2), (8, 4), (12, 4), (16, 8), (32, 32)])
@pytest.mark.parametrize("x0_first", [False, True])
def test_bd3lm_mask_matches_brute_force(length, block, x0_first):
  np.testing.assert_array_equal(
      masks.bd3lm_attention_mask(length, block, x0_first),
      brute_force_bd3lm(length, block, x0_first),
  )


@pytest.mark.parametrize("length,block", [(16, 4), (24, 8)])
def test_xt_queries_never_see_future_xt_or_own_clean_block(length, block):
  m = masks.bd3lm_attention_mask(length, block)
  for q in range(length):  # x_t half
    qb = q // block
    for k in range(length):  # x_t keys of later blocks: invisible
      if k // block > qb:
        assert not m[q, k]
    for k in range(length, 2 * length):  # x_0 keys of own or later blocks: invisible
      if (k - length) // block >= qb:
        assert not m[q, k]
      else:
        assert m[q, k]


def test_mask_rejects_non_multiple_lengths():
  with pytest.raises(ValueError, match="not a multiple of the block size 4"):
    masks.bd3lm_attention_mask(10, 4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_weight_matches_numeric_derivative(schedule):
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-6
  a = lambda x: float(schedules.alpha(jnp.float32(x), schedule))
  if schedule == "linear":
    expected = 1.0 / t
  else:
    alpha = 1 - np.cos(np.pi / 2 * (1 - t))
    d_alpha = -np.pi / 2 * np.sin(np.pi / 2 * (1 - t))
    expected = -d_alpha / (1 - alpha)
  np.testing.assert_allclose(
      np.asarray(schedules.loss_weight(jnp.asarray(t, jnp.float32), schedule)), expected, rtol=1e-5
  )
  np.testing.assert_allclose(a(0.0), 1.0, atol=1e-7)
  np.testing.assert_allclose(a(1.0), 0.0, atol=1e-7)


def test_sample_t_range():
  t = np.asarray(schedules.sample_t(jax.random.key(0), 10000, eps=1e-3))
  assert t.min() >= 1e-3 and t.max() < 1.0
  assert abs(t.mean() - (1 + 1e-3) / 2) < 0.01


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_noising_never_touches_prompt_or_padding(seed, t_value):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 50, size=(4, 32)).astype(np.int32)
  maskable = rng.random((4, 32)) < 0.6
  x_t, masked = noising.noise_tokens(
      jax.random.key(seed),
      jnp.asarray(ids),
      jnp.asarray(maskable),
      jnp.full((4,), t_value),
      mask_token_id=99,
  )
  x_t, masked = np.asarray(x_t), np.asarray(masked)
  np.testing.assert_array_equal(x_t[~maskable], ids[~maskable])
  assert not masked[~maskable].any()
  np.testing.assert_array_equal(x_t[masked], 99)
  np.testing.assert_array_equal(x_t[~masked], ids[~masked])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_empirical_mask_rate_matches_one_minus_alpha(schedule, t_value):
  n = 200_000
  ids = jnp.zeros((1, n), jnp.int32)
  _, masked = noising.noise_tokens(
      jax.random.key(7),
      ids,
      jnp.ones((1, n), bool),
      jnp.full((1,), t_value),
      mask_token_id=1,
      schedule=schedule,
  )
  expected = 1.0 - float(schedules.alpha(jnp.float32(t_value), schedule))
  # Binomial standard deviation sqrt(p(1-p)/n) <= 0.0012; allow 5 sigma.
  assert abs(float(np.mean(np.asarray(masked))) - expected) < 5 * np.sqrt(0.25 / n)


def test_pad_to_block_multiple():
  np.testing.assert_array_equal(noising.pad_to_block_multiple([1, 2, 3], 4, 9), [1, 2, 3, 9])
  np.testing.assert_array_equal(noising.pad_to_block_multiple([1, 2, 3, 4], 4, 9), [1, 2, 3, 4])
  assert len(noising.pad_to_block_multiple(list(range(33)), 32, 0)) == 64
