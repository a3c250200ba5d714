"""Teacher reliability vs masking ratio: NumPy float64 re-derivation, nested masks, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sampler_fixtures import tiny_decoder
from tide_jax.data.tokenizers import get_tokenizer
from tide_jax.diffusion.masks import bd3lm_attention_mask
from tide_jax import plot
from tide_jax.eval import reliability

QWEN_VOCAB = 151936
MASK_ID = 151669
TEXTS = [
    "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "x = 1",
]


@pytest.fixture(scope="module")
def tokenizer():
  return get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def model():
  return tiny_decoder(seed=2, scale=3.0, vocab=QWEN_VOCAB)


def reference(model, tokenizer, ratio, max_len, seed=0, block=None):
  """Accuracy, NLL and count from the model's plain bidirectional forward, in float64; with
  ``block``, from the BD3LM forward ``[x_t ; x_0]`` under the block mask instead."""
  ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
  windows = [w[i : i + max_len] for w in ids for i in range(0, len(w), max_len)]
  uniforms = np.random.default_rng(seed).random((len(windows), max_len)).astype(np.float32)
  correct = nll = count = 0.0
  for row, window in enumerate(windows):
    n = len(window)
    masked = uniforms[row, :n] < np.float32(ratio)
    x_t = np.where(masked, MASK_ID, window)[None]
    if block is None:
      attend = np.ones((1, 1, n, n), bool)
      hidden = model.hidden_states(x_t, np.arange(n)[None], attend)
    else:  # the window padded to max_len, as the student sees it; padding not attended to
      pad = lambda a: np.concatenate([a, np.zeros((1, max_len - n), a.dtype)], axis=1)
      valid = pad(np.ones((1, n), bool))
      both = np.concatenate([pad(x_t), pad(np.asarray(window)[None])], axis=1)
      attend = (
          bd3lm_attention_mask(max_len, block)[None] & np.concatenate([valid, valid], 1)[:, None]
      )
      hidden = model.hidden_states(both, np.tile(np.arange(max_len), 2)[None], attend[:, None])
      hidden = hidden[:, :n]
    logits = np.asarray(model.logits(hidden), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    target = np.asarray(window)
    correct += np.sum((logits.argmax(-1) == target)[masked])
    nll += -np.sum(logp[np.arange(n), target][masked])
    count += masked.sum()
  return correct / count, nll / count, count


def test_curve_matches_a_float64_rederivation(model, tokenizer):
  ratios = (0.2, 0.5, 0.9)
  curve = reliability.teacher_reliability(
      model, tokenizer, TEXTS, mask_token_id=MASK_ID, max_len=64, ratios=ratios, batch_size=2
  )
  np.testing.assert_allclose(curve.t, ratios)
  for i, ratio in enumerate(ratios):
    accuracy, nll, count = reference(model, tokenizer, ratio, max_len=64)
    assert curve.num_masked[i] == count
    np.testing.assert_allclose(curve.accuracy[i], accuracy, atol=1e-9)
    np.testing.assert_allclose(curve.nll[i], nll, rtol=2e-5)
  # The masked sets are nested: every token masked at t stays masked at larger t.
  assert np.all(np.diff(curve.num_masked) > 0)


def test_student_curve_uses_its_block_diffusion_forward(model, tokenizer):
  ratios = (0.3, 0.8)
  kwargs = dict(mask_token_id=MASK_ID, max_len=64, ratios=ratios, batch_size=2)
  student = reliability.teacher_reliability(
      model, tokenizer, TEXTS, kind="bd3lm", block_size=16, **kwargs
  )
  bidirectional = reliability.teacher_reliability(model, tokenizer, TEXTS, **kwargs)
  for i, ratio in enumerate(ratios):
    accuracy, nll, count = reference(model, tokenizer, ratio, max_len=64, block=16)
    assert student.num_masked[i] == count == bidirectional.num_masked[i]
    np.testing.assert_allclose(student.accuracy[i], accuracy, atol=1e-9)
    np.testing.assert_allclose(student.nll[i], nll, rtol=2e-5)
  assert np.all(np.abs(student.nll - bidirectional.nll) > 1e-3)
  with pytest.raises(ValueError, match="multiple of block_size"):
    reliability.teacher_reliability(model, tokenizer, TEXTS, kind="bd3lm", block_size=48, **kwargs)


def test_batching_does_not_change_the_curve(model, tokenizer):
  kwargs = dict(mask_token_id=MASK_ID, max_len=64, ratios=(0.3, 0.7))
  one = reliability.teacher_reliability(model, tokenizer, TEXTS, batch_size=1, **kwargs)
  four = reliability.teacher_reliability(model, tokenizer, TEXTS, batch_size=4, **kwargs)
  np.testing.assert_array_equal(one.num_masked, four.num_masked)
  np.testing.assert_allclose(one.nll, four.nll, rtol=1e-5)
  np.testing.assert_allclose(one.accuracy, four.accuracy, atol=1e-12)


def test_bad_input(model, tokenizer):
  with pytest.raises(ValueError, match="Masking ratios must lie in"):
    reliability.teacher_reliability(
        model, tokenizer, TEXTS, mask_token_id=MASK_ID, max_len=64, ratios=(0.0, 0.5)
    )
  with pytest.raises(ValueError, match="multiple of chunk"):
    reliability.teacher_reliability(model, tokenizer, TEXTS, mask_token_id=MASK_ID, max_len=48)


def test_reliability_figure(tmp_path):
  curve = reliability.ReliabilityCurve(
      t=np.array([0.1, 0.5, 0.9], np.float32),
      accuracy=np.array([0.6, 0.4, 0.1]),
      nll=np.array([2.0, 3.5, 6.0]),
      num_masked=np.array([10, 50, 90]),
  )
  fig = plot.reliability_figure(curve, tidal_lambda=0.9 * (1.0 - curve.t))
  acc_ax, nll_ax, weight_ax = fig.axes
  assert acc_ax.get_xlabel() == nll_ax.get_xlabel() == "masking ratio t"
  assert acc_ax.get_ylabel() == "fraction of masked tokens"
  assert weight_ax.get_ylabel() == "TIDAL teacher weight" and weight_ax.get_ylim() == (0.0, 1.0)
  assert nll_ax.get_ylabel() == "nats per masked token"
  np.testing.assert_allclose(weight_ax.get_lines()[0].get_ydata(), 0.9 * (1.0 - curve.t))
  legend = [t.get_text() for t in acc_ax.get_legend().get_texts()]
  assert legend == ["teacher top-1 accuracy", "TIDAL teacher weight"]
  np.testing.assert_allclose(nll_ax.get_lines()[0].get_ydata(), curve.nll)
  path = plot.save_png(fig, tmp_path / "reliability.png")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
