"""Tiny random HF models saved with ``save_pretrained`` for parity tests."""

from __future__ import annotations

import torch
import transformers


def tiny_qwen(
    model_type: str,
    out_dir: str,
    *,
    tied: bool,
    head_dim: int = 24,
    vocab: int = 97,
    seed: int = 0,
    num_layers: int = 2,
) -> transformers.PreTrainedModel:
  """A random Qwen3/Qwen2 CausalLM with GQA (2 kv heads) and head_dim != hidden/heads."""
  torch.manual_seed(seed)
  common = dict(
      vocab_size=vocab,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=num_layers,
      num_attention_heads=4,
      num_key_value_heads=2,
      rms_norm_eps=1e-6,
      tie_word_embeddings=tied,
      max_position_embeddings=256,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
  )
  if model_type == "qwen3":
    config = transformers.Qwen3Config(head_dim=head_dim, **common)
    model = transformers.Qwen3ForCausalLM(config)
  elif model_type == "qwen2":
    config = transformers.Qwen2Config(**common)
    model = transformers.Qwen2ForCausalLM(config)
  else:
    raise ValueError(model_type)
  # Random (non-unit) norm weights and biases so that every tensor matters in the parity check.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out_dir)
  return model
