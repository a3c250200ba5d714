"""Synthetic LLaDA2 checkpoints (random weights, the real tensor names and config keys) and a
float64 NumPy forward of the same weights, written from docs/method.md §6 independently of the
Flax module."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def tiny_llada2_config(**overrides) -> dict:
  """A small ``config.json`` with the keys LLaDA2.0-mini's config has."""
  cfg = {
      "architectures": ["LLaDA2MoeModelLM"],
      "model_type": "llada2_moe",
      "vocab_size": 64,
      "hidden_size": 32,
      "num_hidden_layers": 3,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
      "head_dim": 12,
      "intermediate_size": 48,
      "moe_intermediate_size": 16,
      "num_experts": 8,
      "num_experts_per_tok": 2,
      "num_shared_experts": 1,
      "n_group": 4,
      "topk_group": 2,
      "routed_scaling_factor": 2.5,
      "norm_topk_prob": True,
      "score_function": "sigmoid",
      "moe_router_enable_expert_bias": True,
      "first_k_dense_replace": 1,
      "partial_rotary_factor": 0.5,
      "rope_theta": 600000.0,
      "rms_norm_eps": 1e-6,
      "use_qk_norm": True,
      "use_qkv_bias": False,
      "use_bias": False,
      "hidden_act": "silu",
      "tie_word_embeddings": False,
      "max_position_embeddings": 4096,
      "pad_token_id": 60,
      "eos_token_id": 61,
      "rope_scaling": None,
  }
  cfg.update(overrides)
  return cfg


