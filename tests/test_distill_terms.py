"""Token-level terms from hidden states and kernels vs float64 NumPy (docs/method.md §3.1, §3.4).

The oracle multiplies hidden states by the kernel in float64 and evaluates each formula on
the full logits; the terms under test never materialise them (``distill/fused.py``).
"""

import math
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.distill import fused, terms

RTOL = 2e-5


# ----------------------------------------------------------------------------- float64 oracle


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_forward_kl(zs, zt, T):
  ls, lt = log_softmax64(zs / T), log_softmax64(zt / T)
  return T * T * (np.exp(lt) * (lt - ls)).sum(-1)


def np_reverse_kl(zs, zt, T):
  ls, lt = log_softmax64(zs / T), log_softmax64(zt / T)
  return T * T * (np.exp(ls) * (ls - lt)).sum(-1)


def np_jensen_shannon(zs, zt, T):
  ls, lt = log_softmax64(zs / T), log_softmax64(zt / T)
  lm = np.log((np.exp(ls) + np.exp(lt)) / 2)
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)
  return T * T * 0.5 * (kl(lt, lm) + kl(ls, lm))


def np_lambda(p, t, l0=0.1, l1=0.9, growth="cosine", axis="both"):
  g = (1 - math.cos(math.pi * p)) / 2 if growth == "cosine" else p
  lam_train = l0 + (l1 - l0) * g
  t = np.asarray(t, np.float64)
  if axis == "both":
    return lam_train * (1 - t)
  if axis == "training_only":
    return np.full_like(t, lam_train)
  return l1 * (1 - t)


def np_midrange(t):
  return np.exp(-((np.asarray(t, np.float64) - 0.5) ** 2) / (2 * 0.15**2))


def np_tidal(zs, zt, T, lam):
  lam = lam[:, None]
  lr = log_softmax64(((1 - lam) * zs + lam * zt) / T)
  ls = log_softmax64(zs / T)
  return T * T * (np.exp(lr) * (lr - ls)).sum(-1)


def np_tidal_grad(zs, zt, T, lam, w):
  """d/dzs of sum_i w_i T^2 KL(r_i || p_s_i) with r held constant: T w (p_s - r)."""
  lam = lam[:, None]
  r = np.exp(log_softmax64(((1 - lam) * zs + lam * zt) / T))
  ps = np.exp(log_softmax64(zs / T))
  return T * w[:, None] * (ps - r)


def random_case(seed, n=40, vs=64, vt=64, scale=50.0, width=8):
  """Hidden states and kernels whose logits spread over about ``[-scale, scale]``."""
  rng = np.random.default_rng(seed)
  hs = rng.normal(size=(n, width)).astype(np.float32)
  ws = (rng.normal(size=(width, vs)) * scale / np.sqrt(width)).astype(np.float32)
  ht = rng.normal(size=(n, width + 3)).astype(np.float32)
  wt = (rng.normal(size=(width + 3, vt)) * scale / np.sqrt(width + 3)).astype(np.float32)
  w = (rng.random(n) < 0.6).astype(np.float32)
  t = rng.uniform(1e-3, 1, n).astype(np.float32)
  return fused.Projection(hs, ws), fused.Projection(ht, wt), w, t


def logits64(p):
  return np.asarray(p.hidden, np.float64) @ np.asarray(p.kernel, np.float64)


def as64(x):
  return np.asarray(x, np.float64)


