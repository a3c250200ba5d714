"""HF parity of the dense decoder: tiny random Qwen3/Qwen2 models, causal and BD3LM masks.

The reference is transformers with eager attention and an additive float mask (a boolean
mask is only right under SDPA). Configurations cover RoPE bases 1e4 and 1e6, multi-head
and 4:1 grouped-query attention, Qwen2 with a head_dim decoupled from hidden/heads,
rms_norm_eps 1e-5 and 1e-6, and config.json files with a partial_rotary_factor (which
transformers ignores for these families). Sequences run past position 128, and at
positions beyond 30,000; BD3LM masks use block sizes 4 and 8.

Tolerance: float32 logits within 1e-4 max-abs of the PyTorch model.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from tests.hf_fixtures import tiny_qwen, torch_logits
from tide_jax.convert import hf_checkpoint
from tide_jax.diffusion.masks import bd3lm_attention_mask, causal_attention_mask

TOL = 1e-4
CASES = [("qwen3", True), ("qwen3", False), ("qwen2", True), ("qwen2", False)]
# name -> tiny_qwen arguments
CONFIGS = {
    "qwen3_gqa4_theta1e6_eps1e-5": dict(
        model_type="qwen3",
        tied=True,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
    ),
    "qwen3_mha_theta1e4": dict(
        model_type="qwen3", tied=False, num_heads=4, num_kv_heads=4, rope_theta=1e4
    ),
    "qwen2_decoupled_head_dim_theta1e6": dict(
        model_type="qwen2", tied=True, qwen2_head_dim=12, rope_theta=1e6
    ),
    "qwen2_mha_theta1e4_eps1e-5": dict(
        model_type="qwen2",
        tied=False,
        num_heads=4,
        num_kv_heads=4,
        rope_theta=1e4,
        rms_norm_eps=1e-5,
    ),
    "qwen3_partial_rotary_in_config": dict(
        model_type="qwen3", tied=False, head_dim=16, partial_rotary_factor=0.5
    ),
    "qwen2_partial_rotary_in_config": dict(
        model_type="qwen2", tied=True, qwen2_head_dim=16, partial_rotary_factor=0.5
    ),
}


def flax_logits(model, ids, positions, mask) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


def max_error(hf_model, model, ids, positions, mask) -> float:
  ref = torch_logits(hf_model, ids, positions, mask)
  return float(np.max(np.abs(ref - flax_logits(model, ids, positions, mask))))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_eager_with_additive_mask(tmp_path, name):
  args = dict(CONFIGS[name])
  hf_dir = str(tmp_path / "hf")
  hf_model = tiny_qwen(
      args.pop("model_type"),
      hf_dir,
      tied=args.pop("tied"),
      max_position_embeddings=40960,
      attn_implementation="eager",
      **args,
  )
  assert hf_model.config._attn_implementation == "eager"
  model = hf_checkpoint.load_dense_from_hf(hf_dir)
  hf_config = hf_model.config
  assert model.cfg.head_dim == hf_model.model.layers[0].self_attn.head_dim
  assert model.cfg.rotary_dim == 2 * hf_model.model.rotary_emb.inv_freq.shape[0]
  assert model.cfg.num_kv_heads == hf_config.num_key_value_heads
  rng = np.random.default_rng(0)
  b, length = 2, 144  # past position 128; a multiple of both block sizes
  ids = rng.integers(0, 96, size=(b, length)).astype(np.int32)
  pos = np.broadcast_to(np.arange(length), (b, length)).astype(np.int32)
  assert max_error(hf_model, model, ids, pos, causal_attention_mask(length)) < TOL
  far = pos + 30_000  # positions beyond 30,000 (RoPE angles of ~3e4 radians)
  assert max_error(hf_model, model, ids, far, causal_attention_mask(length)) < TOL

  # BD3LM: [x_t ; x_0] with position ids 0..L-1 repeated for both halves.
  x_t = np.where(rng.random((b, length)) < 0.5, 96, ids).astype(np.int32)
  both = np.concatenate([x_t, ids], axis=1)
  pos2 = np.concatenate([pos, pos], axis=1)
  for block in (4, 8):
    mask = bd3lm_attention_mask(length, block)
    assert max_error(hf_model, model, both, pos2, mask) < TOL, block
    assert max_error(hf_model, model, both, pos2 + 30_000, mask) < TOL, block


@pytest.mark.parametrize("model_type,tied", CASES)
def test_round_trip_flax_to_hf(tmp_path, model_type, tied):
  hf_dir = str(tmp_path / "hf")
  tiny_qwen(model_type, hf_dir, tied=tied, seed=1)
  model = hf_checkpoint.load_dense_from_hf(hf_dir)
  out_dir = str(tmp_path / "exported")
  # A tiny shard limit forces the sharded layout with an index file.
  hf_checkpoint.save_dense_as_hf(model, out_dir, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, dtype="float32", attn_implementation="eager"
  ).eval()
  ids = np.arange(12, dtype=np.int32).reshape(1, 12) % 97
  pos = np.arange(12, dtype=np.int32)[None]
  causal = causal_attention_mask(12)
  np.testing.assert_array_equal(
      torch_logits(reloaded, ids, pos, causal), torch_logits(reloaded, ids, pos, causal)
  )
  assert max_error(reloaded, model, ids, pos, causal) < TOL
  # And back into Flax: bit-identical parameters give identical logits.
  again = hf_checkpoint.load_dense_from_hf(out_dir)
  np.testing.assert_array_equal(
      flax_logits(again, ids, pos, causal), flax_logits(model, ids, pos, causal)
  )


def test_bfloat16_compute_is_close_to_float32(tmp_path):
  hf_dir = str(tmp_path / "hf")
  tiny_qwen("qwen3", hf_dir, tied=False)
  f32 = hf_checkpoint.load_dense_from_hf(hf_dir)
  bf16 = hf_checkpoint.load_dense_from_hf(hf_dir, param_dtype="bfloat16", dtype="bfloat16")
  assert bf16.embed[...].dtype == jnp.bfloat16
  ids = np.arange(16, dtype=np.int32).reshape(1, 16)
  pos = ids.copy()
  mask = causal_attention_mask(16)
  a, b = flax_logits(f32, ids, pos, mask), flax_logits(bf16, ids, pos, mask)
  # bfloat16 keeps 8 mantissa bits: relative error ~1e-2 on logits of magnitude ~1.
  assert np.max(np.abs(a - b)) < 0.1 * max(1.0, np.max(np.abs(a)))


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
  from safetensors.numpy import load_file, save_file

  hf_dir = str(tmp_path / "hf")
  tiny_qwen("qwen3", hf_dir, tied=False)
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  tensors.pop("model.layers.1.mlp.up_proj.weight")
  tensors["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError) as err:
    hf_checkpoint.load_dense_from_hf(hf_dir)
  msg = str(err.value)
  assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected tensors: model.layers.9.extra.weight" in msg


def test_nonexistent_and_unsupported_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_checkpoint.load_dense_from_hf(str(tmp_path / "nope"))
  bad = tmp_path / "llama"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
  with pytest.raises(ValueError, match="Unsupported architecture model_type='llama'"):
    hf_checkpoint.load_dense_from_hf(str(bad))


def _fields_transformers_reads(model_type: str) -> set[str]:
  """Config attributes the transformers modeling file of ``model_type`` reads."""
  import importlib
  import inspect
  import re

  module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
  source = inspect.getsource(module)
  names = set(re.findall(r"\bconfig\.([a-z][a-z_]*)", source))
  names |= set(re.findall(r"getattr\(config, \"([a-z][a-z_]*)\"", source))
  return names


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_saved_config_holds_every_field_transformers_reads(tmp_path, model_type):
  # Qwen2 with head_dim (12) != hidden_size / heads (8): transformers needs head_dim written.
  hf_dir = str(tmp_path / "hf")
  tiny_qwen(model_type, hf_dir, tied=False, head_dim=12, qwen2_head_dim=12)
  model = hf_checkpoint.load_dense_from_hf(hf_dir)
  assert model.cfg.head_dim == 12
  out_dir = str(tmp_path / "exported")
  hf_checkpoint.save_dense_as_hf(model, out_dir)
  written = json.load(open(os.path.join(out_dir, "config.json")))
  wanted = _fields_transformers_reads(model_type)
  assert {"head_dim", "rope_parameters", "num_key_value_heads"} <= wanted
  assert sorted(wanted - set(written)) == []
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, dtype="float32", attn_implementation="eager"
  ).eval()
  assert reloaded.model.layers[0].self_attn.head_dim == 12
  ids = (np.arange(20, dtype=np.int32).reshape(1, 20) * 7) % 97
  pos = np.arange(20, dtype=np.int32)[None]
  assert max_error(reloaded, model, ids, pos, causal_attention_mask(20)) < TOL


def test_a_config_that_does_not_fit_the_tensors_names_the_tensor(tmp_path):
  from tide_jax.convert import qwen, streaming
  from tide_jax.convert.safetensors_io import SafetensorsCheckpoint
  from tide_jax.models import config as mcfg
  from tide_jax.models import dense

  hf_dir = tmp_path / "hf"
  tiny_qwen("qwen2", str(hf_dir), tied=True, qwen2_head_dim=12)
  config = json.loads((hf_dir / "config.json").read_text())
  del config["head_dim"]  # transformers and tide_jax then assume 32 / 4 = 8
  (hf_dir / "config.json").write_text(json.dumps(config))
  expected = (
      r"model\.layers\.0\.self_attn\.q_proj\.weight shape \(48, 32\) has 48 rows, expected 32 "
      r"= 4 heads x head_dim 8"
  )
  with pytest.raises(ValueError, match=expected):
    hf_checkpoint.load_dense_from_hf(str(hf_dir))
  cfg = mcfg.decoder_config_from_hf(config)
  with pytest.raises(
      ValueError, match=r"Tensor model\.layers\.0\.self_attn\.[qkv]_proj\.(weight|bias)"
  ):
    streaming.stream_convert(
        dense.abstract_decoder(cfg),
        SafetensorsCheckpoint(str(hf_dir)),
        qwen.qwen_rules(cfg),
        qwen.qwen_ranges(cfg),
        str(tmp_path / "converted"),
    )
