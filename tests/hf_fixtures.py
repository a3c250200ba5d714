"""Tiny random HF models saved with ``save_pretrained`` for parity tests."""

from __future__ import annotations

import numpy as np
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
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 256,
    qwen2_head_dim: int | None = None,
    attn_implementation: str = "sdpa",
    **extra_config,
) -> transformers.PreTrainedModel:
  """A random Qwen3/Qwen2 CausalLM, by default with GQA (2 kv heads) and, for Qwen3,
  head_dim != hidden/heads; Qwen2 takes ``qwen2_head_dim`` to decouple it too.

  ``attn_implementation="eager"`` makes the returned model add the mask to its scores, the
  reference computation (see :func:`torch_logits`); ``extra_config`` goes to the HF config
  (e.g. partial_rotary_factor).
  """
  torch.manual_seed(seed)
  common = dict(
      vocab_size=vocab,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=num_layers,
      num_attention_heads=num_heads,
      num_key_value_heads=num_kv_heads,
      rms_norm_eps=rms_norm_eps,
      tie_word_embeddings=tied,
      max_position_embeddings=max_position_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
      attn_implementation=attn_implementation,
      **extra_config,
  )
  if model_type == "qwen3":
    config = transformers.Qwen3Config(head_dim=head_dim, **common)
    model = transformers.Qwen3ForCausalLM(config)
  elif model_type == "qwen2":
    if qwen2_head_dim is not None:
      common["head_dim"] = qwen2_head_dim
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


def torch_logits(model, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Runs an HF model on explicit position ids and a boolean mask ``[L, S]`` or ``[b, L, S]``.

  The mask goes in as an additive float mask ``[b, 1, L, S]`` (0 where attending, the
  dtype's minimum elsewhere), which is right for every attention implementation; a
  boolean mask is only interpreted correctly by SDPA (eager attention would add it).
  """
  allowed = np.broadcast_to(mask, (ids.shape[0], 1) + mask.shape[-2:])
  additive = torch.zeros(allowed.shape, dtype=torch.float32)
  additive[~torch.from_numpy(allowed.copy())] = torch.finfo(torch.float32).min
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids).long(),
        position_ids=torch.from_numpy(positions).long(),
        attention_mask=additive,
    )
  return out.logits.float().numpy()