def chain_rule(p, g_logits):
  """(d/dhidden, d/dkernel) from d/dlogits ``[N, V]`` (float64)."""
  return g_logits @ as64(p.kernel).T, as64(p.hidden).T @ g_logits


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "name,oracle", [("forward_kl", np_forward_kl), ("reverse_kl", np_reverse_kl)]
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("block_rows", [7, 128])
def test_kl_terms_match_float64(name, oracle, temperature, block_rows):
  s, t, w, _ = random_case(1)
  fn = getattr(terms, name)
  loss_sum, count = jax.jit(
      lambda a, b, c: fn(a, b, c, temperature=temperature, block_rows=block_rows)
  )(s, t, w)
  expected = (w * oracle(logits64(s), logits64(t), temperature)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  assert count == w.sum()


def test_jensen_shannon_matches_float64_value_and_gradient():
  s, tp, w, _ = random_case(11, scale=6.0)
  T = 2.0
  term = lambda h, k: terms.token_term(
      "jensen_shannon", fused.Projection(h, k), tp, w, temperature=T, block_rows=7
  )[0]
  value, grads = jax.value_and_grad(term, argnums=(0, 1))(s.hidden, s.kernel)
  zs, zt = logits64(s), logits64(tp)
  np.testing.assert_allclose(value, (w * np_jensen_shannon(zs, zt, T)).sum(), rtol=RTOL)
  assert np.all(np_jensen_shannon(zs, zt, T) <= T * T * np.log(2) + 1e-9)
  # Finite differences of the float64 oracle in the logits, through the chain rule.
  eps, g_logits = 1e-6, np.zeros_like(zs)
  for j in range(zs.shape[1]):
    step = np.zeros_like(zs)
    step[:, j] = eps
    up = np_jensen_shannon(zs + step, zt, T)
    down = np_jensen_shannon(zs - step, zt, T)
    g_logits[:, j] = w * (up - down) / (2 * eps)
  for got, want in zip(grads, chain_rule(s, g_logits)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("axis", ["both", "training_only", "timestep_only"])
@pytest.mark.parametrize("weighting", ["midrange", "uniform"])
def test_tidal_matches_float64(axis, weighting):
  s, tp, w, t = random_case(2)
  options = terms.TidalOptions(axis=axis, timestep_weight=weighting, growth="linear")
  loss_sum, count = terms.tidal(
      s, tp, w, t=t, progress=0.37, options=options, temperature=2.0, block_rows=16
  )
  lam = np_lambda(0.37, t, growth="linear", axis=axis)
  tw = np_midrange(t) if weighting == "midrange" else np.ones_like(as64(t))
  expected = (w * tw * np_tidal(logits64(s), logits64(tp), 2.0, lam)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  assert count == (w > 0).sum()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tidal"])
def test_shared_vocab_cuts_both_logits_before_anything_else(name):
  # Unequal vocabularies (70 vs 90): every term, TIDAL's mixture included, is taken on the
  # first 60 columns of both; the student's columns beyond them get no gradient.
  s, tp, w, t = random_case(3, vs=70, vt=90)
  kwargs = dict(t=t, progress=0.4) if name == "tidal" else {}
  fn = getattr(terms, name)
  loss_sum, _ = fn(s, tp, w, shared_vocab=60, block_rows=9, **kwargs)
  zs, zt = logits64(s)[:, :60], logits64(tp)[:, :60]
  if name == "tidal":
    expected = (w * np_midrange(t) * np_tidal(zs, zt, 2.0, np_lambda(0.4, t))).sum()
  else:
    oracle = np_forward_kl if name == "forward_kl" else np_reverse_kl
    expected = (w * oracle(zs, zt, 2.0)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  grad_kernel = jax.grad(
      lambda k: fn(fused.Projection(s.hidden, k), tp, w, shared_vocab=60, **kwargs)[0]
  )(s.kernel)
  assert np.all(np.asarray(grad_kernel)[:, 60:] == 0)
  assert np.abs(np.asarray(grad_kernel)[:, :60]).max() > 1e-3


def test_mismatched_vocab_without_shared_vocab_is_refused():
  s, t, w, _ = random_case(3, vs=70, vt=90)
  with pytest.raises(ValueError, match="shared_vocab"):
    terms.forward_kl(s, t, w)
  with pytest.raises(ValueError, match="shared_vocab"):
    terms.reverse_kl(s, t, w, shared_vocab=80)


def test_teacher_rows_gather_the_paired_teacher_row():
  s, t, w, _ = random_case(4, n=24)
  rng = np.random.default_rng(0)
  big = fused.Projection(rng.normal(size=(31, t.hidden.shape[1])).astype(np.float32), t.kernel)
  rows = rng.integers(0, 31, 24).astype(np.int32)
  loss_sum, _ = terms.reverse_kl(s, big, w, teacher_rows=rows, block_rows=5)
  expected = (w * np_reverse_kl(logits64(s), logits64(big)[rows], 2.0)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_all_masked(fill):
  s, tp, _, t = random_case(5)
  w = np.full(s.hidden.shape[0], fill, np.float32)
  for fn, kw in (
      (terms.forward_kl, {}),
      (terms.reverse_kl, {}),
      (terms.tidal, dict(t=t, progress=0.5)),
  ):
    loss_sum, count = fn(s, tp, w, **kw)
    grad = jax.grad(lambda h: fn(fused.Projection(h, s.kernel), tp, w, **kw)[0])(s.hidden)
    value = terms.masked_mean(loss_sum, count)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    if fill == 0.0:
      assert value == 0.0 and count == 0 and np.all(np.asarray(grad) == 0)
    else:
      assert count == s.hidden.shape[0] and value > 0


def test_zero_positions():
  p = fused.Projection(np.zeros((0, 4), np.float32), np.zeros((4, 10), np.float32))
  loss_sum, count = terms.forward_kl(p, p, np.zeros((0,), np.float32))
  assert terms.masked_mean(loss_sum, count) == 0.0


def test_bfloat16_inputs_compute_in_float32():
  s, t, w, _ = random_case(6, scale=8.0)
  bs = fused.Projection(*(jnp.asarray(x, jnp.bfloat16) for x in s))
  bt = fused.Projection(*(jnp.asarray(x, jnp.bfloat16) for x in t))
  loss_sum, _ = terms.forward_kl(bs, bt, w)
  # The oracle sees the same bfloat16 inputs; products accumulate in float32 (as on TPU).
  expected = (w * np_forward_kl(logits64(bs), logits64(bt), 2.0)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-3)
  grad = jax.grad(lambda h: terms.forward_kl(fused.Projection(h, bs.kernel), bt, w)[0])(bs.hidden)
  assert grad.dtype == jnp.bfloat16 and grad.shape == bs.hidden.shape


# ----------------------------------------------------------------------------- gradients


def test_forward_and_reverse_kl_gradients_match_float64():
  s, tp, w, _ = random_case(7, scale=5.0)
  T = 2.0
  ps = np.exp(log_softmax64(logits64(s) / T))
  pt = np.exp(log_softmax64(logits64(tp) / T))
  grads = jax.grad(
      lambda h, k: terms.forward_kl(fused.Projection(h, k), tp, w, temperature=T, block_rows=6)[0],
      argnums=(0, 1),
  )(s.hidden, s.kernel)
  for got, want in zip(grads, chain_rule(s, T * w[:, None] * (ps - pt))):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # Reverse KL: d/dzs = T p_s (a - KL), a = log p_s - log p_t.
  a = np.log(ps) - np.log(pt)
  kl = (ps * a).sum(-1, keepdims=True)
  grads = jax.grad(
      lambda h, k: terms.reverse_kl(fused.Projection(h, k), tp, w, temperature=T, block_rows=6)[0],
      argnums=(0, 1),
  )(s.hidden, s.kernel)
  for got, want in zip(grads, chain_rule(s, T * w[:, None] * ps * (a - kl))):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_tidal_target_gets_no_gradient():
  s, tp, w, t = random_case(8, scale=4.0)
  T, progress = 2.0, 0.8
  options = terms.TidalOptions(timestep_weight="uniform")
  lam = np_lambda(progress, t)
  loss = lambda hs, ht, wt: terms.tidal(
      fused.Projection(hs, s.kernel),
      fused.Projection(ht, wt),
      w,
      t=t,
      progress=progress,
      options=options,
      temperature=T,
  )[0]
  grad_s, grad_ht, grad_wt = jax.grad(loss, argnums=(0, 1, 2))(s.hidden, tp.hidden, tp.kernel)
  zs, zt = logits64(s), logits64(tp)
  expected = np_tidal_grad(zs, zt, T, lam, as64(w))
  np.testing.assert_allclose(grad_s, chain_rule(s, expected)[0], atol=2e-5)
  assert np.all(np.asarray(grad_ht) == 0) and np.all(np.asarray(grad_wt) == 0)
  # Had r carried a gradient, d/dzs would differ by a clearly non-zero amount.
  mix = lambda z: ((1 - lam[:, None]) * z + lam[:, None] * zt) / T
  through_r = jax.grad(
      lambda z: jnp.sum(
          w
          * T
          * T
          * jnp.sum(
              jax.nn.softmax(mix(z)) * (jax.nn.log_softmax(mix(z)) - jax.nn.log_softmax(z / T)), -1
          )
      )
  )(jnp.asarray(zs, jnp.float32))
  assert np.abs(np.asarray(through_r) - expected).max() > 1e-3


def test_target_log_probs_value_and_gradient():
  s, _, _, _ = random_case(9, n=33, vs=80)
  rng = np.random.default_rng(9)
  x = rng.integers(0, 80, 33).astype(np.int32)
  value, correct = terms.target_log_probs(s, x, block_rows=8)
  ls = log_softmax64(logits64(s))
  np.testing.assert_allclose(value, ls[np.arange(33), x], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(correct, ls.argmax(-1) == x)
  grads = jax.grad(
      lambda h, k: terms.target_log_probs(fused.Projection(h, k), x, block_rows=8)[0].sum(),
      argnums=(0, 1),
  )(s.hidden, s.kernel)
  for got, want in zip(grads, chain_rule(s, np.eye(80)[x] - np.exp(ls))):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- lambda


@pytest.mark.parametrize("axis", ["both", "training_only", "timestep_only"])
@pytest.mark.parametrize("growth", ["cosine", "linear"])
def test_lambda_closed_forms(axis, growth):
  # Closed forms with l0 = 0.1, l1 = 0.9: g(0) = 0, g(.5) = .5, g(1) = 1 for both growths.
  t = np.array([0.1, 0.5, 0.9], np.float32)
  train_axis = {0.0: 0.1, 0.5: 0.5, 1.0: 0.9}
  options = terms.TidalOptions(axis=axis, growth=growth)
  for p, lam_train in train_axis.items():
    got = terms.tidal_lambda(p, t, options)
    if axis == "both":
      expected = lam_train * (1 - t)
    elif axis == "training_only":
      expected = np.full(3, lam_train)
    else:
      expected = 0.9 * (1 - t)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Between the anchors the two growths differ: cosine g(.25) = (1 - cos(pi/4)) / 2.
  if axis != "timestep_only":
    got = terms.tidal_lambda(0.25, np.float32(0.0), options)
    g = (1 - math.cos(math.pi / 4)) / 2 if growth == "cosine" else 0.25
    np.testing.assert_allclose(got, 0.1 + 0.8 * g, rtol=1e-6)


def test_timestep_weight():
  t = np.array([0.0, 0.35, 0.5, 0.8], np.float32)
  np.testing.assert_allclose(terms.timestep_weight(t, "midrange"), np_midrange(t), rtol=1e-6)
  np.testing.assert_array_equal(terms.timestep_weight(t, "uniform"), np.ones(4))
  with pytest.raises(ValueError, match="midrange or uniform"):
    terms.timestep_weight(t, "gaussian")
  with pytest.raises(ValueError, match="axis"):
    terms.TidalOptions(axis="diagonal")


def test_paired_rows_report_agreement_and_student_log_probs():
  eye = np.eye(3, dtype=np.float32)
  zs = np.array([[0, 5, 1], [3, 0, 0], [0, 0, 9]], np.float32)
  zt = np.array([[0, 7, 1], [0, 2, 0], [1, 0, 9]], np.float32)
  targets = np.array([1, 1, 2], np.int32)
  logp, _, agree = terms.paired_rows(
      "forward_kl", fused.Projection(zs, eye), fused.Projection(zt, eye), targets
  )
  np.testing.assert_array_equal(agree, [1, 0, 1])
  np.testing.assert_allclose(logp, log_softmax64(zs)[np.arange(3), targets], atol=1e-6)


# ----------------------------------------------------------------------------- property


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    n=st.integers(1, 30),
    vocab=st.integers(2, 40),
    block=st.integers(1, 40),
    scale=st.sampled_from([0.1, 5.0, 50.0]),
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_property_row_blocks_never_change_the_value(n, vocab, block, scale, seed, temperature):
  s, tp, _, _ = random_case(seed, n=n, vs=vocab, vt=vocab, scale=scale)
  rng = np.random.default_rng(seed)
  w = rng.random(n).astype(np.float32) * (rng.random(n) < 0.7)
  t = rng.uniform(1e-3, 1, n).astype(np.float32)
  kw = dict(temperature=temperature, block_rows=block)
  got_f, count = terms.forward_kl(s, tp, w, **kw)
  got_r, _ = terms.reverse_kl(s, tp, w, **kw)
  got_t, _ = terms.tidal(s, tp, w, t=t, progress=0.6, **kw)
  zs, zt = logits64(s), logits64(tp)
  atol = 1e-4 * max(1.0, scale)
  np.testing.assert_allclose(
      got_f, (w * np_forward_kl(zs, zt, temperature)).sum(), rtol=RTOL, atol=atol
  )
  np.testing.assert_allclose(
      got_r, (w * np_reverse_kl(zs, zt, temperature)).sum(), rtol=RTOL, atol=atol
  )
  lam = np_lambda(0.6, t)
  np.testing.assert_allclose(
      got_t,
      (w * np_midrange(t) * np_tidal(zs, zt, temperature, lam)).sum(),
      rtol=RTOL,
      atol=atol,
  )
  assert count == (w > 0).sum()


# ----------------------------------------------------------------------------- memory shape


def _compiled_float32_shapes(fn, *args):
  """Every float32 array shape in the optimised HLO XLA compiles for ``fn`` on this backend."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([0-9,]+)\]", text)}


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tidal", "target_log_probs"])
def test_value_and_grad_never_builds_a_positions_by_vocab_array(name):
  n, e, v, block = 512, 16, 300, 64
  hs = jnp.zeros((n, e), jnp.bfloat16)
  ws = jnp.zeros((e, v), jnp.bfloat16)
  tp = fused.Projection(jnp.zeros((n, e), jnp.bfloat16), jnp.zeros((e, v), jnp.bfloat16))
  w = jnp.ones((n,), jnp.float32)
  t = jnp.full((n,), 0.5, jnp.float32)
  rows = jnp.arange(n, dtype=jnp.int32)
  fns = {
      "forward_kl": lambda p: terms.forward_kl(p, tp, w, block_rows=block)[0],
      "reverse_kl": lambda p: terms.reverse_kl(p, tp, w, teacher_rows=rows, block_rows=block)[0],
      "tidal": lambda p: terms.tidal(p, tp, w, t=t, progress=0.5, block_rows=block)[0],
      "target_log_probs": lambda p: terms.target_log_probs(
          p, jnp.zeros((n,), jnp.int32), block_rows=block
      )[0].sum(),
  }
  loss = lambda h, k: fns[name](fused.Projection(h, k))
  shapes = _compiled_float32_shapes(jax.value_and_grad(loss, argnums=(0, 1)), hs, ws)
  assert any(s[-2:] == (block, v) for s in shapes)  # the per-block float32 work is there ...
  assert not any(len(s) >= 2 and s[-1] == v and np.prod(s[:-1]) > block for s in shapes), shapes
  # ... and the check does see a naive formulation's full-size array.
  naive = lambda h, k: jnp.sum(jax.nn.log_softmax((h @ k).astype(jnp.float32)) * w[:, None])
  assert (n, v) in _compiled_float32_shapes(jax.value_and_grad(naive, argnums=(0, 1)), hs, ws)


# ----------------------------------------------------------------------------- vocabulary tiles


@pytest.mark.parametrize("vocab,tile", [(64, 16), (70, 16), (67, 16), (64, 64)])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tidal", "jensen_shannon"])
def test_vocabulary_tiles_give_the_float64_gradients(vocab, tile, name):
  # 40 rows in blocks of 7 (several blocks: the tiled backward pass); tiles that divide
  # the vocabulary (64/16, 70 -> 5 x 14), one that does not (67: zero-filled columns).
  s, tp, w, t = random_case(12, vs=vocab, vt=vocab + 9, scale=8.0)
  cut = vocab - 3
  lam = np_lambda(0.3, t) if name == "tidal" else None
  zs, zt = logits64(s)[:, :cut], logits64(tp)[:, :cut]
  T = 2.0
  oracles = {
      "forward_kl": np_forward_kl,
      "reverse_kl": np_reverse_kl,
      "jensen_shannon": np_jensen_shannon,
      "tidal": lambda a, b, T: np_tidal(a, b, T, lam),
  }

  def loss(h, k):
    return terms.token_term(
        name,
        fused.Projection(h, k),
        tp,
        w,
        lam=None if lam is None else jnp.asarray(lam, jnp.float32),
        temperature=T,
        shared_vocab=cut,
        block_rows=7,
        vocab_tile=tile,
    )[0]

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(s.hidden, s.kernel)
  np.testing.assert_allclose(value, (w * oracles[name](zs, zt, T)).sum(), rtol=RTOL)
  # d/dlogits by central differences of the float64 oracle (TIDAL: its closed form, the
  # target r being constant), columns beyond the cut zero.
  eps, g_logits = 1e-6, np.zeros((zs.shape[0], vocab))
  if name == "tidal":
    g_logits[:, :cut] = np_tidal_grad(zs, zt, T, lam, as64(w))
  for j in range(cut if name != "tidal" else 0):
    step = np.zeros_like(zs)
    step[:, j] = eps
    g_logits[:, j] = (
        w * (oracles[name](zs + step, zt, T) - oracles[name](zs - step, zt, T)) / (2 * eps)
    )
  for got, want in zip(grads, chain_rule(s, g_logits)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("vocab,tile", [(64, 16), (67, 16)])
def test_vocabulary_tiles_give_the_cross_entropy_gradient(vocab, tile):
  s, _, _, _ = random_case(13, n=33, vs=vocab)
  x = np.random.default_rng(13).integers(0, vocab, 33).astype(np.int32)
  grads = jax.grad(
      lambda h, k: terms.target_log_probs(fused.Projection(h, k), x, block_rows=8, vocab_tile=tile)[
          0
      ].sum(),
      argnums=(0, 1),
  )(s.hidden, s.kernel)
  ls = log_softmax64(logits64(s))
  for got, want in zip(grads, chain_rule(s, np.eye(vocab)[x] - np.exp(ls))):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab,tile", [(64, 16), (67, 16), (67, 67)])
@pytest.mark.parametrize("block_rows", [8, 64])
def test_tile_by_tile_cross_entropy_values_and_argmax(vocab, tile, block_rows):
  # The cross-entropy's forward pass walks the vocabulary a tile at a time (running
  # log-sum-exp, target logit, argmax): values against float64 and the argmax against
  # numpy's, with ties planted across tiles (the earlier column wins, as in jnp.argmax)
  # and a maximum in the last, partly past-the-vocabulary tile.
  s, _, _, _ = random_case(14, n=33, vs=vocab, scale=8.0)
  kernel = np.array(s.kernel)
  # Columns 3, 20 and V - 1 (three tiles) all hold 100 x the hidden state's first entry, an
  # exact product: the rows where it is positive have a three-way tie for the maximum.
  for column in (3, 20, vocab - 1):
    kernel[:, column] = 0.0
    kernel[0, column] = 100.0
  s = fused.Projection(s.hidden, jnp.asarray(kernel))
  x = np.random.default_rng(14).integers(0, vocab, 33).astype(np.int32)
  x[:3] = [3, 20, vocab - 1]
  value, correct = terms.target_log_probs(s, x, block_rows=block_rows, vocab_tile=tile)
  ls = log_softmax64(logits64(s))
  np.testing.assert_allclose(value, ls[np.arange(33), x], rtol=1e-5, atol=1e-4)
  z = np.asarray(s.hidden, np.float32) @ kernel
  np.testing.assert_array_equal(correct, z.argmax(-1) == x)
  assert np.asarray(correct).sum() > 0  # some rows' argmax is column 3 and is the target


ORACLES = {
    "forward_kl": np_forward_kl,
    "reverse_kl": np_reverse_kl,
    "jensen_shannon": np_jensen_shannon,
}


@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("block_rows", [8, 64])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tidal", "jensen_shannon"])
def test_tile_by_tile_paired_rows_values_and_flags(name, block_rows, cut):
  # Every token term's forward walks the vocabulary a tile at a time (67 columns in five
  # tiles of 14, the last partly past the vocabulary; Jensen-Shannon twice): the
  # cross-entropy and the term against float64, the student's argmax over its whole
  # vocabulary and both models' argmax over the shared one against numpy's, with ties
  # planted across tiles and larger logits planted past the cut.
  vocab, tile = 67, 16
  s, tp, _, t = random_case(15, n=33, vs=vocab, vt=vocab + 9 if cut else vocab, scale=8.0)
  ws, wt = np.array(s.kernel), np.array(tp.kernel)
  for kernel in (ws, wt):  # a tie of columns 3 and 20 where the first hidden entry is > 0
    for column in (3, 20):
      kernel[:, column] = 0.0
      kernel[0, column] = 100.0
  shared = vocab - 3 if cut else None
  if cut:  # past the cut: the student's column V - 1 and the teacher's V + 4 are larger
    ws[:, vocab - 1], wt[:, vocab + 4] = 0.0, 0.0
    ws[0, vocab - 1], wt[0, vocab + 4] = 200.0, 300.0
  s, tp = fused.Projection(s.hidden, jnp.asarray(ws)), fused.Projection(tp.hidden, jnp.asarray(wt))
  x = np.random.default_rng(15).integers(0, vocab, 33).astype(np.int32)
  x[:4] = [3, 20, vocab - 1, 0]
  lam = np_lambda(0.3, t)
  row_kernel = terms.PairedRows(terms.make_token_term(name, 2.0), shared)
  extra = {"targets": jnp.asarray(x), "lam": jnp.asarray(lam, jnp.float32)}
  values, flags = fused.row_statistics(
      row_kernel, s, tp, extra=extra, block_rows=block_rows, vocab_tile=tile
  )
  zs, zt = logits64(s), logits64(tp)
  cs, ct = zs[:, : shared or vocab], zt[:, : shared or vocab]
  oracle = (lambda a, b, T: np_tidal(a, b, T, lam)) if name == "tidal" else ORACLES[name]
  np.testing.assert_allclose(
      values[:, 0], log_softmax64(zs)[np.arange(33), x], rtol=1e-5, atol=1e-4
  )
  np.testing.assert_allclose(values[:, 1], oracle(cs, ct, 2.0), rtol=1e-5, atol=1e-4)
  z32 = np.asarray(s.hidden) @ ws, np.asarray(tp.hidden) @ wt
  np.testing.assert_array_equal(flags[:, 0], z32[0].argmax(-1) == x)
  agree = z32[0][:, : shared or vocab].argmax(-1) == z32[1][:, : shared or vocab].argmax(-1)
  np.testing.assert_array_equal(flags[:, 1], agree)
  assert 0 < agree.sum() < 33  # planted ties agree, other rows do not all agree
  if cut:  # the student's full-vocabulary argmax is past the cut on some rows
    assert (z32[0].argmax(-1) == vocab - 1).any()


class _BlockOnlyForwardKL(terms._Term):
  """Forward KL as a new term's first version would be: no tile-by-tile forward."""

  def value(self, zs, zt, lam):
    return terms.ForwardKL(self.temperature).value(zs, zt, lam)

  def row_stats(self, zs, zt, lam):
    return terms.ForwardKL(self.temperature).row_stats(zs, zt, lam)

  def tile_grad(self, zs, zt, lam, stats):
    return terms.ForwardKL(self.temperature).tile_grad(zs, zt, lam, stats)


def test_a_term_without_a_tile_form_uses_the_block_form():
  s, tp, _, _ = random_case(16, n=33, vs=67, vt=67, scale=8.0)
  extra = {"targets": jnp.zeros((33,), jnp.int32), "lam": jnp.zeros((33,), jnp.float32)}
  block_only = terms.PairedRows(_BlockOnlyForwardKL(2.0))
  assert not block_only.tile_form and terms.PairedRows(terms.ForwardKL(2.0)).tile_form

  def loss(kernel, row_kernel):
    values, _ = fused.row_statistics(
        row_kernel, fused.Projection(s.hidden, kernel), tp, extra=extra, block_rows=8, vocab_tile=16
    )
    return values.sum()

  want = jax.value_and_grad(loss)(s.kernel, terms.PairedRows(terms.ForwardKL(2.0)))
  got = jax.value_and_grad(loss)(s.kernel, block_only)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_tile_counts_prefer_exact_divisors():
  assert fused.tile_count(151936, 16384) == (9496, 16)
  assert fused.tile_count(128256, 16384) == (16032, 8)
  assert fused.tile_count(157184, 16384) == (9824, 16)
  assert fused.tile_count(151936) == (2374, 64)  # the default: at most 4,096 columns
  assert fused.tile_count(128256) == (4008, 32)
  assert fused.tile_count(67, 16) == (14, 5)  # 67 is prime: 5 tiles of 14, 3 columns past
  assert fused.tile_count(1000, 16384) == (1000, 1)
