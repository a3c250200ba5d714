"""LLaDA2 mixture-of-experts dLLM (``model_type`` llada2_moe) in Flax NNX.

Architecture (docs/method.md §6): word embeddings -> layers of
``RMSNorm -> attention -> residual -> RMSNorm -> (dense SwiGLU | MoE) -> residual`` ->
RMSNorm -> untied (or tied) output projection. Attention has a fused QKV projection in the
checkpoint (split into q, k, v by the converter), per-head q/k RMSNorm, partial rotary
(only the first ``head_dim * partial_rotary_factor`` features rotate) and takes an explicit
mask (the teacher is bidirectional; padding is masked out by the caller). Layers with index
< ``first_k_dense_replace`` use a dense SwiGLU, the others :class:`tide_jax.models.moe.MoEBlock`.

The call signature mirrors :class:`tide_jax.models.dense.DenseDecoder`
(``hidden_states`` / ``logits`` / ``__call__(input_ids, positions, attention_mask)``), so the
training code treats both teachers alike. The attention module *is* the dense decoder's:
:class:`LLaDA2Config` exposes the same attention fields as ``DecoderConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from tide_jax.models import dense, layers, moe
from tide_jax.models.config import (
    _rope_settings,
    check_attention_impl,
    remat_policy_name,
    resolve_dtype,
)
from tide_jax.parallel import sharding

MODEL_TYPE = "llada2_moe"

# Keys that change the computation and have no safe default.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "num_shared_experts",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "first_k_dense_replace",
    "rms_norm_eps",
    "use_qk_norm",
)


@dataclasses.dataclass(frozen=True)
class LLaDA2Config:
  """Shape and numerics of an LLaDA2 MoE model (every size from its config.json)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  moe_intermediate_size: int
  num_experts: int
  num_experts_per_tok: int
  num_shared_experts: int
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  norm_topk_prob: bool
  first_k_dense_replace: int
  partial_rotary_factor: float
  rope_theta: float
  rms_norm_eps: float
  qk_norm: bool
  qkv_bias: bool
  o_bias: bool
  use_expert_bias: bool
  tie_word_embeddings: bool
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  model_type: str = MODEL_TYPE
  param_dtype: str = "float32"
  dtype: str = "float32"
  moe_dispatch: str = "auto"
  # A mesh with an expert axis > 1 makes the MoE layers expert-parallel (tokens move).
  expert_mesh: Any = None
  remat: str = "none"  # a config.REMAT_POLICIES name; True / False read as "full" / "none"
  attention_impl: str = "xla"  # a config.ATTENTION_IMPLS name

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy_name(self.remat))
    check_attention_impl(self.attention_impl)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def router(self) -> moe.RouterConfig:
    return moe.RouterConfig(
        self.num_experts,
        self.num_experts_per_tok,
        self.n_group,
        self.topk_group,
        self.routed_scaling_factor,
        self.norm_topk_prob,
    )

  def is_moe_layer(self, index: int) -> bool:
    return index >= self.first_k_dense_replace

  def replace(self, **changes) -> "LLaDA2Config":
    return dataclasses.replace(self, **changes)

  def with_dtypes(self, param_dtype: str, dtype: str) -> "LLaDA2Config":
    resolve_dtype(param_dtype)
    resolve_dtype(dtype)
    return dataclasses.replace(self, param_dtype=param_dtype, dtype=dtype)


