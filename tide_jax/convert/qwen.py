"""The Qwen2/Qwen3 name map: HF ``*ForCausalLM`` tensors <-> :class:`DenseDecoder` state."""

from __future__ import annotations

from tide_jax.convert import name_map as nm
from tide_jax.models.config import DecoderConfig


def qwen_rules(cfg: DecoderConfig) -> list[nm.Rule]:
  """Rules for every tensor of a Qwen2/Qwen3 checkpoint with this config."""
  h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = "model.layers.{i}.self_attn"
  rules = [
      nm.Rule("model.embed_tokens.weight", "embed"),
      nm.Rule("model.norm.weight", "final_norm.weight"),
      nm.Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
      nm.Rule(
          "model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"
      ),
      nm.Rule(
          f"{attn}.q_proj.weight", "layers.{i}.attn.q", nm.linear_to_heads(h, d), nm.heads_to_linear
      ),
      nm.Rule(
          f"{attn}.k_proj.weight", "layers.{i}.attn.k", nm.linear_to_heads(k, d), nm.heads_to_linear
      ),
      nm.Rule(
          f"{attn}.v_proj.weight", "layers.{i}.attn.v", nm.linear_to_heads(k, d), nm.heads_to_linear
      ),
      nm.Rule(
          f"{attn}.o_proj.weight",
          "layers.{i}.attn.o",
          nm.out_linear_to_heads(h, d),
          nm.heads_to_out_linear,
      ),
      nm.Rule(
          "model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate", nm.transpose, nm.transpose
      ),
      nm.Rule(
          "model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up", nm.transpose, nm.transpose
      ),
      nm.Rule(
          "model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down", nm.transpose, nm.transpose
      ),
  ]
  if cfg.qkv_bias:
    rules += [
        nm.Rule(
            f"{attn}.q_proj.bias",
            "layers.{i}.attn.q_bias",
            nm.bias_to_heads(h, d),
            nm.heads_to_bias,
        ),
        nm.Rule(
            f"{attn}.k_proj.bias",
            "layers.{i}.attn.k_bias",
            nm.bias_to_heads(k, d),
            nm.heads_to_bias,
        ),
        nm.Rule(
            f"{attn}.v_proj.bias",
            "layers.{i}.attn.v_bias",
            nm.bias_to_heads(k, d),
            nm.heads_to_bias,
        ),
    ]
  if cfg.o_bias:
    rules.append(nm.Rule(f"{attn}.o_proj.bias", "layers.{i}.attn.o_bias"))
  if cfg.qk_norm:
    rules += [
        nm.Rule(f"{attn}.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
        nm.Rule(f"{attn}.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
    ]
  if not cfg.tie_word_embeddings:
    rules.append(nm.Rule("lm_head.weight", "lm_head", nm.transpose, nm.transpose))
  return rules


def qwen_ranges(cfg: DecoderConfig) -> dict[str, int]:
  return {"i": cfg.num_layers}
