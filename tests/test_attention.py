"""Attention implementations (``model.attention_impl``) against the dense reference.

Tolerances: float32 outputs and gradients within 1e-5 max-abs of ``xla`` (the reference);
bfloat16 outputs within 2x the reference's own bf16 error against float32 (plus 1e-2).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from flax import nnx

from tests import teachers_fixtures
from tide_jax.diffusion import forward, masks
from tide_jax.models import attention, dense, layers, llada2
from tide_jax.models.config import DecoderConfig

TOL = 1e-5


def qkv(b, length, heads, kv_heads, dim, seed=0, keys=None, dtype=jnp.float32):
  keys = keys or length
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(k1, (b, length, heads, dim), jnp.float32).astype(dtype)
  k = jax.random.normal(k2, (b, keys, kv_heads, dim), jnp.float32).astype(dtype)
  v = jax.random.normal(k3, (b, keys, kv_heads, dim), jnp.float32).astype(dtype)
  return q, k, v


def loss_and_grads(fn, q, k, v):
  """A loss that weights every output element differently, and its gradients."""
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def padded_bd3lm(length, block, valid_lengths):
  """A static per-example mask: BD3LM with each sequence's padding keys removed."""
  base = masks.bd3lm_attention_mask(length, block)
  valid = np.arange(length)[None, :] < np.array(valid_lengths)[:, None]
  keys = np.concatenate([valid, valid], axis=1)
  return (base[None] & keys[:, None, :])[:, None]


MASKS = {
    "bd3lm": lambda: masks.bd3lm_attention_mask(64, 8),
    "bd3lm_x0_first": lambda: masks.bd3lm_attention_mask(64, 8, x0_first=True),
    "bd3lm_block32": lambda: masks.bd3lm_attention_mask(96, 32),
    "per_example_padding": lambda: padded_bd3lm(64, 8, [64, 40]),
    "causal": lambda: masks.causal_attention_mask(128),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_blocked_matches_reference_float32(name):
  mask = MASKS[name]()
  length = mask.shape[-2]
  q, k, v = qkv(2, length, 4, 2, 16, seed=len(name))
  scale = 16**-0.5
  ref_loss, ref_grads = loss_and_grads(
      lambda q, k, v: layers.masked_gqa_attention(q, k, v, mask, scale), q, k, v
  )
  got_loss, got_grads = loss_and_grads(
      lambda q, k, v: attention.blocked_attention(q, k, v, mask, scale), q, k, v
  )
  ref = layers.masked_gqa_attention(q, k, v, mask, scale)
  got = jax.jit(lambda q, k, v: attention.blocked_attention(q, k, v, mask, scale))(q, k, v)
  assert attention.block_plan(attention.static_mask(mask), 2) is not None
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=TOL)
  for g_got, g_ref in zip(got_grads, ref_grads):
    np.testing.assert_allclose(g_got, g_ref, atol=TOL, rtol=0)


def test_blocked_skips_masked_tiles_of_the_paper_shape():
  """BD3LM at L = 512, block 32: under a third of the [2L, 2L] plane is computed, and the
  compiled program does about that fraction of the reference's floating-point work."""
  mask = masks.bd3lm_attention_mask(512, 32)
  plan = attention.block_plan(attention.static_mask(mask), 2)
  assert plan.computed_fraction < 0.33
  visible_tiles = mask.reshape(32, 32, 32, 32).any(axis=(1, 3)).sum()
  assert visible_tiles / 32**2 < 0.27  # the mask itself: 272 of 1,024 tiles of 32 x 32
  q, k, v = qkv(1, 1024, 4, 2, 32)

  def flops(fn):
    compiled = jax.jit(fn).lower(q, k, v).compile()
    return compiled.cost_analysis()["flops"]

  dense_flops = flops(lambda q, k, v: layers.masked_gqa_attention(q, k, v, mask, 0.2))
  blocked_flops = flops(lambda q, k, v: attention.blocked_attention(q, k, v, mask, 0.2))
  assert blocked_flops < 0.4 * dense_flops


def test_blocked_bfloat16_is_within_bfloat16_tolerance():
  mask = masks.bd3lm_attention_mask(64, 8)
  q, k, v = qkv(2, 128, 4, 2, 32, seed=3)
  exact = layers.masked_gqa_attention(q, k, v, mask, 32**-0.5)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  ref16 = layers.masked_gqa_attention(q16, k16, v16, mask, 32**-0.5)
  got16 = attention.blocked_attention(q16, k16, v16, mask, 32**-0.5)
  assert got16.dtype == jnp.bfloat16
  ref_err = float(jnp.max(jnp.abs(ref16.astype(jnp.float32) - exact)))
  got_err = float(jnp.max(jnp.abs(got16.astype(jnp.float32) - exact)))
  assert got_err <= 2 * ref_err + 1e-2
  np.testing.assert_allclose(
      np.asarray(got16, np.float32), np.asarray(ref16, np.float32), atol=2e-2, rtol=0
  )


