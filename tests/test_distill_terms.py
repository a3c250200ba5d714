"""Token-level distillation terms vs float64 NumPy re-derivations (SPEC 3.1, 3.4)."""

import math
import os
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.distill import terms

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


def random_case(seed, n=40, vs=64, vt=64, scale=50.0):
  rng = np.random.default_rng(seed)
  zs = rng.uniform(-scale, scale, (n, vs)).astype(np.float32)
  zt = rng.uniform(-scale, scale, (n, vt)).astype(np.float32)
  w = (rng.random(n) < 0.6).astype(np.float32)
  t = rng.uniform(1e-3, 1, n).astype(np.float32)
  return zs, zt, w, t


def as64(x):
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "name,oracle", [("forward_kl", np_forward_kl), ("reverse_kl", np_reverse_kl)]
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [7, 128])
def test_kl_terms_match_float64(name, oracle, temperature, chunk_size):
  zs, zt, w, _ = random_case(1)
  fn = getattr(terms, name)
  loss_sum, count = jax.jit(
      lambda a, b, c: fn(a, b, c, temperature=temperature, chunk_size=chunk_size)
  )(zs, zt, w)
  expected = (w * oracle(as64(zs), as64(zt), temperature)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  assert count == w.sum()


@pytest.mark.parametrize("axis", ["both", "training_only", "timestep_only"])
@pytest.mark.parametrize("weighting", ["midrange", "uniform"])
def test_tidal_matches_float64(axis, weighting):
  zs, zt, w, t = random_case(2)
  options = terms.TidalOptions(axis=axis, timestep_weight=weighting, growth="linear")
  loss_sum, count = terms.tidal(
      zs, zt, w, t=t, progress=0.37, options=options, temperature=2.0, chunk_size=16
  )
  lam = np_lambda(0.37, t, growth="linear", axis=axis)
  tw = np_midrange(t) if weighting == "midrange" else np.ones_like(as64(t))
  expected = (w * tw * np_tidal(as64(zs), as64(zt), 2.0, lam)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  assert count == (w > 0).sum()


def test_shared_vocab_cuts_both_logits():
  zs, zt, w, t = random_case(3, vs=70, vt=90)
  loss_sum, _ = terms.forward_kl(zs, zt, w, shared_vocab=60, chunk_size=9)
  expected = (w * np_forward_kl(as64(zs[:, :60]), as64(zt[:, :60]), 2.0)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  grad = jax.grad(lambda z: terms.forward_kl(z, zt, w, shared_vocab=60)[0])(zs)
  assert np.all(np.asarray(grad)[:, 60:] == 0)


def test_mismatched_vocab_without_shared_vocab_is_refused():
  zs, zt, w, _ = random_case(3, vs=70, vt=90)
  with pytest.raises(ValueError, match="shared_vocab"):
    terms.forward_kl(zs, zt, w)
  with pytest.raises(ValueError, match="shared_vocab"):
    terms.reverse_kl(zs, zt, w, shared_vocab=80)


def test_teacher_rows_gather_the_paired_teacher_row():
  zs, zt, w, t = random_case(4, n=24)
  rng = np.random.default_rng(0)
  big_teacher = rng.uniform(-50, 50, (31, zt.shape[1])).astype(np.float32)
  rows = rng.integers(0, 31, 24).astype(np.int32)
  loss_sum, _ = terms.reverse_kl(zs, big_teacher, w, teacher_rows=rows, chunk_size=5)
  expected = (w * np_reverse_kl(as64(zs), as64(big_teacher[rows]), 2.0)).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_all_masked(fill):
  zs, zt, _, t = random_case(5)
  w = np.full(zs.shape[0], fill, np.float32)
  for fn, kw in (
      (terms.forward_kl, {}),
      (terms.reverse_kl, {}),
      (terms.tidal, dict(t=t, progress=0.5)),
  ):
    loss_sum, count = fn(zs, zt, w, **kw)
    grad = jax.grad(lambda z: fn(z, zt, w, **kw)[0])(zs)
    value = terms.masked_mean(loss_sum, count)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    if fill == 0.0:
      assert value == 0.0 and count == 0 and np.all(np.asarray(grad) == 0)
    else:
      assert count == zs.shape[0] and value > 0


def test_zero_positions():
  zs = np.zeros((0, 10), np.float32)
  loss_sum, count = terms.forward_kl(zs, zs, np.zeros((0,), np.float32))
  assert terms.masked_mean(loss_sum, count) == 0.0


def test_bfloat16_inputs_compute_in_float32():
  zs, zt, w, _ = random_case(6, scale=8.0)
  bs, bt = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  loss_sum, _ = terms.forward_kl(bs, bt, w)
  expected = (
      w * np_forward_kl(as64(np.asarray(bs, np.float32)), as64(np.asarray(bt, np.float32)), 2.0)
  ).sum()
  np.testing.assert_allclose(loss_sum, expected, rtol=RTOL)
  grad = jax.grad(lambda z: terms.forward_kl(z, bt, w)[0])(bs)
  assert grad.dtype == jnp.bfloat16 and grad.shape == bs.shape


# ----------------------------------------------------------------------------- gradients


def test_forward_and_reverse_kl_gradients_match_float64():
  zs, zt, w, _ = random_case(7, scale=5.0)
  T = 2.0
  ps = np.exp(log_softmax64(as64(zs) / T))
  pt = np.exp(log_softmax64(as64(zt) / T))
  grad = jax.grad(lambda z: terms.forward_kl(z, zt, w, temperature=T, chunk_size=6)[0])(zs)
  np.testing.assert_allclose(grad, T * w[:, None] * (ps - pt), atol=1e-6)
  # Reverse KL: d/dzs = T p_s (a - KL), a = log p_s - log p_t.
  a = np.log(ps) - np.log(pt)
  kl = (ps * a).sum(-1, keepdims=True)
  grad = jax.grad(lambda z: terms.reverse_kl(z, zt, w, temperature=T, chunk_size=6)[0])(zs)
  np.testing.assert_allclose(grad, T * w[:, None] * ps * (a - kl), atol=1e-5)


def test_tidal_target_gets_no_gradient():
  zs, zt, w, t = random_case(8, scale=4.0)
  T, progress = 2.0, 0.8
  options = terms.TidalOptions(timestep_weight="uniform")
  lam = np_lambda(progress, t)
  grad_s, grad_t = jax.grad(
      lambda a, b: terms.tidal(a, b, w, t=t, progress=progress, options=options, temperature=T)[0],
      argnums=(0, 1),
  )(zs, zt)
  expected = np_tidal_grad(as64(zs), as64(zt), T, lam, as64(w))
  np.testing.assert_allclose(grad_s, expected, atol=1e-6)
  assert np.all(np.asarray(grad_t) == 0)
  # Had r carried a gradient, d/dzs would differ by a clearly non-zero amount.
  through_r = jax.grad(
      lambda z: jnp.sum(
          w
          * T
          * T
          * jnp.sum(
              jax.nn.softmax(((1 - lam[:, None]) * z + lam[:, None] * zt) / T)
              * (
                  jax.nn.log_softmax(((1 - lam[:, None]) * z + lam[:, None] * zt) / T)
                  - jax.nn.log_softmax(z / T)
              ),
              -1,
          )
      )
  )(zs)
  assert np.abs(np.asarray(through_r) - expected).max() > 1e-3


def test_target_log_probs_value_and_gradient():
  rng = np.random.default_rng(9)
  z = rng.uniform(-50, 50, (33, 80)).astype(np.float32)
  x = rng.integers(0, 80, 33).astype(np.int32)
  value = terms.target_log_probs(z, x, chunk_size=8)
  ls = log_softmax64(z)
  np.testing.assert_allclose(value, ls[np.arange(33), x], rtol=1e-5, atol=1e-4)
  grad = jax.grad(lambda a: terms.target_log_probs(a, x, chunk_size=8).sum())(z)
  onehot = np.eye(80)[x]
  np.testing.assert_allclose(grad, onehot - np.exp(ls), atol=1e-6)
  gathered = terms.gathered_target_log_probs(z, x[:5], rows=np.array([3, 0, 32, 3, 1]))
  np.testing.assert_allclose(gathered, ls[[3, 0, 32, 3, 1], x[:5]], rtol=1e-5, atol=1e-4)


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


def test_argmax_agreement():
  zs = np.array([[0, 5, 1], [3, 0, 0], [0, 0, 9]], np.float32)
  zt = np.array([[0, 7, 1], [0, 2, 0], [1, 0, 9]], np.float32)
  agree, count = terms.argmax_agreement(zs, zt, np.array([1, 1, 0], np.float32))
  assert agree == 1 and count == 2


# ----------------------------------------------------------------------------- property


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    n=st.integers(1, 30),
    vocab=st.integers(2, 40),
    chunk=st.integers(1, 40),
    scale=st.sampled_from([0.1, 5.0, 50.0]),
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_property_chunking_never_changes_the_value(n, vocab, chunk, scale, seed, temperature):
  rng = np.random.default_rng(seed)
  zs = rng.uniform(-scale, scale, (n, vocab)).astype(np.float32)
  zt = rng.uniform(-scale, scale, (n, vocab)).astype(np.float32)
  w = rng.random(n).astype(np.float32) * (rng.random(n) < 0.7)
  t = rng.uniform(1e-3, 1, n).astype(np.float32)
  got_f, count = terms.forward_kl(zs, zt, w, temperature=temperature, chunk_size=chunk)
  got_r, _ = terms.reverse_kl(zs, zt, w, temperature=temperature, chunk_size=chunk)
  got_t, _ = terms.tidal(zs, zt, w, t=t, progress=0.6, temperature=temperature, chunk_size=chunk)
  atol = 1e-4 * max(1.0, scale)
  np.testing.assert_allclose(
      got_f, (w * np_forward_kl(as64(zs), as64(zt), temperature)).sum(), rtol=RTOL, atol=atol
  )
  np.testing.assert_allclose(
      got_r, (w * np_reverse_kl(as64(zs), as64(zt), temperature)).sum(), rtol=RTOL, atol=atol
  )
  lam = np_lambda(0.6, t)
  np.testing.assert_allclose(
      got_t,
      (w * np_midrange(t) * np_tidal(as64(zs), as64(zt), temperature, lam)).sum(),
      rtol=RTOL,
      atol=atol,
  )
  assert count == (w > 0).sum()


# ----------------------------------------------------------------------------- memory shape


def _compiled_float32_shapes(fn, *args):
  """Every float32 array shape in the optimised HLO XLA compiles for ``fn`` on this backend
  (after its own rewrites, e.g. CPU's bfloat16 normalisation, which can add full copies)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([0-9,]+)\]", text)}


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tidal", "target_log_probs"])
def test_value_and_grad_never_builds_a_float32_positions_by_vocab_array(name):
  n, v, chunk = 512, 300, 64
  zs = jnp.zeros((n, v), jnp.bfloat16)
  zt = jnp.zeros((n, v), jnp.bfloat16)
  w = jnp.ones((n,), jnp.float32)
  t = jnp.full((n,), 0.5, jnp.float32)
  rows = jnp.arange(n, dtype=jnp.int32)
  fns = {
      "forward_kl": lambda a: terms.forward_kl(a, zt, w, chunk_size=chunk)[0],
      "reverse_kl": lambda a: terms.reverse_kl(a, zt, w, teacher_rows=rows, chunk_size=chunk)[0],
      "tidal": lambda a: terms.tidal(a, zt, w, t=t, progress=0.5, chunk_size=chunk)[0],
      "target_log_probs": lambda a: terms.target_log_probs(
          a, jnp.zeros((n,), jnp.int32), chunk_size=chunk
      ).sum(),
  }
  shapes = _compiled_float32_shapes(jax.value_and_grad(fns[name]), zs)
  assert any(s[-2:] == (chunk, v) for s in shapes)  # the per-block float32 work is there ...
  assert not any(len(s) >= 2 and s[-1] == v and np.prod(s[:-1]) > chunk for s in shapes), shapes
  # ... and the check does see a naive formulation's full-size array.
  naive = lambda a: jnp.sum(jax.nn.log_softmax(a.astype(jnp.float32)) * w[:, None])
  assert (n, v) in _compiled_float32_shapes(jax.value_and_grad(naive), zs)


_SHARDED_CHECK = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tide_jax.distill import terms
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, P("data", None))
rng = np.random.default_rng(0)
zs = jnp.asarray(rng.normal(size=(256, 50)), jnp.bfloat16)
zt = jnp.asarray(rng.normal(size=(256, 50)), jnp.bfloat16)
w = jnp.asarray(rng.random(256) < 0.5, jnp.float32)
fn = jax.jit(jax.value_and_grad(lambda a, b, c: terms.forward_kl(a, b, c, chunk_size=32)[0]))
args = (jax.device_put(zs, rows), jax.device_put(zt, rows),
        jax.device_put(w, NamedSharding(mesh, P("data"))))
text = fn.lower(*args).compile().as_text()
assert " all-gather(" not in text and "all-gather-start(" not in text, "logits were gathered"
value, grad = fn(*args)
assert grad.sharding.spec == P("data", None), grad.sharding
ref_value, ref_grad = fn(zs, zt, w)
np.testing.assert_allclose(value, ref_value, rtol=1e-5)
np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32))
print("OK")
"""


def test_data_sharded_positions_are_never_gathered():
  # A fresh interpreter, so that the 8 fake devices exist whatever imported jax first.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_CHECK], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
