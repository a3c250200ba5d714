"""The MDLM teacher stage config shared by the smoke distillation and the study."""

from configs import replicate as replicate_config
from configs import smoke
from tide_jax.data import tokenizers
from tide_jax.train import mdlm_teacher, replicate, smoke_distill


def _distill_config(teacher_tokenizer: str, mask_id: int):
  config = replicate_config.get_config()
  config.unlock()
  del config["replicate"], config["runner"]
  config.data.restrict_vocab = False
  config.data.teacher_tokenizer = teacher_tokenizer
  config.data.teacher_max_len = 96
  config.teacher.mask_token_id = mask_id
  return config


def test_the_teacher_config_trains_mdlm_on_the_teacher_tokenizer():
  config = _distill_config("llama3", 128002)
  shape = {"hidden_size": 48, "num_layers": 3}
  t = mdlm_teacher.mdlm_teacher_config(config, shape, num_steps=7, learning_rate=0.01, batch_size=4)
  assert (t.model.hidden_size, t.model.num_layers) == (48, 3)
  assert t.model.num_heads == config.model.num_heads  # not in the shape: the student's
  assert t.model.vocab_size == len(tokenizers.get_tokenizer("llama3")) == 128256
  assert (t.objective.kind, t.objective.mask_token_id) == ("mdlm", 128002)
  assert (t.data.tokenizer, t.data.max_len, t.data.teacher_tokenizer) == ("llama3", 96, "")
  assert (t.train.num_steps, t.train.batch_size, t.optim.learning_rate) == (7, 4, 0.01)
  assert "distill" not in t and "teacher" not in t
  assert config.objective.kind != "mdlm" and "distill" in config  # the input is unchanged


def test_a_mask_id_past_the_tokenizer_widens_the_embedding():
  # Qwen3's tokenizer has 151,669 ids; its first free id is the mask.
  config = _distill_config("qwen3", 151669)
  t = mdlm_teacher.mdlm_teacher_config(config, {}, num_steps=1, learning_rate=1e-3)
  assert t.model.vocab_size == 151670
  t = mdlm_teacher.mdlm_teacher_config(
      config, {"vocab_size": 151936}, num_steps=1, learning_rate=1e-3
  )
  assert t.model.vocab_size == 151936


def test_smoke_and_study_build_their_teachers_with_it():
  c = smoke.get_config("cross")
  t = smoke_distill.teacher_training_config(c)
  for key, value in c.smoke.teacher_model.items():
    assert t.model[key] == value
  assert t.train.num_steps == t.train.eval_every == c.smoke.teacher_steps
  assert not t.eval.bpb_during_training and "smoke" not in t

  study = replicate_config.get_config()
  pipe = _distill_config("llama3", 128002)
  stage = replicate.teacher_stage(study, pipe, "A")
  for key in (
      "hidden_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "intermediate_size",
  ):
    assert stage.config.model[key] == study.replicate.teacher[key]
  assert stage.config.train.num_steps == study.replicate.teacher.num_steps
  assert stage.config.data.eval_files == list(study.replicate.validation_files)
  assert stage.config.objective.kind == "mdlm" and "replicate" not in stage.config