def test_rows_without_visible_keys_are_zero_like_the_reference():
  mask = masks.bd3lm_attention_mask(32, 8).copy()
  mask[:16] = False  # two whole query tiles see nothing
  mask[20] = False  # and one row inside a computed tile
  q, k, v = qkv(1, 64, 2, 1, 8)
  for fn in (
      attention.blocked_attention,
      lambda *a: attention.fused_attention(*a, implementation="xla"),
  ):
    got = fn(q, k, v, mask, 0.3)
    assert float(jnp.max(jnp.abs(got[:, :16]))) == 0.0
    assert float(jnp.max(jnp.abs(got[:, 20]))) == 0.0
    np.testing.assert_allclose(got, layers.masked_gqa_attention(q, k, v, mask, 0.3), atol=TOL)


@pytest.mark.parametrize("mask_rank", [3, 4])
def test_blocked_with_a_traced_mask_computes_the_reference(mask_rank):
  # A traced mask (per-example key padding) runs the reference QUERY_CHUNK rows at a time:
  # 64 query rows in chunks of 16 here. Values and all three gradients equal the dense
  # reference's, with a row that sees no key (zeros, as in the reference).
  mask = padded_bd3lm(32, 8, [32, 20])  # [2, 1, 64, 64]
  mask[1, 0, 5] = False
  mask = mask[:, 0] if mask_rank == 3 else mask
  q, k, v = qkv(2, 64, 4, 2, 8)
  chunked = lambda q, k, v: attention.query_chunked_attention(q, k, v, jnp.asarray(mask), 0.25, 16)
  reference = lambda q, k, v: layers.masked_gqa_attention(q, k, v, mask, 0.25)
  got, want = loss_and_grads(chunked, q, k, v), loss_and_grads(reference, q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=TOL)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, atol=TOL)
  blocked = jax.jit(lambda q, k, v, m: attention.blocked_attention(q, k, v, m, 0.25))
  np.testing.assert_allclose(blocked(q, k, v, jnp.asarray(mask)), reference(q, k, v), atol=TOL)


def _float32_shapes(fn, *args) -> set[tuple[int, ...]]:
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([0-9,]+)\]", text)}


def test_query_chunks_never_hold_the_whole_score_plane():
  # Forward and backward of the chunked reference hold [b, K, G, chunk, S] scores, never
  # the [.., L, S] plane the dense reference holds (which the check does see).
  b, length, chunk = 2, 512, 128
  mask = jnp.asarray(padded_bd3lm(length // 2, 32, [256, 100]))
  q, k, v = qkv(b, length, 4, 2, 8)
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def grads(attend):
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), argnums=(0, 1, 2))

  chunked = grads(lambda q, k, v: attention.query_chunked_attention(q, k, v, mask, 0.3, chunk))
  dense_plane = grads(lambda q, k, v: layers.masked_gqa_attention(q, k, v, mask, 0.3))
  plane = lambda shapes: [s for s in shapes if len(s) >= 2 and s[-2:] == (length, length)]
  assert plane(_float32_shapes(dense_plane, q, k, v))
  shapes = _float32_shapes(chunked, q, k, v)
  assert not plane(shapes), plane(shapes)
  assert any(s[-2:] == (chunk, length) for s in shapes)


def test_fused_wrapper_layout_matches_reference():
  """The cuDNN path's wrapper (GQA, 2D/3D/4D masks, per-head masks), run with the "xla"
  implementation of the same jax.nn call, which is what a CPU can run."""
  q, k, v = qkv(2, 32, 4, 2, 16, keys=48, seed=5)
  rng = np.random.default_rng(0)
  for mask in (
      rng.random((32, 48)) < 0.7,
      rng.random((2, 32, 48)) < 0.7,
      rng.random((2, 4, 32, 48)) < 0.7,
  ):
    got = attention.fused_attention(q, k, v, mask, 0.25, implementation="xla")
    np.testing.assert_allclose(
        got, layers.masked_gqa_attention(q, k, v, mask, 0.25), atol=TOL, rtol=0
    )


def test_splash_kernel_in_interpret_mode_matches_reference():
  """The TPU splash path, run by the Pallas interpreter on CPU (same kernel and mask info)."""
  mask = masks.bd3lm_attention_mask(128, 32)
  q, k, v = qkv(2, 256, 2, 1, 128, seed=7)
  scale = 128**-0.5
  splash = lambda q, k, v: attention.splash_attention(q, k, v, mask, scale, interpret=True)
  reference = lambda q, k, v: layers.masked_gqa_attention(q, k, v, mask, scale)
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), reference(q, k, v), atol=TOL, rtol=0)
  got_loss, got_grads = loss_and_grads(splash, q, k, v)
  ref_loss, ref_grads = loss_and_grads(reference, q, k, v)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for g_got, g_ref in zip(got_grads, ref_grads):
    np.testing.assert_allclose(g_got, g_ref, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="one \\[L, S\\] mask for the whole batch"):
    attention.splash_attention(q, k, v, padded_bd3lm(128, 32, [128, 64]), scale, interpret=True)
  with pytest.raises(ValueError, match="multiples of 128"):
    attention.splash_attention(q[:, :64], k[:, :64], v[:, :64], mask[:64, :64], scale)