def llada2_config_from_hf(
    hf: Mapping[str, Any], *, param_dtype: str = "float32", dtype: str = "float32"
) -> LLaDA2Config:
  """Builds an :class:`LLaDA2Config` from a parsed ``config.json``.

  Raises:
    ValueError: wrong ``model_type``, any missing required key (all listed in one message),
      or an unsupported feature (non-sigmoid router, non-silu activation).
  """
  if hf.get("model_type") != MODEL_TYPE:
    raise ValueError(
        f"config.json has model_type={hf.get('model_type')!r}, expected "
        f"{MODEL_TYPE!r} for the LLaDA2 teacher."
    )
  missing = [k for k in REQUIRED_KEYS if k not in hf]
  if hf.get("rotary_dim") is None and "partial_rotary_factor" not in hf:
    missing.append("partial_rotary_factor")
  if "rope_theta" not in hf and "rope_theta" not in (hf.get("rope_parameters") or {}):
    missing.append("rope_theta")
  if missing:
    raise ValueError(
        f"config.json of the LLaDA2 model lacks required keys: "
        f"{', '.join(missing)}; use the config.json shipped with the checkpoint."
    )
  score_function = hf.get("score_function", "sigmoid")
  if score_function != "sigmoid":
    raise ValueError(
        f"Only the sigmoid router is implemented; config.json has "
        f"score_function={score_function!r}."
    )
  unsupported = [k for k in ("norm_head", "use_sliding_window") if hf.get(k)]
  if unsupported:
    raise ValueError(
        f"config.json enables {', '.join(unsupported)}, which the LLaDA2 module "
        "does not implement; set them to false only if the weights allow it."
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(
        f"Only SwiGLU (silu) MLPs are implemented; config.json has "
        f"hidden_act={hf.get('hidden_act')!r}."
    )
  theta, _ = _rope_settings(hf)
  heads = int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
  # An explicit rotary_dim (some configs carry one) wins over the factor.
  partial = (
      int(hf["rotary_dim"]) / head_dim
      if hf.get("rotary_dim") is not None
      else float(hf["partial_rotary_factor"])
  )
  eos = hf.get("eos_token_id")
  return LLaDA2Config(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf["num_key_value_heads"]),
      head_dim=head_dim,
      intermediate_size=int(hf["intermediate_size"]),
      moe_intermediate_size=int(hf["moe_intermediate_size"]),
      num_experts=int(hf["num_experts"]),
      num_experts_per_tok=int(hf["num_experts_per_tok"]),
      num_shared_experts=int(hf["num_shared_experts"] or 0),
      n_group=int(hf["n_group"]),
      topk_group=int(hf["topk_group"]),
      routed_scaling_factor=float(hf["routed_scaling_factor"]),
      norm_topk_prob=bool(hf["norm_topk_prob"]),
      first_k_dense_replace=int(hf["first_k_dense_replace"]),
      partial_rotary_factor=partial,
      rope_theta=theta,
      rms_norm_eps=float(hf["rms_norm_eps"]),
      qk_norm=bool(hf["use_qk_norm"]),
      qkv_bias=bool(hf.get("use_qkv_bias", False)),
      o_bias=bool(hf.get("use_bias", False)),
      use_expert_bias=bool(hf.get("moe_router_enable_expert_bias", True)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      pad_token_id=hf.get("pad_token_id"),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
      param_dtype=param_dtype,
      dtype=dtype,
  )


class LLaDA2Layer(nnx.Module):
  """Pre-norm layer; the MLP is dense for the first ``first_k_dense_replace`` layers."""

  def __init__(self, cfg: LLaDA2Config, index: int, *, rngs: nnx.Rngs):
    pd = resolve_dtype(cfg.param_dtype)
    self.input_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    # cfg has the attention fields of DecoderConfig, so the dense decoder's attention serves.
    self.attn = dense.Attention(cfg, rngs=rngs)
    self.post_attn_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    if cfg.is_moe_layer(index):
      self.mlp = moe.MoEBlock(
          cfg.hidden_size,
          cfg.moe_intermediate_size,
          cfg.num_shared_experts,
          cfg.router,
          use_expert_bias=cfg.use_expert_bias,
          param_dtype=pd,
          rngs=rngs,
          dispatch=cfg.moe_dispatch,
          mesh=cfg.expert_mesh,
      )
    else:
      self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, param_dtype=pd, rngs=rngs)

  def __call__(self, x, cos, sin, mask):
    attn_out, _ = self.attn(self.input_norm(x), cos, sin, mask)
    x = x + attn_out
    return x + self.mlp(self.post_attn_norm(x))


class LLaDA2Model(layers.LanguageModelHead, nnx.Module):
  """LLaDA2 MoE: ``embed [V, E]``, ``layers``, ``final_norm``, ``lm_head [E, V]``."""

  def __init__(self, cfg: LLaDA2Config, *, rngs: nnx.Rngs):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(
          f"num_attention_heads {cfg.num_heads} is not a multiple of "
          f"num_key_value_heads {cfg.num_kv_heads}."
      )
    pd = resolve_dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = layers.make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([LLaDA2Layer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(
        cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs, axis_name="embed"
    )
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.make_param(
          rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd
      )

  def hidden_states(
      self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array
  ) -> jax.Array:
    """Final-norm hidden states ``[b, L, E]``.

    Args:
      input_ids: int ``[b, L]``.
      positions: int ``[b, L]`` RoPE positions.
      attention_mask: bool ``[L, L]``, ``[b, L, L]`` or ``[b, 1|H, L, L]`` (True = attend).
    """
    dtype = resolve_dtype(self.cfg.dtype)
    x = sharding.constrain(
        jnp.take(self.embed[...], input_ids, axis=0).astype(dtype), dense.ACTIVATION_AXES
    )
    cos, sin = layers.rope_tables(positions, self.cfg.rotary_dim, self.cfg.rope_theta)
    # Closed over, not passed to remat: a static (NumPy) mask must stay static.
    mask = layers.as_4d_mask(attention_mask)
    run_layer = layers.maybe_remat(lambda lyr, h, c, s: lyr(h, c, s, mask), self.cfg.remat)
    for layer in self.layers:
      x = run_layer(layer, x, cos, sin)
      x = sharding.constrain(x, dense.ACTIVATION_AXES)
    return self.final_norm(x)


def abstract_llada2(cfg: LLaDA2Config) -> LLaDA2Model:
  """The model with ShapeDtypeStruct leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: LLaDA2Model(cfg, rngs=nnx.Rngs(params=0)))
