"""The LLaDA2 name map: HF ``llada2_moe`` tensors <-> :class:`LLaDA2Model` state.

* ``attention.query_key_value.weight [(H + 2K) * D, E]`` is split, in (q, k, v) order, into
  the attention kernels ``q [E, H, D]``, ``k [E, K, D]``, ``v [E, K, D]`` (same for the bias).
* ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (one tensor per expert) are stacked into
  ``mlp.gate/up [E, H, I]`` and ``mlp.down [E, I, H]``.
* ``mlp.gate.weight [E, H]`` is the router (``mlp.router [H, E]``), ``mlp.gate.expert_bias``
  its choosing bias.
"""

from __future__ import annotations

from tide_jax.convert import name_map as nm
from tide_jax.models.llada2 import LLaDA2Config


def _mlp_rules(hf_prefix: str, flax_prefix: str) -> list[nm.Rule]:
  return [
      nm.Rule(
          f"{hf_prefix}.{name}_proj.weight", f"{flax_prefix}.{name}", nm.transpose, nm.transpose
      )
      for name in ("gate", "up", "down")
  ]


def llada2_rules(cfg: LLaDA2Config) -> list[nm.AnyRule]:
  """Rules for every tensor of an LLaDA2 checkpoint with this config.

  Placeholders: ``i`` dense layers, ``j`` MoE layers (both are absolute layer indices, see
  :func:`llada2_ranges`), ``e`` experts.
  """
  h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = "model.layers.{n}.attention"
  per_layer = [
      nm.Rule("model.layers.{n}.input_layernorm.weight", "layers.{n}.input_norm.weight"),
      nm.Rule(
          "model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.post_attn_norm.weight"
      ),
      nm.SplitRule(
          f"{attn}.query_key_value.weight",
          ("layers.{n}.attn.q", "layers.{n}.attn.k", "layers.{n}.attn.v"),
          nm.split_fused_heads((h, k, k), d),
          nm.fuse_heads,
      ),
      nm.Rule(
          f"{attn}.dense.weight",
          "layers.{n}.attn.o",
          nm.out_linear_to_heads(h, d),
          nm.heads_to_out_linear,
      ),
  ]
  if cfg.qkv_bias:
    per_layer.append(
        nm.SplitRule(
            f"{attn}.query_key_value.bias",
            ("layers.{n}.attn.q_bias", "layers.{n}.attn.k_bias", "layers.{n}.attn.v_bias"),
            nm.split_fused_bias((h, k, k), d),
            nm.fuse_bias,
        )
    )
  if cfg.o_bias:
    per_layer.append(nm.Rule(f"{attn}.dense.bias", "layers.{n}.attn.o_bias"))
  if cfg.qk_norm:
    per_layer += [
        nm.Rule(f"{attn}.query_layernorm.weight", "layers.{n}.attn.q_norm.weight"),
        nm.Rule(f"{attn}.key_layernorm.weight", "layers.{n}.attn.k_norm.weight"),
    ]
  rules: list[nm.AnyRule] = [
      nm.Rule("model.word_embeddings.weight", "embed"),
      nm.Rule("model.norm.weight", "final_norm.weight"),
  ]
  if not cfg.tie_word_embeddings:
    rules.append(nm.Rule("lm_head.weight", "lm_head", nm.transpose, nm.transpose))
  rules += [_with_layer(r, "all") for r in per_layer]
  rules += _mlp_rules("model.layers.{dense}.mlp", "layers.{dense}.mlp")
  moe_hf, moe_fx = "model.layers.{moe}.mlp", "layers.{moe}.mlp"
  rules.append(nm.Rule(f"{moe_hf}.gate.weight", f"{moe_fx}.router", nm.transpose, nm.transpose))
  if cfg.use_expert_bias:
    rules.append(nm.Rule(f"{moe_hf}.gate.expert_bias", f"{moe_fx}.expert_bias"))
  rules += [
      nm.StackedRule(
          f"{moe_hf}.experts.{{e}}.{name}_proj.weight",
          f"{moe_fx}.{name}",
          "e",
          nm.transpose,
          nm.transpose,
      )
      for name in ("gate", "up", "down")
  ]
  if cfg.num_shared_experts:
    rules += _mlp_rules(f"{moe_hf}.shared_experts", f"{moe_fx}.shared")
  return rules


def _with_layer(rule: nm.AnyRule, name: str) -> nm.AnyRule:
  """Renames the ``{n}`` layer placeholder of a per-layer rule to ``{name}``."""
  sub = lambda s: s.replace("{n}", "{" + name + "}")
  if isinstance(rule, nm.SplitRule):
    return nm.SplitRule(sub(rule.hf), tuple(sub(p) for p in rule.flax), rule.to_flax, rule.to_hf)
  return nm.Rule(sub(rule.hf), sub(rule.flax), rule.to_flax, rule.to_hf)


def llada2_ranges(cfg: LLaDA2Config) -> dict[str, range]:
  """Placeholder values: all layers, the dense-MLP layers, the MoE layers, the experts."""
  first_moe = min(cfg.first_k_dense_replace, cfg.num_layers)
  return {
      "all": range(cfg.num_layers),
      "dense": range(first_moe),
      "moe": range(first_moe, cfg.num_layers),
      "e": range(cfg.num_experts),
  }
