"""The smoke distillation end to end (shortened): both variants, each stage compiles its
train step once, the distilled student's metrics carry the recipe's term, and the final
table gives each model's held-out bits per byte under its own bound."""

import json
import os

import pytest

from configs import common, smoke
from tide_jax.convert import hf_checkpoint
from tide_jax.data import records, tokenizers
from tide_jax.eval import bpb
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
  c.eval.bpb_files = ["pystdlib://http/__init__.py"]  # 7.9 kB of held-out source
  c.eval.bpb_grid = 2
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
  assert "Held-out bits per byte and masked-token loss" in out
  assert os.path.exists(root / "teacher" / "hf" / "config.json")
  assert json.loads((root / "comparison.json").read_text()) == comparison
  # The teacher's figure is its bidirectional (MDLM) bound on the held-out text, with its
  # own restricted tokenizer: recomputed here from the exported teacher.
  config = json.loads((root / "teacher" / "config.json").read_text())
  teacher_tokenizer = tokenizers.get_tokenizer(config["data"]["tokenizer"])
  assert len(teacher_tokenizer) < 30_000  # data.restrict_vocab: the corpus's ids only
  teacher = hf_checkpoint.load_dense_from_hf(str(root / "teacher" / "hf"))
  assert teacher.cfg.vocab_size == len(teacher_tokenizer)
  mdlm = bpb.bits_per_byte(
      teacher,
      teacher_tokenizer,
      bpb.held_out_texts(tiny(variant, tmp_path), 16),
      block_size=32,
      max_len=64,
      mask_token_id=config["objective"]["mask_token_id"],
      grid=2,
      kind="mdlm",
  )
  held_out_file = records.expand_files(["pystdlib://http/__init__.py"])[0]
  assert comparison["bpb_bytes"] == mdlm.num_bytes == os.path.getsize(held_out_file)
  assert abs(comparison["teacher_bits_per_byte"] - mdlm.bits_per_byte) < 1e-4
  # A few steps from scratch: every model near its initial ~3.4 bits per byte.
  for name, bound in (("teacher", "mdlm"), (recipe, "bd3lm"), ("bd3lm", "bd3lm")):
    assert 1.0 < comparison[f"{name}_bits_per_byte"] < 8.0, name
    line = next(l for l in out.splitlines() if l.split()[:2] == [name, bound])
    assert f"{comparison[f'{name}_bits_per_byte']:9.4f}".strip() in line
  assert comparison["teacher_below_students"] == (
      comparison["teacher_bits_per_byte"]
      < min(comparison[f"{recipe}_bits_per_byte"], comparison["bd3lm_bits_per_byte"])
  )
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
  base_train = [r for r in base if "train/loss" in r]
  assert len(base_train) == 4
  # The plan logs every distill/* scalar for a named recipe; bd3lm's are all zero.
  assert all(r.get(f"train/{term}", 0.0) == 0.0 for r in base_train)
  assert all(r.get("train/distill/loss", 0.0) == 0.0 for r in base_train)


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
