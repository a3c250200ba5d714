"""Layers shared by the decoders: RMSNorm, RoPE, masked grouped-query attention, SwiGLU.

Parameters carry ``logical_axes`` metadata (names such as ``embed``, ``heads``, ``mlp``);
``tide_jax.parallel`` maps these names to mesh axes with one rules table.
Shapes: b batch, L query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tide_jax.parallel import sharding

NEG_INF = -1e30

# Names of the attention results the "save_attention" remat policy keeps (checkpoint_name).
ATTENTION_SAVE_NAMES = ("query", "key", "value", "attention_context")
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_SAVE_NAMES),
}


def maybe_remat(fn: Callable, policy_name: str) -> Callable:
  """``fn(module, *args)`` with the named recomputation policy ("none": ``fn`` as is).

  Policies (names of ``tide_jax.models.config.REMAT_POLICIES``): "full" keeps only the
  call's inputs and recomputes the whole call in the backward pass, once the call's
  cotangent exists (:func:`_recompute_after_cotangent`); the others are ``nnx.remat``
  policies: "dots_saveable" keeps every matmul result;
  "dots_with_no_batch_dims_saveable" keeps the matmuls without batch dimensions (the
  projections, not the attention scores); "save_attention" keeps the q/k/v projections
  and the attention context and recomputes the rest (norms, output projection, MLP).
  """
  if policy_name == "none":
    return fn
  if policy_name not in _REMAT_POLICIES:
    raise ValueError(
        f"Unknown remat policy {policy_name!r}; use none or one of {', '.join(_REMAT_POLICIES)}."
    )
  if policy_name == "full":
    return _recompute_after_cotangent(fn)
  return nnx.remat(fn, policy=_REMAT_POLICIES[policy_name])


def _recompute_after_cotangent(fn: Callable) -> Callable:
  """``fn(module, *args)`` recomputed in the backward pass, and not before it is needed.

  ``jax.checkpoint`` keeps the recomputation apart from the forward pass but lets XLA
  schedule it as soon as the saved inputs exist. In the compiled training step XLA's CPU
  compiler did so for every layer (the recomputed activations of all layers alive at once:
  as much memory per layer as without recomputation, 857 MiB per layer of a small
  student), and ``optimization_barrier`` did not stop it (that compiler drops barriers).
  Here the backward pass adds ``0 x sum(cotangent)`` to the saved floating inputs before
  recomputing: a data dependency that no schedule can hoist, at the cost of one reduction
  over the cotangent per call (4 MiB per layer of the same student). A non-finite
  cotangent makes the recomputed call non-finite, as its gradient would be anyway.
  """

  def call(module, *args):
    graphdef, state = nnx.split(module)

    @jax.custom_vjp
    def pure(state, *args):
      return fn(nnx.merge(graphdef, state), *args)

    def forward(state, *args):
      return pure(state, *args), (state, args)

    def backward(saved, cotangent):
      state, args = saved
      zero = sum(jnp.sum(c, dtype=jnp.float32) for c in jax.tree.leaves(cotangent)) * 0.0
      floating = lambda a: jnp.issubdtype(a.dtype, jnp.floating)
      args = jax.tree.map(lambda a: a + zero.astype(a.dtype) if floating(a) else a, args)
      _, vjp = jax.vjp(lambda s, *a: fn(nnx.merge(graphdef, s), *a), state, *args)
      return vjp(cotangent)

    pure.defvjp(forward, backward)
    return pure(state, *args)

  return call


def make_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Any,
    init: str = "normal",
    scale: float = 0.02,
) -> nnx.Param:
  """A parameter with its logical axis names; ``init`` is "normal", "zeros" or "ones"."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and logical axes {axes} differ in rank.")
  if init == "normal":
    value = scale * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(tuple(shape), jnp.float32)
  elif init == "ones":
    value = jnp.ones(tuple(shape), jnp.float32)
  else:
    raise ValueError(f"Unknown initializer {init!r}.")
  return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32, scaled by a learned weight."""

  def __init__(
      self, dim: int, eps: float, *, param_dtype: Any, rngs: nnx.Rngs, axis_name: str = "norm"
  ):
    self.eps = eps
    self.weight = make_param(rngs, (dim,), (axis_name,), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast back to the input dtype before the weight, as the HF implementation does.
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables ``[b, L, rotary_dim]`` for integer positions ``[b, L]`` (float32)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on the first ``rotary_dim`` features of ``x [b, L, heads, D]``.

  The remaining ``D - rotary_dim`` features pass through unchanged (partial rotary).
  """
  rotary_dim = cos.shape[-1]
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def as_4d_mask(mask: jax.Array) -> jax.Array:
  """Normalises a boolean attention mask to ``[b or 1, 1 or H, L, S]``."""
  if mask.ndim == 2:
    return mask[None, None]
  if mask.ndim == 3:
    return mask[:, None]
  if mask.ndim == 4:
    return mask
  raise ValueError(f"attention mask must have rank 2, 3 or 4, got shape {mask.shape}.")


