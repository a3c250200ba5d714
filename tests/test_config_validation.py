"""configs_lib.validate: every enumerated field and numeric range, one sentence each, before
anything is prepared or written."""

import pytest

from configs import pipeline_a, pipeline_b, smoke
from tests.test_train_e2e import REPO, run_main
from tide_jax import configs_lib


def set_field(config, field: str, value) -> None:
  *sections, name = field.split(".")
  for section in sections:
    config = config[section]
  config[name] = value


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "optim.learning_rate",
            -1e-3,
            "optim.learning_rate=-0.001 is out of range; it must be positive",
        ),
        ("optim.learning_rate", 0.0, "optim.learning_rate=0.0 is out of range"),
        ("optim.learning_rate", float("nan"), "optim.learning_rate=nan is out of range"),
        (
            "optim.decay",
            "cosin",
            "optim.decay='cosin' is not a known value; use one of cosine, linear, constant",
        ),
        ("optim.b2", 1.0, "optim.b2=1.0 is out of range; it must be in [0, 1)"),
        ("optim.grad_clip", 0.0, "optim.grad_clip=0.0 is out of range"),
        ("optim.warmup_steps", -5, "optim.warmup_steps=-5 is out of range"),
        ("objective.kind", "bd3", "objective.kind='bd3' is not a known value; use one of"),
        ("objective.schedule", "cos", "objective.schedule='cos' is not a known value"),
        ("model.dtype", "fp16", "model.dtype='fp16' is not a known value"),
        (
            "model.model_type",
            "llama",
            "model.model_type='llama' is not a known value; use one of qwen3, qwen2",
        ),
        ("data.format", "json", "data.format='json' is not a known value; use one of chat, text"),
        ("sampler.order", "confidence", "sampler.order='confidence' is not a known value"),
        (
            "train.keep_checkpoints",
            0,
            "train.keep_checkpoints=0 is out of range; it must be at least 1",
        ),
        ("train.rng_offset", -1, "train.rng_offset=-1 is out of range"),
        ("block_size", 0, "block_size=0 is out of range; it must be a positive integer"),
        ("data.eval_fraction", 1.5, "data.eval_fraction=1.5 must lie in [0, 1)"),
        (
            "distill.recipe",
            "tide_crss",
            "distill.recipe='tide_crss' is not a known value; use one of bd3lm",
        ),
        (
            "distill.tidal.timestep_weight",
            "gauss",
            "distill.tidal.timestep_weight='gauss' is not a known value",
        ),
        (
            "distill.compdemo.granularity",
            "word",
            "distill.compdemo.granularity='word' is not a known value",
        ),
        ("teacher.name", "llada3", "teacher.name='llada3' is not a known value"),
    ],
)
def test_bad_fields_are_one_sentence(field, value, message):
  config = smoke.get_config("shared")
  config.unlock()
  set_field(config, field, value)
  with pytest.raises(ValueError) as err:
    configs_lib.validate(config)
  assert message in str(err.value)
  assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_shipped_configs_validate():
  for config in (
      smoke.get_config("shared"),
      smoke.get_config("cross"),
      smoke.get_config("bd3lm"),
      pipeline_a.get_config(None),
      pipeline_a.get_config("tide_shared"),
      pipeline_b.get_config(None),
  ):
    configs_lib.validate(config)


def test_sampler_steps_must_fit_the_block():
  config = smoke.get_config("bd3lm")
  config.unlock()
  # sampler.steps_per_block refers to block_size; a section of plain values breaks the link.
  config.sampler = dict(config.sampler.to_dict(), steps_per_block=64)
  with pytest.raises(
      ValueError, match=r"sampler.steps_per_block=64 must lie in \[1, block_size=32\]"
  ):
    configs_lib.validate(config)


def parse_config_flags(*overrides):
  """Parses ``--config=configs/smoke.py:bd3lm`` plus overrides as tide_jax.main does."""
  from absl import flags
  from ml_collections import config_flags

  from tide_jax import cli_flags  # registers the list parser  # noqa: F401

  argv = ["tide_jax.main", "--config=configs/smoke.py:bd3lm", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_list_fields_are_overridable_from_the_command_line(monkeypatch):
  monkeypatch.chdir(REPO)
  config = parse_config_flags(
      "--config.data.train_files=a.jsonl, data/*.parquet",
      "--config.eval.humaneval_tasks=['HumanEval/0', 'HumanEval/3']",
      "--config.data.eval_files=",
  )
  assert list(config.data.train_files) == ["a.jsonl", "data/*.parquet"]
  assert list(config.eval.humaneval_tasks) == ["HumanEval/0", "HumanEval/3"]
  assert list(config.data.eval_files) == []


def test_a_misspelled_field_is_one_line_with_the_closest_names(tmp_path):
  res = run_main(f"--workdir={tmp_path / 'wd'}", "--config.optim.learnin_rate=1e-3")
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert lines == [
      "error: --config.optim.learnin_rate is not a field of configs/smoke.py:bd3lm; did you "
      "mean optim.learning_rate or optim.lr_end_fraction or optim.warmup_steps?"
  ], res.stderr[-2000:]
  res = run_main(f"--workdir={tmp_path / 'wd'}", "--config.optm.learning_rate=1e-3")
  assert res.returncode == 2 and "did you mean optim.learning_rate?" in res.stderr
  assert "Traceback" not in res.stderr and not (tmp_path / "wd").exists()


def test_a_negative_learning_rate_stops_before_data_preparation(tmp_path):
  res = run_main(
      f"--workdir={tmp_path / 'wd'}",
      "--config.optim.learning_rate=-0.001",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
  )
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      "error: optim.learning_rate=-0.001 is out of range; it must be positive (the paper uses 5e-5)."
  ], res.stderr[-2000:]
  assert not (tmp_path / "wd").exists() and not (tmp_path / "cache").exists()
