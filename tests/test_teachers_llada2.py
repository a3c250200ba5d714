"""LLaDA2 teacher: fused-QKV partial-rotary attention vs NumPy, a synthetic sharded checkpoint
converted by streaming vs a float64 NumPy forward, and the errors a user can cause.

Tolerances: attention 1e-5, logits 1e-4 max-abs (float32 compute; weights of O(1) logits).
"""

import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from configs import common
from tests import teachers_fixtures as tf
from tide_jax.convert import llada2 as llada2_map
from tide_jax.convert import name_map as nm
from tide_jax import teachers
from tide_jax.models import dense, layers, llada2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fused_qkv_partial_rotary_attention_matches_numpy():
  hf = tf.tiny_llada2_config(use_qkv_bias=True, use_bias=True)
  cfg = llada2.llada2_config_from_hf(hf)
  assert cfg.rotary_dim == 6 and cfg.head_dim == 12
  tensors = tf.random_llada2_tensors(hf, seed=1)
  p = "model.layers.0.attention"
  sources, _ = nm.expand_sources(llada2_map.llada2_rules(cfg), llada2_map.llada2_ranges(cfg))
  attn = dense.Attention(cfg, rngs=nnx.Rngs(params=0))
  for name in (
      f"{p}.query_key_value.weight",
      f"{p}.query_key_value.bias",
      f"{p}.dense.weight",
      f"{p}.dense.bias",
      f"{p}.query_layernorm.weight",
      f"{p}.key_layernorm.weight",
  ):
    src = sources[name]
    for path, value in zip(src.paths, src.convert(tensors[name])):
      node = attn
      for key in path[3:-1]:
        node = getattr(node, key)
      getattr(node, path[-1])[...] = jnp.asarray(value)
  rng = np.random.default_rng(0)
  b, length = 2, 9
  x = rng.standard_normal((b, length, hf["hidden_size"])).astype(np.float32)
  positions = np.stack([np.arange(length), np.arange(length) + 5])
  valid = np.ones((b, length), bool)
  valid[1, 6:] = False
  mask = valid[:, None, :] & np.ones((b, length, 1), bool)
  cos, sin = layers.rope_tables(jnp.asarray(positions), cfg.rotary_dim, cfg.rope_theta)
  got, _ = attn(jnp.asarray(x), cos, sin, jnp.asarray(mask[:, None]))
  ref = tf.np_fused_attention(
      x.astype(np.float64),
      tensors[f"{p}.query_key_value.weight"],
      tensors[f"{p}.query_key_value.bias"],
      tensors[f"{p}.query_layernorm.weight"],
      tensors[f"{p}.key_layernorm.weight"],
      tensors[f"{p}.dense.weight"],
      tensors[f"{p}.dense.bias"],
      positions,
      mask,
      hf,
  )
  assert np.max(np.abs(np.asarray(got) - ref)) < 1e-5


@settings(max_examples=20, deadline=None)
@given(
    h=st.integers(1, 4),
    k=st.integers(1, 3),
    d=st.sampled_from([2, 4, 6]),
    e=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_fused_split_round_trip(h, k, d, e, seed):
  fused = np.random.default_rng(seed).standard_normal(((h + 2 * k) * d, e))
  q, kk, v = nm.split_fused_heads((h, k, k), d)(fused)
  assert q.shape == (e, h, d) and kk.shape == v.shape == (e, k, d)
  np.testing.assert_array_equal(q[:, 0, :], fused[:d].T)  # q is first, head 0
  np.testing.assert_array_equal(v[:, -1, :], fused[-d:].T)  # v is last
  np.testing.assert_array_equal(nm.fuse_heads(q, kk, v), fused)


def convert_and_load(tmp_path, hf, tensors, param_dtype="float32", num_shards=3):
  hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "orbax")
  tf.write_checkpoint(hf_dir, hf, tensors, num_shards=num_shards)
  stats = teachers.convert_teacher(hf_dir, out, param_dtype=param_dtype)
  section = common.teacher_config("llada2", checkpoint=out, dtype="float32", mask_token_id=5)
  return teachers.load_teacher(section, block_size=4), stats


def forward(loaded, ids, valid):
  teacher, params = loaded
  clean, masked, valid = jnp.asarray(ids), jnp.zeros(ids.shape, bool), jnp.asarray(valid)
  logits = jax.jit(teacher.prediction_logits)(params, clean, masked, valid)
  return np.asarray(logits), teacher.inputs(clean, masked, valid)


def batch(vocab, b=2, length=10, seed=0):
  rng = np.random.default_rng(seed)
  valid = np.ones((b, length), bool)
  valid[1, 7:] = False
  return rng.integers(0, vocab, (b, length)).astype(np.int32), valid


