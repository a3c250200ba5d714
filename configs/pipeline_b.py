"""Pipeline B of the paper (docs/method.md §4): WeDLM-8B-Instruct (Qwen3-8B architecture, the
Qwen3 tokenizer) distilled into a Qwen3-0.6B BD3LM student with a shared vocabulary.

  configs/pipeline_b.py              TIDE-Shared (TIDAL + CompDemo on forward KL), native to B
  configs/pipeline_b.py:tide_cross   reverse KL (TIDE-Cross in B)
  configs/pipeline_b.py:kl           forward KL, T = 2
  configs/pipeline_b.py:bd3lm        the student alone (baseline)
"""

from ml_collections import config_dict

from configs import common
from configs.pipeline_a import ROOT, paper_common

RECIPES = ("tide_shared", "tide_cross", "kl", "bd3lm")
TEACHER_HF_ID = "tencent/WeDLM-8B-Instruct"
SHARED_VOCAB = 151646  # docs/method.md §3.4: both logits cut to the shared vocabulary


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  recipe = arg or "tide_shared"
  if recipe not in RECIPES:
    raise ValueError(f"Unknown pipeline B recipe {recipe!r}; use one of {', '.join(RECIPES)}.")
  config = common.base_config()
  paper_common(config, student_len=512, teacher_len=768)
  config.models.teacher_hf_id = TEACHER_HF_ID
  d = config.data
  d.teacher_tokenizer = "qwen3"
  d.alignment = "positions"
  config.distill = common.distill_config()
  config.distill.recipe = recipe
  config.distill.alignment = "positions"
  config.distill.temperature = 2.0
  config.distill.shared_vocab = SHARED_VOCAB
  config.distill.tidal.l0, config.distill.tidal.l1 = 0.1, 0.9
  config.distill.tidal.growth = "cosine"
  config.distill.tidal.timestep_weight = "midrange"  # what the official pipeline-B script passes
  config.distill.compdemo.ratio = 0.5
  config.teacher = common.teacher_config(
      "wedlm",
      checkpoint=f"{ROOT}/teachers/wedlm-8b-instruct-orbax",
      hf_dir=f"{ROOT}/models/wedlm-8b-instruct",
      param_dtype="bfloat16",
      dtype="bfloat16",
      remat=False,
      # The teacher's mask carries key padding (data-dependent): "blocked" runs it 256
      # query rows at a time on any backend, the memory plan's assumption.
      attention_impl="blocked",
  )
  # The dense 8B teacher (16 GB in bf16) and the student spread over fsdp; the batch too.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config