def test_dispatch_refuses_the_wrong_backend_and_routes_each_choice(monkeypatch):
  mask = masks.bd3lm_attention_mask(32, 8)
  q, k, v = qkv(1, 64, 2, 1, 8)
  with pytest.raises(ValueError, match="runs only on an NVIDIA GPU.*'cpu'"):
    attention.attend(q, k, v, mask, 0.3, "cudnn")
  with pytest.raises(ValueError, match="runs only on a TPU.*'cpu'"):
    attention.attend(q, k, v, mask, 0.3, "splash")
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    attention.attend(q, k, v, mask, 0.3, "flash")

  calls = []
  monkeypatch.setattr(
      attention, "fused_attention", lambda *a, implementation: calls.append(implementation)
  )
  monkeypatch.setattr(
      attention, "splash_attention", lambda q, k, v, m, s: calls.append(("splash", m.shape))
  )
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
    attention.attend(q, k, v, mask, 0.3, "cudnn")
  attention.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 0.3, "cudnn")
  assert calls == ["cudnn"]

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  attention.attend(q, k, v, mask, 0.3, "splash")
  assert calls[-1] == ("splash", (1, 1, 64, 64))
  warnings = []
  monkeypatch.setattr(logging, "warning", warnings.append)
  attention._LOGGED.clear()
  traced = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, 0.3, "splash"))
  np.testing.assert_allclose(
      traced(q, k, v, jnp.asarray(mask)),
      layers.masked_gqa_attention(q, k, v, mask, 0.3),
      atol=TOL,
  )
  assert len(warnings) == 1 and "uses the 'xla' reference, 256 query rows at a time" in warnings[0]


def tiny_dense(impl: str, remat="none") -> dense.DenseDecoder:
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=64,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      intermediate_size=64,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
      attention_impl=impl,
      remat=remat,
  )
  return dense.build_decoder(cfg, seed=0)


def bd3lm_inputs(b, length, block, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, 2 * length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (b, 2))
  return jnp.asarray(ids), jnp.asarray(positions), masks.bd3lm_attention_mask(length, block)


def param_grads(model, ids, positions, mask):
  graphdef, params = nnx.split(model)

  def loss(p):
    logits = nnx.merge(graphdef, p)(ids, positions, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])  # a mean: gradients of order 1

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_dense_decoder_blocked_equals_xla(remat):
  ids, positions, mask = bd3lm_inputs(2, 64, 8, 64)
  ref_loss, ref_grads = param_grads(tiny_dense("xla"), ids, positions, mask)
  got_loss, got_grads = param_grads(tiny_dense("blocked", remat), ids, positions, mask)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=TOL)
  for g_got, g_ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g_got, g_ref, atol=TOL, rtol=0)


def test_llada2_teacher_blocked_equals_xla():
  hf = teachers_fixtures.tiny_llada2_config()
  ids, positions, mask = bd3lm_inputs(2, 32, 8, hf["vocab_size"], seed=1)
  mask = masks.bd3lm_attention_mask(32, 8, x0_first=True)  # the WeDLM-style input order
  logits = {}
  for impl in ("xla", "blocked"):
    cfg = llada2.llada2_config_from_hf(hf).replace(attention_impl=impl)
    model = llada2.LLaDA2Model(cfg, rngs=nnx.Rngs(params=0))
    logits[impl] = jax.jit(lambda i, p, m=model: m(i, p, mask))(ids, positions)
  np.testing.assert_allclose(logits["blocked"], logits["xla"], atol=TOL, rtol=0)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_training_forward_lets_blocked_skip_tiles(remat):
  """The BD3LM forward of the train step (diffusion.forward) hands attention a mask known at
  trace time, so inside jit 'blocked' computes fewer FLOPs than 'xla' (a mask built with
  jnp ops would be a tracer there, and blocked would silently run the dense reference)."""
  rng = np.random.default_rng(1)
  clean = jnp.asarray(rng.integers(0, 64, (2, 256)), jnp.int32)
  x_t = jnp.where(jnp.asarray(rng.random((2, 256)) < 0.5), 63, clean)

  def compiled(impl):
    graphdef, params = nnx.split(tiny_dense(impl, remat))

    def loss(p):
      model = nnx.merge(graphdef, p)
      hidden = forward.denoiser_hidden(model, clean, x_t, kind="bd3lm", block_size=16)
      return jnp.mean(hidden**2)

    fn = jax.jit(jax.value_and_grad(loss))
    return fn.lower(params).compile(), params

  flops = {}
  for impl in ("xla", "blocked"):
    program, params = compiled(impl)
    flops[impl] = program.cost_analysis()["flops"]
    value, _ = program(params)
    flops[impl + "_value"] = float(value)
  np.testing.assert_allclose(flops["blocked_value"], flops["xla_value"], rtol=TOL)
  assert flops["blocked"] < 0.8 * flops["xla"], flops