def test_synthetic_checkpoint_converts_to_numpy_logits(tmp_path):
  hf = tf.tiny_llada2_config(use_qkv_bias=True, use_bias=True)
  tensors = tf.random_llada2_tensors(hf, seed=2)
  teacher, stats = convert_and_load(tmp_path, hf, tensors)
  assert stats["tensors"] == len(tensors)
  assert set(os.listdir(tmp_path / "hf")) >= {
      "model.safetensors.index.json",
      "model-00003-of-00003.safetensors",
  }
  ids, valid = batch(hf["vocab_size"])
  got, inputs = forward(teacher, ids, valid)
  ref = tf.np_llada2_logits(
      hf, tensors, ids, np.asarray(inputs.position_ids), np.asarray(inputs.attention_mask)[:, 0]
  )
  assert got.shape == (2, 10, hf["vocab_size"])
  assert np.max(np.abs(got[valid] - ref[valid])) < 1e-4
  # Padded query rows still see the valid keys (they are just never read).
  assert np.max(np.abs(got - ref)) < 1e-4


def test_bf16_conversion_keeps_router_in_float32(tmp_path):
  """bf16 storage rounds every weight except the router and its bias (float32 always)."""
  hf = tf.tiny_llada2_config(tie_word_embeddings=True, num_hidden_layers=2)
  tensors = tf.random_llada2_tensors(hf, seed=3)
  teacher, _ = convert_and_load(tmp_path, hf, tensors, param_dtype="bfloat16", num_shards=2)
  mlp = teacher[0].model(teacher[1]).layers[1].mlp
  assert mlp.gate[...].dtype == jnp.bfloat16 and mlp.router[...].dtype == jnp.float32
  rounded = tf.as_bf16(tensors)
  for name in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias"):
    rounded[name] = tensors[name]
  ids, valid = batch(hf["vocab_size"], seed=1)
  got, inputs = forward(teacher, ids, valid)
  ref = tf.np_llada2_logits(
      hf, rounded, ids, np.asarray(inputs.position_ids), np.asarray(inputs.attention_mask)[:, 0]
  )
  assert np.max(np.abs(got - ref)) < 1e-4


def test_missing_and_extra_tensors_are_one_error_listing_them(tmp_path):
  hf = tf.tiny_llada2_config(num_hidden_layers=2)
  tensors = tf.random_llada2_tensors(hf)
  del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
  tensors["model.layers.1.mlp.bogus.weight"] = np.zeros(2, np.float32)
  tf.write_checkpoint(str(tmp_path / "hf"), hf, tensors, num_shards=2)
  with pytest.raises(ValueError) as err:
    teachers.convert_teacher(str(tmp_path / "hf"), str(tmp_path / "out"))
  message = str(err.value)
  assert "missing tensors: model.layers.1.mlp.experts.3.up_proj.weight" in message
  assert "unexpected tensors: model.layers.1.mlp.bogus.weight" in message
  assert not os.path.exists(tmp_path / "out")  # nothing written before the check


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
  hf = tf.tiny_llada2_config(num_hidden_layers=2)
  tensors = tf.random_llada2_tensors(hf)
  tensors["model.layers.1.mlp.experts.2.down_proj.weight"] = np.zeros((32, 15), np.float32)
  tf.write_checkpoint(str(tmp_path / "hf"), hf, tensors, num_shards=1)
  with pytest.raises(ValueError, match=r"experts\.2\.down_proj\.weight has shape \(15, 32\)"):
    teachers.convert_teacher(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_missing_config_keys_are_listed_together():
  hf = tf.tiny_llada2_config()
  for key in ("n_group", "moe_intermediate_size", "rope_theta"):
    hf.pop(key)
  with pytest.raises(ValueError) as err:
    llada2.llada2_config_from_hf(hf)
  for key in ("n_group", "moe_intermediate_size", "rope_theta"):
    assert key in str(err.value)
  with pytest.raises(ValueError, match="sigmoid"):
    llada2.llada2_config_from_hf(tf.tiny_llada2_config(score_function="softmax"))
  with pytest.raises(ValueError, match="norm_head"):
    llada2.llada2_config_from_hf(tf.tiny_llada2_config(norm_head=True))
  # An explicit rotary_dim replaces the factor (head_dim 12 -> 4 rotating features).
  hf = tf.tiny_llada2_config(rotary_dim=4)
  hf.pop("partial_rotary_factor")
  assert llada2.llada2_config_from_hf(hf).rotary_dim == 4


def test_loading_an_unconverted_directory_is_a_clear_error(tmp_path):
  section = common.teacher_config("llada2", checkpoint=str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="holds no converted teacher"):
    teachers.load_teacher(section)
  with pytest.raises(ValueError, match="Unknown teacher 'gpt'"):
    teachers.load_teacher(common.teacher_config("gpt", checkpoint="x"))


def test_cli_converts_and_reports_bad_mesh(tmp_path):
  hf = tf.tiny_llada2_config(num_hidden_layers=2)
  tf.write_checkpoint(str(tmp_path / "hf"), hf, tf.random_llada2_tensors(hf), num_shards=2)
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT,
  )
  cmd = [
      sys.executable,
      "-m",
      "tide_jax.convert",
      f"--hf_dir={tmp_path / 'hf'}",
      f"--out={tmp_path / 'out'}",
      "--mesh=fsdp=2,expert=4",
  ]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "[2/2]" in done.stdout and "peak RSS" in done.stdout
  manifest = json.loads((tmp_path / "out" / "teacher.json").read_text())
  assert manifest["param_dtype"] == "bfloat16" and manifest["model_type"] == "llada2_moe"
  bad = subprocess.run(
      cmd[:-1] + ["--mesh=fsdp=3", "--overwrite"],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: Mesh")
