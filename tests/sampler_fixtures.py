"""Models for the sampler tests: a tiny random decoder and a scripted-logits stub."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig

VOCAB = 64
MASK_ID = 63
EOS_ID = 62


def tiny_decoder(seed: int = 0, scale: float = 5.0, vocab: int = VOCAB) -> dense.DenseDecoder:
  """A 2-layer random Qwen3-style decoder whose logits are spread out.

  The default 0.02 init gives nearly uniform softmaxes, where confidences of different
  positions differ by less than float32 noise; scaling the matrices makes the greedy
  choices and the confidence order well separated, so that the cached and recomputing
  samplers can be compared token for token.
  """
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=vocab,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      intermediate_size=64,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
      max_position_embeddings=512,
  )
  model = dense.build_decoder(cfg, seed)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


class ScriptedModel(nnx.Module):
  """Stub decoder whose logits record *when* each position was committed.

  At every call, position i of a block chooses token ``base + n_masked`` (n_masked = how
  many mask tokens the block still holds) with logit ``scores[i]`` against 0 for all
  other tokens, so its confidence grows with ``scores[i]``. After sampling, the token at
  each position tells the step at which it was committed. Positions whose logical
  position equals ``eos_position`` choose EOS instead.
  """

  def __init__(
      self,
      scores,
      *,
      vocab: int = 256,
      mask_id: int = 255,
      eos_id: int = 254,
      base: int = 100,
      eos_position: int = -1,
  ):
    self.scores = jnp.asarray(scores, jnp.float32)
    self.vocab, self.mask_id, self.eos_id, self.base = vocab, mask_id, eos_id, base
    self.eos_position = eos_position

  def hidden_states(self, input_ids, positions, attention_mask, prefix_kv=None, return_kv=False):
    length = input_ids.shape[1]
    n_masked = jnp.sum(input_ids == self.mask_id, axis=1, keepdims=True)
    slot = jnp.broadcast_to(jnp.arange(length) % self.scores.shape[0], input_ids.shape)
    hidden = jnp.stack(
        [slot, jnp.broadcast_to(n_masked, input_ids.shape), positions], axis=-1
    ).astype(jnp.float32)
    if not return_kv:
      return hidden
    kv = jnp.zeros(input_ids.shape + (1, 1), jnp.float32)
    return hidden, ((kv, kv),)

  def logits(self, hidden):
    slot, n_masked, position = (hidden[..., i].astype(jnp.int32) for i in range(3))
    token = jnp.where(position == self.eos_position, self.eos_id, self.base + n_masked)
    one_hot = jax.nn.one_hot(token, self.vocab, dtype=jnp.float32)
    return one_hot * self.scores[slot][..., None]
