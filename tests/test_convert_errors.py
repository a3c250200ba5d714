"""Damaged HF directories end in one sentence naming the file; a failed conversion leaves
nothing half-written."""

import json
import os
import shutil

import pytest

from tests.hf_fixtures import tiny_qwen
from tests.test_train_e2e import run_main
from tide_jax.convert import hf_checkpoint, streaming
from tide_jax import teachers


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf") / "model")
  tiny_qwen("qwen3", path, tied=False)
  return path


def damaged_copy(source: str, target: str, kind: str) -> str:
  shutil.copytree(source, target)
  weights = os.path.join(target, "model.safetensors")
  data = open(weights, "rb").read()
  if kind == "truncated":
    data = data[: len(data) // 2]
  elif kind == "garbage":
    data = bytes(range(256)) * 16
  elif kind == "empty":
    data = b""
  with open(weights, "wb") as f:
    f.write(data)
  return weights


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_one_sentence_naming_it(hf_source, tmp_path, kind):
  target = str(tmp_path / kind)
  weights = damaged_copy(hf_source, target, kind)
  expected = f"{weights} is not a readable safetensors file (.*); it is truncated or corrupt"
  with pytest.raises(ValueError, match=expected):
    hf_checkpoint.load_dense_from_hf(target)
  with pytest.raises(ValueError, match=expected):  # teacher conversion
    teachers.convert_teacher(target, str(tmp_path / "converted"), param_dtype="float32")
  with pytest.raises(ValueError, match=expected):  # its raw reader (bfloat16-capable)
    streaming.read_safetensors_header(weights)


def cli_error_lines(init_from: str, tmp_path) -> list[str]:
  """stderr lines of a training run started from ``init_from``; it must fail with exit 2 and
  one line."""
  res = run_main(
      f"--workdir={tmp_path / 'wd'}",
      f"--config.model.init_from={init_from}",
      "--config.data.restrict_vocab=False",  # a full-vocabulary checkpoint
      "--config.objective.mask_token_id=96",
  )
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
  return lines


def test_a_malformed_config_json_is_one_sentence_naming_it(hf_source, tmp_path):
  target = str(tmp_path / "model")
  shutil.copytree(hf_source, target)
  config = os.path.join(target, "config.json")
  with open(config, "w") as f:
    f.write('{"model_type": "qwen3", ')
  with pytest.raises(ValueError, match=f"{config} is not valid JSON"):
    hf_checkpoint.load_dense_from_hf(target)
  lines = cli_error_lines(target, tmp_path)
  assert lines[0].startswith(f"error: {config} is not valid JSON (")


def test_cli_with_damaged_weights_is_one_line(hf_source, tmp_path):
  target = str(tmp_path / "model")
  weights = damaged_copy(hf_source, target, "garbage")
  lines = cli_error_lines(target, tmp_path)
  assert lines[0].startswith(f"error: {weights} is not a readable safetensors file (")


def test_a_failed_conversion_leaves_no_partial_output_and_keeps_the_previous_one(
    hf_source, tmp_path
):
  out = tmp_path / "converted"
  teachers.convert_teacher(hf_source, str(out), param_dtype="float32")
  before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
  assert "teacher.json" in before
  # A config.json that disagrees with the weights' MLP width: the conversion writes the
  # first groups (lm_head, the embedding), then fails on layer 0's MLP.
  broken = str(tmp_path / "broken")
  shutil.copytree(hf_source, broken)
  config = json.loads(open(os.path.join(broken, "config.json")).read())
  config["intermediate_size"] = 40
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(config, f)
  fresh = tmp_path / "fresh"
  with pytest.raises(ValueError, match=r"Tensor model\.layers\.0\.mlp\..*expects"):
    teachers.convert_teacher(broken, str(fresh), param_dtype="float32")
  assert not fresh.exists()
  with pytest.raises(ValueError, match=r"Tensor model\.layers\.0\.mlp\..*expects"):
    teachers.convert_teacher(broken, str(out), param_dtype="float32", overwrite=True)
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
  assert sorted(os.listdir(tmp_path)) == ["broken", "converted"]  # no staging left behind
