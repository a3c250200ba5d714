"""The smoke distillation end to end (shortened): both variants, each stage compiles its
train step once, and the distilled student's metrics carry the recipe's term."""

import json
import os

import pytest

from configs import common, smoke
from tide_jax.train import loop, smoke_distill


def tiny(variant, tmp_path):
  c = smoke.get_config(variant)
  c.data.max_len = 64
  c.data.teacher_max_len = 64
  c.distill.max_chunks = 64
  c.train.batch_size = 2
  c.train.num_steps = 4
  c.train.eval_every = 4
  c.train.eval_batches = 1
  c.train.checkpoint_every = 4
  c.smoke.teacher_steps = 3
  c.smoke.teacher_model.hidden_size = 64
  c.smoke.teacher_model.num_layers = 1
  c.data.cache_dir = str(tmp_path / f"cache_{variant}")
  return c


@pytest.mark.parametrize(
    "variant,term", [("shared", "distill/tidal"), ("cross", "distill/reverse_calm")]
)
def test_smoke_distillation_variants(tmp_path, variant, term, capsys):
  root = tmp_path / variant
  comparison = smoke_distill.run(tiny(variant, tmp_path), str(root))
  out = capsys.readouterr().out
  recipe = "tide_shared" if variant == "shared" else "tide_cross"
  assert f"{recipe}_eval_masked_nll" in comparison and "bd3lm_eval_masked_nll" in comparison
  assert "Held-out masked-token loss of the student" in out
  assert os.path.exists(root / "teacher" / "hf" / "config.json")
  for stage in ("teacher", f"student_{recipe}", "student_bd3lm"):
    summary = json.loads((root / stage / "summary.json").read_text())
    assert summary["step"] == (3 if stage == "teacher" else 4)
    assert summary["train_step_compilations"] == 1
  rows = [json.loads(line) for line in (root / f"student_{recipe}" / "metrics.jsonl").open()]
  train_rows = [r for r in rows if f"train/{term}" in r]
  assert len(train_rows) == 4
  assert all(r[f"train/{term}"] > 0 for r in train_rows)
  # loss = ce + weight * term, logged separately.
  for r in train_rows:
    assert abs(r["train/loss"] - r["train/ce_loss"] - r["train/distill/loss"]) < 1e-4
  # The baseline logs no distillation term and saw the same batches.
  base = [json.loads(line) for line in (root / "student_bd3lm" / "metrics.jsonl").open()]
  assert not any("train/distill/loss" in r for r in base)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("recipe", "tide_crss", "distill.recipe='tide_crss' is not a known value"),
        ("recipe", "calm", "Recipe 'calm' needs distill.alignment='chunks'"),
    ],
)
def test_a_bad_recipe_fails_before_the_teacher_trains(tmp_path, field, value, message):
  c = tiny("shared", tmp_path)
  c.distill[field] = value
  with pytest.raises(ValueError, match=message):
    smoke_distill.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "teacher").exists()
  assert not (tmp_path / "cache_shared").exists()  # no data prepared either


def test_an_unknown_recipe_without_a_teacher_is_named(tmp_path):
  c = smoke.get_config("bd3lm")
  c.distill = common.distill_config()
  c.distill.recipe = "klx"
  with pytest.raises(ValueError, match="distill.recipe='klx' is not a known value; use one of"):
    loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