def llada2_tensor_shapes(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF name -> (shape, kind) in layer order; kind is weight, norm, embed or bias."""
  h, e = cfg["hidden_size"], cfg["num_experts"]
  heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  mi, di = cfg["moe_intermediate_size"], cfg["intermediate_size"]
  out = {"model.word_embeddings.weight": ((cfg["vocab_size"], h), "embed")}

  def mlp(prefix, width):
    for name, shape in (("gate", (width, h)), ("up", (width, h)), ("down", (h, width))):
      out[f"{prefix}.{name}_proj.weight"] = (shape, "weight")

  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    out[f"{p}.input_layernorm.weight"] = ((h,), "norm")
    out[f"{p}.attention.query_key_value.weight"] = (((heads + 2 * kv) * d, h), "weight")
    if cfg.get("use_qkv_bias"):
      out[f"{p}.attention.query_key_value.bias"] = (((heads + 2 * kv) * d,), "weight")
    if cfg.get("use_qk_norm"):
      out[f"{p}.attention.query_layernorm.weight"] = ((d,), "norm")
      out[f"{p}.attention.key_layernorm.weight"] = ((d,), "norm")
    out[f"{p}.attention.dense.weight"] = ((h, heads * d), "weight")
    if cfg.get("use_bias"):
      out[f"{p}.attention.dense.bias"] = ((h,), "weight")
    out[f"{p}.post_attention_layernorm.weight"] = ((h,), "norm")
    if i < cfg["first_k_dense_replace"]:
      mlp(f"{p}.mlp", di)
      continue
    out[f"{p}.mlp.gate.weight"] = ((e, h), "weight")
    if cfg.get("moe_router_enable_expert_bias", True):
      out[f"{p}.mlp.gate.expert_bias"] = ((e,), "bias")
    for x in range(e):
      mlp(f"{p}.mlp.experts.{x}", mi)
    mlp(f"{p}.mlp.shared_experts", cfg["num_shared_experts"] * mi)
  out["model.norm.weight"] = ((h,), "norm")
  if not cfg.get("tie_word_embeddings"):
    out["lm_head.weight"] = ((cfg["vocab_size"], h), "weight")
  return out


def random_tensor(rng, shape, kind: str, scale: float = 0.2) -> np.ndarray:
  """Weights N(0, scale), embeddings N(0, 1), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
  noise = rng.standard_normal(shape, dtype=np.float32)
  if kind == "norm":
    return 1.0 + 0.1 * noise
  return {"embed": 1.0, "bias": 0.1}.get(kind, scale) * noise


def random_llada2_tensors(cfg: dict, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
  """Float32 tensors under the real LLaDA2 names, in layer order."""
  rng = np.random.default_rng(seed)
  return {
      name: random_tensor(rng, shape, kind, scale)
      for name, (shape, kind) in llada2_tensor_shapes(cfg).items()
  }


def write_checkpoint(
    out_dir: str, cfg: dict, tensors: dict[str, np.ndarray], num_shards: int = 3, dtype=np.float32
) -> None:
  """Writes config.json, ``num_shards`` safetensors files and their index."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  names = list(tensors)
  chunks = np.array_split(np.arange(len(names)), num_shards)
  weight_map = {}
  for s, idx in enumerate(chunks):
    fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    shard = {names[i]: np.ascontiguousarray(tensors[names[i]].astype(dtype)) for i in idx}
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


# ----------------------------------------------------------------------- NumPy reference


def np_rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def np_partial_rope(x, positions, rotary_dim, theta):
  """x [b, L, heads, D]; rotate-half on the first rotary_dim features only."""
  inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  ang = positions[..., None].astype(np.float64) * inv  # [b, L, r/2]
  cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
  half = rotary_dim // 2
  x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def np_fused_attention(x, qkv_w, qkv_b, q_norm, k_norm, dense_w, dense_b, positions, mask, cfg):
  """LLaDA2 attention from the fused HF weight; mask bool [b, L, L] (True = attend)."""
  b, length, _ = x.shape
  heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  fused = x @ qkv_w.T + (0 if qkv_b is None else qkv_b)
  q = fused[..., : heads * d].reshape(b, length, heads, d)
  k = fused[..., heads * d : (heads + kv) * d].reshape(b, length, kv, d)
  v = fused[..., (heads + kv) * d :].reshape(b, length, kv, d)
  if q_norm is not None:
    q, k = np_rms(q, q_norm, cfg["rms_norm_eps"]), np_rms(k, k_norm, cfg["rms_norm_eps"])
  rot = int(d * cfg["partial_rotary_factor"])
  q = np_partial_rope(q, positions, rot, cfg["rope_theta"])
  k = np_partial_rope(k, positions, rot, cfg["rope_theta"])
  k = np.repeat(k, heads // kv, axis=2)
  v = np.repeat(v, heads // kv, axis=2)
  scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(d)
  scores = np.where(mask[:, None], scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  p = np.exp(scores)
  p = p / p.sum(-1, keepdims=True)
  out = np.einsum("bhls,bshd->blhd", p, v).reshape(b, length, heads * d)
  return out @ dense_w.T + (0 if dense_b is None else dense_b)


def np_swiglu(x, gate, up, down):
  g = x @ gate.T
  return ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T


def np_route(x, gate_w, bias, cfg):
  """(weights [T, k], experts [T, k]) with the group-limited sigmoid rule, lowest index first
  on ties (stable sort of the negated scores)."""
  scores = 1 / (1 + np.exp(-(x @ gate_w.T)))
  biased = scores + (0 if bias is None else bias)
  t, e = scores.shape
  g = cfg["n_group"]
  grouped = np.sort(biased.reshape(t, g, e // g), axis=-1)[..., ::-1]
  group_scores = grouped[..., :2].sum(-1)
  kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg["topk_group"]]
  allowed = np.zeros((t, g), bool)
  np.put_along_axis(allowed, kept, True, axis=-1)
  cand = np.where(np.repeat(allowed, e // g, axis=-1), biased, -np.inf)
  experts = np.argsort(-cand, axis=-1, kind="stable")[:, : cfg["num_experts_per_tok"]]
  weights = np.take_along_axis(scores, experts, axis=-1)
  if cfg["norm_topk_prob"] and experts.shape[1] > 1:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg["routed_scaling_factor"], experts


def np_moe(x, t: dict, p: str, cfg):
  """x [T, H]: routed experts (one loop per token, clearly independent) + shared expert."""
  weights, experts = np_route(x, t[f"{p}.gate.weight"], t.get(f"{p}.gate.expert_bias"), cfg)
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    for w_, ex in zip(weights[n], experts[n]):
      q = f"{p}.experts.{ex}"
      out[n] += w_ * np_swiglu(
          x[n], t[f"{q}.gate_proj.weight"], t[f"{q}.up_proj.weight"], t[f"{q}.down_proj.weight"]
      )
  s = f"{p}.shared_experts"
  return out + np_swiglu(
      x, t[f"{s}.gate_proj.weight"], t[f"{s}.up_proj.weight"], t[f"{s}.down_proj.weight"]
  )


def np_llada2_logits(cfg: dict, tensors: dict[str, np.ndarray], ids, positions, mask):
  """float64 logits [b, L, V]; mask bool [b, L, L]."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  eps = cfg["rms_norm_eps"]
  x = t["model.word_embeddings.weight"][ids]
  b, length, h = x.shape
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    a = f"{p}.attention"
    x = x + np_fused_attention(
        np_rms(x, t[f"{p}.input_layernorm.weight"], eps),
        t[f"{a}.query_key_value.weight"],
        t.get(f"{a}.query_key_value.bias"),
        t.get(f"{a}.query_layernorm.weight"),
        t.get(f"{a}.key_layernorm.weight"),
        t[f"{a}.dense.weight"],
        t.get(f"{a}.dense.bias"),
        positions,
        mask,
        cfg,
    )
    y = np_rms(x, t[f"{p}.post_attention_layernorm.weight"], eps)
    if i < cfg["first_k_dense_replace"]:
      x = x + np_swiglu(
          y,
          t[f"{p}.mlp.gate_proj.weight"],
          t[f"{p}.mlp.up_proj.weight"],
          t[f"{p}.mlp.down_proj.weight"],
      )
    else:
      x = x + np_moe(y.reshape(-1, h), t, f"{p}.mlp", cfg).reshape(b, length, h)
  x = np_rms(x, t["model.norm.weight"], eps)
  head = (
      t["model.word_embeddings.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
  )
  return x @ head.T


def as_bf16(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The float32 values the bf16 rounding of each tensor represents."""
  return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
