"""Dense Qwen2/Qwen3 decoder in Flax NNX with an explicit attention mask.

The same module serves causal, bidirectional and BD3LM attention: the caller passes token
ids, position ids and a boolean mask. The output projection is a separate method so the
train step can apply it only to the positions whose logits it needs (the x_t half).

Parameter layout (what ``tide_jax.convert`` maps HF tensors onto):
  embed ``[V, E]``; per layer: attn.q ``[E, H, D]``, attn.k/attn.v ``[E, K, D]``,
  attn.o ``[H, D, E]``, optional biases ``[H, D]``/``[K, D]``/``[E]``, attn.q_norm/k_norm
  ``[D]``, mlp.gate/up ``[E, I]``, mlp.down ``[I, E]``, input_norm/post_attn_norm ``[E]``;
  final_norm ``[E]``; lm_head ``[E, V]`` when embeddings are untied.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tide_jax.models import attention, layers
from tide_jax.parallel import sharding
from tide_jax.models.config import DecoderConfig, resolve_dtype

KVPair = tuple[jax.Array, jax.Array]
# Logical layout of the residual stream; a no-op without a mesh (see parallel.sharding).
ACTIVATION_AXES = ("batch", "length", "embed")


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k RMSNorm (Qwen3) and q/k/v biases (Qwen2)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    pd = resolve_dtype(cfg.param_dtype)
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if h % k:
      raise ValueError(f"num_attention_heads {h} is not a multiple of num_key_value_heads {k}.")
    self.cfg = cfg
    self.q = layers.make_param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd)
    self.k = layers.make_param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
    self.v = layers.make_param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
    self.o = layers.make_param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = layers.make_param(rngs, (h, d), ("heads", "head_dim"), pd, init="zeros")
      self.k_bias = layers.make_param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = layers.make_param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
    if cfg.o_bias:
      self.o_bias = layers.make_param(rngs, (e,), ("embed",), pd, init="zeros")
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(
          d, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="head_dim"
      )
      self.k_norm = layers.RMSNorm(
          d, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="head_dim"
      )

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Queries, keys and values after bias, q/k norm and RoPE: ``[b, L, heads, D]``."""
    dtype = x.dtype
    q = jnp.einsum("ble,ehd->blhd", x, self.q[...].astype(dtype))
    k = jnp.einsum("ble,ekd->blkd", x, self.k[...].astype(dtype))
    v = jnp.einsum("ble,ekd->blkd", x, self.v[...].astype(dtype))
    if self.cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dtype)
      k = k + self.k_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    # Named for the "save_attention" remat policy (no effect without remat).
    names = layers.ATTENTION_SAVE_NAMES
    return checkpoint_name(q, names[0]), checkpoint_name(k, names[1]), checkpoint_name(v, names[2])

  def __call__(
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      mask: jax.Array,
      prefix_kv: KVPair | None = None,
  ) -> tuple[jax.Array, KVPair]:
    """Attention output ``[b, L, E]`` and this call's (k, v) ``[b, L, K, D]`` each.

    ``prefix_kv`` holds cached keys/values ``[b, S0, K, D]`` that are prepended to this
    call's keys (the mask then has ``S0 + L`` key columns).
    """
    q, k, v = self.project_qkv(x, cos, sin)
    new_kv = (k, v)
    if prefix_kv is not None:
      k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    attn = attention.attend(q, k, v, mask, self.cfg.head_dim**-0.5, self.cfg.attention_impl)
    attn = checkpoint_name(attn, layers.ATTENTION_SAVE_NAMES[3])
    out = jnp.einsum("blhd,hde->ble", attn, self.o[...].astype(x.dtype))
    if self.cfg.o_bias:
      out = out + self.o_bias[...].astype(x.dtype)
    return out, new_kv


class DecoderLayer(nnx.Module):
  """Pre-norm transformer layer: RMSNorm -> attention -> RMSNorm -> SwiGLU."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    pd = resolve_dtype(cfg.param_dtype)
    self.input_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, param_dtype=pd, rngs=rngs)

  def __call__(self, x, cos, sin, mask, prefix_kv=None):
    attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, mask, prefix_kv)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_kv


class DenseDecoder(layers.LanguageModelHead, nnx.Module):
  """Qwen2/Qwen3-family decoder; see the module docstring for the parameter layout."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    pd = resolve_dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = layers.make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.make_param(
          rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd
      )

  def hidden_states(
      self,
      input_ids: jax.Array,
      positions: jax.Array,
      attention_mask: jax.Array,
      prefix_kv: Sequence[KVPair] | None = None,
      return_kv: bool = False,
  ):
    """Final-norm hidden states ``[b, L, E]`` (and per-layer (k, v) when ``return_kv``).

    Args:
      input_ids: int ``[b, L]``.
      positions: int ``[b, L]`` RoPE positions (may repeat, as in ``[x_t ; x_0]``).
      attention_mask: bool, ``[L, S]``, ``[b, L, S]`` or ``[b, 1|H, L, S]``; S = L plus the
        cached prefix length when ``prefix_kv`` is given.
      prefix_kv: optional per-layer cached (k, v), each ``[b, S0, K, D]``.
      return_kv: also return this call's per-layer (k, v).
    """
    dtype = resolve_dtype(self.cfg.dtype)
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
    x = sharding.constrain(x, ACTIVATION_AXES)
    cos, sin = layers.rope_tables(positions, self.cfg.rotary_dim, self.cfg.rope_theta)
    # A NumPy mask stays NumPy (static), so "blocked" and "splash" can skip masked tiles;
    # it is closed over rather than passed to remat, which would turn it into a tracer.
    mask = layers.as_4d_mask(attention_mask)
    run_layer = layers.maybe_remat(lambda lyr, h, c, s, p: lyr(h, c, s, mask, p), self.cfg.remat)
    new_kvs = []
    for i, layer in enumerate(self.layers):
      prefix = None if prefix_kv is None else prefix_kv[i]
      x, kv = run_layer(layer, x, cos, sin, prefix)
      x = sharding.constrain(x, ACTIVATION_AXES)
      new_kvs.append(kv)
    x = self.final_norm(x)
    return (x, tuple(new_kvs)) if return_kv else x


def build_decoder(cfg: DecoderConfig, seed: int = 0) -> DenseDecoder:
  """A randomly initialised decoder (the converter overwrites the weights when loading)."""
  return DenseDecoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_decoder(cfg: DecoderConfig) -> DenseDecoder:
  """The decoder with ShapeDtypeStruct leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: DenseDecoder(cfg, rngs=nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (works on abstract models too)."""
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
