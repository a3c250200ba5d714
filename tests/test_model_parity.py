"""HF parity of the dense decoder: tiny random Qwen3/Qwen2 models, causal and BD3LM masks.

Tolerance: float32 logits within 1e-4 max-abs of the PyTorch model.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.hf_fixtures import tiny_qwen
from tide_jax.convert import hf_checkpoint
from tide_jax.diffusion.masks import bd3lm_attention_mask, causal_attention_mask

TOL = 1e-4
CASES = [("qwen3", True), ("qwen3", False), ("qwen2", True), ("qwen2", False)]


def torch_logits(model, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Runs the HF model with an explicit boolean 4D mask [b, 1, L, L]."""
  mask4 = torch.from_numpy(np.broadcast_to(mask, (ids.shape[0], 1) + mask.shape[-2:]).copy())
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids).long(),
        position_ids=torch.from_numpy(positions).long(),
        attention_mask=mask4,
    )
  return out.logits.float().numpy()


def flax_logits(model, ids, positions, mask) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.mark.parametrize("model_type,tied", CASES)
def test_logits_match_transformers_causal_and_bd3lm(tmp_path, model_type, tied):
  hf_dir = str(tmp_path / "hf")
  hf_model = tiny_qwen(model_type, hf_dir, tied=tied)
  model = hf_checkpoint.load_dense_from_hf(hf_dir)
  assert model.cfg.head_dim == (24 if model_type == "qwen3" else 8)
  rng = np.random.default_rng(0)
  b, length, block = 2, 16, 4
  ids = rng.integers(0, 97, size=(b, length)).astype(np.int32)
  pos = np.broadcast_to(np.arange(length), (b, length)).astype(np.int32)
  causal = causal_attention_mask(length)
  ref = torch_logits(hf_model, ids, pos, causal)
  got = flax_logits(model, ids, pos, causal)
  assert np.max(np.abs(ref - got)) < TOL

  # BD3LM: [x_t ; x_0] with position ids 0..L-1 repeated for both halves.
  x_t = np.where(rng.random((b, length)) < 0.5, 96, ids).astype(np.int32)
  both = np.concatenate([x_t, ids], axis=1)
  pos2 = np.concatenate([pos, pos], axis=1)
  mask = bd3lm_attention_mask(length, block)
  ref = torch_logits(hf_model, both, pos2, mask)
  got = flax_logits(model, both, pos2, mask)
  assert np.max(np.abs(ref - got)) < TOL


@pytest.mark.parametrize("model_type,tied", CASES)
def test_round_trip_flax_to_hf(tmp_path, model_type, tied):
  hf_dir = str(tmp_path / "hf")
  tiny_qwen(model_type, hf_dir, tied=tied, seed=1)
  model = hf_checkpoint.load_dense_from_hf(hf_dir)
  out_dir = str(tmp_path / "exported")
  # A tiny shard limit forces the sharded layout with an index file.
  hf_checkpoint.save_dense_as_hf(model, out_dir, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  reloaded.eval()
  ids = np.arange(12, dtype=np.int32).reshape(1, 12) % 97
  pos = np.arange(12, dtype=np.int32)[None]
  causal = causal_attention_mask(12)
  np.testing.assert_array_equal(
      torch_logits(reloaded, ids, pos, causal), torch_logits(reloaded, ids, pos, causal)
  )
  assert (
      np.max(
          np.abs(torch_logits(reloaded, ids, pos, causal) - flax_logits(model, ids, pos, causal))
      )
      < TOL
  )
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
