"""Bits per byte: float64 re-derivation of the diffusion bound, determinism, windows, errors."""

from __future__ import annotations

import math

import jax.numpy as jnp
import jax
import numpy as np
import pytest

from tests.sampler_fixtures import tiny_decoder
from tide_jax.data.tokenizers import get_tokenizer
from tide_jax.diffusion.masks import bd3lm_attention_mask
from tide_jax.eval import bpb
from tide_jax.parallel import sharding

QWEN_VOCAB = 151936
MASK_ID = 151669
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Größe — naïve café ☕ costs 3€.",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture(scope="module")
def tokenizer():
  return get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def model():
  return tiny_decoder(seed=1, scale=3.0, vocab=QWEN_VOCAB)


def reference_bits(model, tokenizer, text, *, max_len, block, grid, seed_uniforms, kind="bd3lm"):
  """The bound re-derived with NumPy float64 from the model's plain forward pass: BD3LM
  (``[x_t ; x_0]`` with the block mask) or MDLM (``x_t`` alone, bidirectional)."""
  ids = tokenizer.encode(text, add_special_tokens=False)
  total_nats = 0.0
  for w, start in enumerate(range(0, len(ids), max_len)):
    window = np.array(ids[start : start + max_len])
    n = len(window)
    x0 = np.full(max_len, tokenizer.pad_token_id)
    x0[:n] = window
    valid = np.arange(max_len) < n
    u = seed_uniforms[w]
    attn = bd3lm_attention_mask(max_len, block) & np.concatenate([valid, valid])[None, :]
    pos = np.concatenate([np.arange(max_len)] * 2)[None]
    for i in range(grid):
      t = (i + 0.5) / grid
      masked = (u < t) & valid  # linear schedule: 1 - alpha(t) = t
      x_t = np.where(masked, MASK_ID, x0)
      if kind == "mdlm":
        inputs = x_t[None], np.arange(max_len)[None], np.broadcast_to(valid, (max_len, max_len))
      else:
        inputs = np.concatenate([x_t, x0])[None], pos, attn
      logits = np.asarray(model(*(jnp.asarray(a) for a in inputs)), np.float64)[0, :max_len]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      nll = -logp[np.arange(max_len), x0]
      total_nats += (1.0 / t) * nll[masked].sum() / grid
  return total_nats / math.log(2.0)


def test_bound_matches_a_float64_re_derivation(model, tokenizer):
  text = TEXTS[2]
  data = bpb.prepare_texts(tokenizer, [text], max_len=16, block_size=4, seed=5)
  assert data.ids.shape[0] == 2  # the text needs two 16-token windows
  got = bpb.bits_per_byte(
      model,
      tokenizer,
      [text],
      block_size=4,
      max_len=16,
      mask_token_id=MASK_ID,
      grid=3,
      seed=5,
      batch_size=2,
  )
  want = reference_bits(
      model, tokenizer, text, max_len=16, block=4, grid=3, seed_uniforms=data.uniforms
  )
  assert got.total_bits == pytest.approx(want, rel=1e-5)
  assert got.num_bytes == len(text.encode("utf-8"))
  assert got.bits_per_byte == pytest.approx(want / len(text.encode("utf-8")), rel=1e-5)
  assert got.num_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_bidirectional_bound_matches_a_float64_re_derivation(model, tokenizer):
  # A bidirectional (MDLM) model, e.g. a teacher trained here: x_t alone, every valid
  # token attends to every other; the same weights give a different bound than BD3LM's.
  text = TEXTS[2]
  data = bpb.prepare_texts(tokenizer, [text], max_len=16, block_size=4, seed=5)
  kwargs = dict(block_size=4, max_len=16, mask_token_id=MASK_ID, grid=3, seed=5, batch_size=2)
  got = bpb.bits_per_byte(model, tokenizer, [text], kind="mdlm", **kwargs)
  want = reference_bits(
      model, tokenizer, text, max_len=16, block=4, grid=3, seed_uniforms=data.uniforms, kind="mdlm"
  )
  assert got.total_bits == pytest.approx(want, rel=1e-5)
  block_bound = bpb.bits_per_byte(model, tokenizer, [text], **kwargs).total_bits
  assert abs(block_bound - want) / want > 1e-3
  with pytest.raises(ValueError, match="objective.kind='ar' is unknown"):
    bpb.bits_per_byte(model, tokenizer, [text], kind="ar", **kwargs)


def test_identical_when_computed_twice_and_independent_of_batching(model, tokenizer):
  kwargs = dict(block_size=4, max_len=16, mask_token_id=MASK_ID, grid=4)
  first = bpb.bits_per_byte(model, tokenizer, TEXTS, batch_size=3, **kwargs)
  second = bpb.bits_per_byte(model, tokenizer, TEXTS, batch_size=3, **kwargs)
  assert first == second
  assert math.isfinite(first.bits_per_byte) and first.bits_per_byte > 0
  # Rows do not see each other, and the filler rows of a short batch add nothing.
  data = bpb.prepare_texts(tokenizer, TEXTS, max_len=16, block_size=4)
  one_by_one = bpb.window_nats(
      model, data, block_size=4, mask_token_id=MASK_ID, grid=4, batch_size=1
  )
  batched = bpb.window_nats(model, data, block_size=4, mask_token_id=MASK_ID, grid=4, batch_size=4)
  np.testing.assert_allclose(one_by_one, batched, rtol=1e-5)
  assert first.total_bits == pytest.approx(batched.sum() / math.log(2), rel=1e-6)
  # On a mesh each device scores its own windows; the numbers do not change.
  for sizes in ({"data": 4}, {"data": 2, "tensor": 2}):
    mesh = sharding.make_mesh(sizes, jax.devices()[:4])
    on_mesh = bpb.window_nats(
        model, data, block_size=4, mask_token_id=MASK_ID, grid=4, batch_size=4, mesh=mesh
    )
    np.testing.assert_allclose(on_mesh, batched, rtol=1e-5)


def test_more_grid_points_change_little(model, tokenizer):
  kwargs = dict(block_size=4, max_len=16, mask_token_id=MASK_ID)
  coarse = bpb.bits_per_byte(model, tokenizer, TEXTS, grid=8, **kwargs).bits_per_byte
  fine = bpb.bits_per_byte(model, tokenizer, TEXTS, grid=32, **kwargs).bits_per_byte
  assert abs(coarse - fine) / fine < 0.1


def test_midpoint_grid():
  np.testing.assert_allclose(bpb.midpoint_grid(4), [0.125, 0.375, 0.625, 0.875])


def test_bad_input_is_refused(model, tokenizer):
  with pytest.raises(ValueError, match="text list is empty"):
    bpb.bits_per_byte(model, tokenizer, [], block_size=4, max_len=16, mask_token_id=MASK_ID)
  with pytest.raises(ValueError, match="All texts are empty"):
    bpb.bits_per_byte(model, tokenizer, ["", ""], block_size=4, max_len=16, mask_token_id=MASK_ID)
  with pytest.raises(ValueError, match="not one string"):
    bpb.bits_per_byte(model, tokenizer, "abc", block_size=4, max_len=16, mask_token_id=MASK_ID)
  with pytest.raises(ValueError, match="multiple of the block size"):
    bpb.bits_per_byte(model, tokenizer, ["abc"], block_size=4, max_len=18, mask_token_id=MASK_ID)
  with pytest.raises(ValueError, match=r"Grid times must lie in \(0, 1\]"):
    bpb.bits_per_byte(
        model, tokenizer, ["abc"], block_size=4, max_len=16, mask_token_id=MASK_ID, grid=[0.0, 0.5]
    )