def masked_gqa_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
  """Softmax attention with grouped kv heads and an explicit boolean mask.

  Args:
    q: ``[b, L, H, D]``; k, v: ``[b, S, K, D]`` with H a multiple of K.
    mask: boolean, broadcastable to ``[b, H, L, S]`` (True = may attend).
    scale: multiplier of the scores (1/sqrt(D) for these models).

  Returns:
    ``[b, L, H, D]`` in q's dtype. Scores and softmax are float32; a query row with no
    visible key returns zeros instead of NaN.
  """
  b, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  qg = q.reshape(b, length, kv_heads, groups, dim)
  scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * scale
  mask4 = as_4d_mask(mask)
  if mask4.shape[1] == 1:
    mask5 = mask4[:, :, None]  # [b, 1, 1, L, S]
  else:
    mask5 = mask4.reshape(mask4.shape[0], kv_heads, groups, length, -1)
  scores = jnp.where(mask5, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask5, probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, length, heads, dim).astype(q.dtype)


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))`` with ``[in, out]`` kernels."""

  def __init__(
      self,
      hidden: int,
      intermediate: int,
      *,
      param_dtype: Any,
      rngs: nnx.Rngs,
      mlp_axis: str = "mlp",
  ):
    self.gate = make_param(rngs, (hidden, intermediate), ("embed", mlp_axis), param_dtype)
    self.up = make_param(rngs, (hidden, intermediate), ("embed", mlp_axis), param_dtype)
    self.down = make_param(rngs, (intermediate, hidden), (mlp_axis, "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    g = x @ self.gate[...].astype(dtype)
    u = x @ self.up[...].astype(dtype)
    return (jax.nn.silu(g) * u) @ self.down[...].astype(dtype)


class LanguageModelHead:
  """Mixin for decoders with ``cfg.tie_word_embeddings``, ``embed [V, E]``, optional
  ``lm_head [E, V]`` and a ``hidden_states(ids, positions, mask)`` method."""

  def output_kernel(self) -> jax.Array:
    """The ``[E, V]`` output projection (the transposed embedding when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array, out_dtype: Any = jnp.float32) -> jax.Array:
    """Output projection of hidden states ``[..., E] -> [..., V]`` (float32 accumulation)."""
    kernel = self.output_kernel().astype(hidden.dtype)
    out = jnp.einsum("...e,ev->...v", hidden, kernel, preferred_element_type=jnp.float32).astype(
        out_dtype
    )
    if out.ndim == 3:
      # Keep [b, L, V] logits split over the batch axes (and vocab over tensor) on a mesh.
      out = sharding.constrain(out, ("batch", "length", "vocab"))
    return out

  def __call__(self, input_ids, positions, attention_mask, return_hidden: bool = False):
    """Logits ``[b, L, V]`` (float32), and the hidden states when ``return_hidden``."""
    hidden = self.hidden_states(input_ids, positions, attention_mask)
    out = self.logits(hidden)
    return (out, hidden) if return_hidden else out
