"""The real Qwen3-0.6B and Qwen3-8B configs build abstractly with the published sizes."""

import pytest

from tide_jax.models import config as mcfg
from tide_jax.models import dense

# Values from the published config.json files of Qwen/Qwen3-0.6B and Qwen/Qwen3-8B.
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_8B = dict(
    QWEN3_0_6B,
    hidden_size=4096,
    intermediate_size=12288,
    num_attention_heads=32,
    num_hidden_layers=36,
    max_window_layers=36,
    tie_word_embeddings=False,
)


def expected_count(c) -> int:
  e, h, k, d, i, v, n = (
      c["hidden_size"],
      c["num_attention_heads"],
      c["num_key_value_heads"],
      c["head_dim"],
      c["intermediate_size"],
      c["vocab_size"],
      c["num_hidden_layers"],
  )
  per_layer = e * h * d + 2 * e * k * d + h * d * e + 2 * d + 3 * e * i + 2 * e
  return v * e + n * per_layer + e + (0 if c["tie_word_embeddings"] else e * v)


# Model cards: Qwen3-0.6B has 0.6B parameters (0.44B non-embedding), Qwen3-8B 8.2B (6.95B).
@pytest.mark.parametrize(
    "hf,total_b,non_embedding_b", [(QWEN3_0_6B, 0.6, 0.44), (QWEN3_8B, 8.2, 6.95)]
)
def test_real_configs_build_abstractly_with_published_counts(hf, total_b, non_embedding_b):
  cfg = mcfg.decoder_config_from_hf(hf)
  assert cfg.head_dim == 128 and cfg.rope_theta == 1e6 and cfg.qk_norm and not cfg.qkv_bias
  model = dense.abstract_decoder(cfg)
  n = dense.count_params(model)
  assert n == expected_count(hf)
  embedding = hf["vocab_size"] * hf["hidden_size"] * (1 if hf["tie_word_embeddings"] else 2)
  assert round(n / 1e9, 1) == total_b
  assert round((n - embedding) / 1e9, 2) == non_embedding_b


def test_rope_base_read_from_rope_parameters_or_rope_theta():
  newer = dict(QWEN3_0_6B, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  newer.pop("rope_theta")
  assert mcfg.decoder_config_from_hf(newer).rope_theta == 5e5
  assert mcfg.decoder_config_from_hf(QWEN3_0_6B).rope_theta == 1e6


def test_config_errors_are_one_sentence():
  with pytest.raises(ValueError, match="lacks required keys: hidden_size"):
    mcfg.decoder_config_from_hf({k: v for k, v in QWEN3_0_6B.items() if k != "hidden_size"})
  with pytest.raises(ValueError, match="Sliding-window attention is not supported"):
    mcfg.decoder_config_from_hf(dict(QWEN3_0_6B, use_sliding_window=True))
  with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
    mcfg.decoder_config_from_hf(dict(QWEN3_0_6B, rope_scaling={"rope_type": "yarn", "factor": 4}))


def test_partial_rotary_factor_follows_transformers_for_qwen_families():
  # transformers' Qwen2/Qwen3 rotate the whole head whatever partial_rotary_factor says.
  for layout in (
      dict(QWEN3_0_6B, partial_rotary_factor=0.5),
      dict(QWEN3_0_6B, rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.5}),
  ):
    cfg = mcfg.decoder_config_from_hf(layout)
    assert cfg.rotary_dim == cfg.head_dim == 128
  # A model that rotates part of each head has no transformers Qwen equivalent to export to.
  partial = mcfg.decoder_config_from_hf(QWEN3_0_6B).replace(partial_rotary_factor=0.5)
  with pytest.raises(ValueError, match="rotates only part of each head.*cannot be exported"):
    partial.to_hf_dict()
  no_bias_qwen2 = mcfg.decoder_config_from_hf(dict(QWEN3_0_6B, model_type="qwen2")).replace(
      qkv_bias=False
  )
  with pytest.raises(ValueError, match="qkv_bias=False and o_bias=False has no Qwen2ForCausalLM"):
    no_bias_qwen2.to_hf_dict()
