"""Teacher conversion as an explicit step: a multi-host training run never converts (each
host would remove and rewrite the same directory), ``python -m tide_jax.convert --config``
converts once, also from a gs:// HF directory (the storage emulator), and leaves a finished
checkpoint alone.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import pipeline_b
from tests.hf_fixtures import tiny_qwen
from tests.test_gcs_checkpoint import BUCKET, gcs  # noqa: F401 (the storage emulator fixture)
from tide_jax.convert import streaming
from tide_jax.teachers import prepare as prepare_teacher
from tide_jax import teachers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_config(hf_dir: str, checkpoint: str, recipe: str = "tide_shared"):
  config = pipeline_b.get_config(recipe)  # the WeDLM teacher: a Qwen3 architecture
  config.teacher.hf_dir = hf_dir
  config.teacher.checkpoint = checkpoint
  config.teacher.param_dtype = "float32"
  config.teacher.dtype = "float32"
  config.teacher.mask_token_id = 5
  return config


def test_a_multihost_run_refuses_to_convert_and_writes_nothing(tmp_path, monkeypatch):
  hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "orbax")
  tiny_qwen("qwen3", hf_dir, tied=True, head_dim=8, num_layers=1)
  section = _training_config(hf_dir, out).teacher
  # Default: training expects the explicit step to have run.
  with pytest.raises(ValueError, match="holds no converted teacher; convert it once"):
    teachers.load_teacher(section)
  assert not os.path.exists(out)
  # Even when allowed, a second process must not convert into the shared directory.
  section.convert_if_missing = True
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="has 2 processes, which would all convert into it"):
    teachers.load_teacher(section)
  assert not os.path.exists(out)
  # One process that is allowed to (the CPU smoke run) converts on first use.
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  teacher, _ = teachers.load_teacher(section)
  assert os.path.exists(os.path.join(out, streaming.MANIFEST))
  assert teacher.config.vocab_size == 97


def test_the_prepare_step_converts_once_then_leaves_the_checkpoint_alone(tmp_path):
  hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "orbax")
  tiny_qwen("qwen3", hf_dir, tied=True, head_dim=8, num_layers=1, seed=3)
  config = _training_config(hf_dir, out)
  lines = []
  assert prepare_teacher.prepare_teacher(config, say=lines.append) == "converted"
  manifest = os.path.join(out, streaming.MANIFEST)
  written = os.stat(manifest).st_mtime_ns
  assert prepare_teacher.prepare_teacher(config, say=lines.append) == "already converted"
  assert os.stat(manifest).st_mtime_ns == written
  assert lines[-1] == f"teacher already converted: {out}"
  bd3lm = _training_config(hf_dir, str(tmp_path / "unused"), recipe="bd3lm")
  assert prepare_teacher.prepare_teacher(bd3lm, say=lines.append) == "no teacher"
  assert not os.path.exists(tmp_path / "unused")
  # Training now loads it without converting; the weights are the HF ones.
  teacher, params = teachers.load_teacher(config.teacher)
  embed = np.asarray(teacher.model(params).embed[...])
  reference = load_file(os.path.join(hf_dir, "model.safetensors"))["model.embed_tokens.weight"]
  np.testing.assert_allclose(embed, reference, rtol=0, atol=0)


def test_cli_converts_a_gs_hf_directory_once(gcs, tmp_path):  # noqa: F811 (fixture argument)
  hf_dir = str(tmp_path / "hf")
  tiny_qwen("qwen3", hf_dir, tied=True, head_dim=8, num_layers=1, seed=5)
  gcs["fs"].put(hf_dir, f"{BUCKET}/models/tiny-qwen", recursive=True)
  checkpoint = f"gs://{BUCKET}/teachers/tiny-qwen-orbax"
  cmd = [
      sys.executable,
      "-m",
      "tide_jax.convert",
      "--config=configs/pipeline_b.py",
      f"--config.teacher.hf_dir=gs://{BUCKET}/models/tiny-qwen",
      f"--config.teacher.checkpoint={checkpoint}",
      "--config.teacher.param_dtype=float32",
      f"--stage_dir={tmp_path / 'stage'}",
  ]
  first = subprocess.run(cmd, cwd=REPO, env=gcs["env"], capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"staging gs://{BUCKET}/models/tiny-qwen/model.safetensors" in first.stdout
  assert gcs["fs"].exists(f"{BUCKET}/teachers/tiny-qwen-orbax/{streaming.MANIFEST}")
  staged = tmp_path / "stage" / "tiny-qwen" / "model.safetensors"
  assert staged.read_bytes() == open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
  second = subprocess.run(
      cmd, cwd=REPO, env=gcs["env"], capture_output=True, text=True, timeout=300
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"teacher already converted: {checkpoint}" in second.stdout
  assert "converting" not in second.stdout
