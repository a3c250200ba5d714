"""CPU smoke run on Python standard-library source with real tokenizers.

  configs/smoke.py          teacher (Qwen3 tokenizer) -> tide_shared student vs bd3lm student
  configs/smoke.py:cross    teacher with the Llama-3 tokenizer -> tide_cross student (chunk
                            alignment, Reverse CALM) vs bd3lm student
  configs/smoke.py:bd3lm    the BD3LM student alone (no teacher)

The student is a tiny Qwen3-shaped BD3LM model; with data.restrict_vocab its embedding holds
the Qwen3 ids the corpus uses (13,282 of 151,936), the teacher's likewise for its own
tokenizer. Held-out text: http/ for the final table (bits per byte on two of its files),
urllib/ for choosing the sizes and step counts (docs/BENCHMARKS.md). Usage:

  python -m tide_jax.main --config=configs/smoke.py --workdir=runs/smoke
  python -m tide_jax.main --config=configs/smoke.py:bd3lm --workdir=runs/bd3lm \\
      --config.train.num_steps=20
"""

from ml_collections import config_dict

from configs import common

VARIANTS = ("shared", "cross", "bd3lm")
EVAL_FILES = ["pystdlib://http/*.py"]  # held out: masked-token loss
BPB_FILES = ["pystdlib://http/cookies.py", "pystdlib://http/__init__.py"]  # held out: bits/byte
# Another held-out package, for choosing sizes and step counts without looking at http/:
#   --config.data.eval_files=pystdlib://urllib/*.py \
#   --config.eval.bpb_files=pystdlib://urllib/parse.py
VALIDATION_FILES = ["pystdlib://urllib/*.py"]


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "shared"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown smoke variant {variant!r}; use one of {', '.join(VARIANTS)}.")
  config = common.base_config()
  config.seed = 0
  config.block_size = 32

  m = config.model
  m.model_type = "qwen3"
  m.vocab_size = 151936  # the Qwen3 embedding; the restricted vocabulary's size replaces it
  m.hidden_size = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32  # != hidden / heads, as in the real Qwen3 configs
  m.intermediate_size = 192
  m.rope_theta = 1e6
  m.tie_word_embeddings = True

  config.objective.mask_token_id = 151669  # first free slot after the Qwen3 special tokens
  # Rows per block of the fused vocabulary statistics. A batch (8 x 128 rows) fits in one
  # block; its logits are one tile of the restricted vocabulary, kept for the backward pass
  # instead of being projected again (1024 x 13,282 ids in float32 = 54 MB).
  config.objective.row_block = 1024

  d = config.data
  d.format = "text"
  d.tokenizer = "qwen3"
  d.train_files = [
      "pystdlib://json/*.py",
      "pystdlib://email/*.py",
      "pystdlib://asyncio/*.py",
      "pystdlib://collections/*.py",
      "pystdlib://importlib/*.py",
      "pystdlib://logging/*.py",
      "pystdlib://concurrent/futures/*.py",
  ]
  d.eval_files = list(EVAL_FILES)
  d.max_len = 128
  # Train on the token ids the corpus uses (tide_jax/data/vocab.py): the same model on the
  # same tokens, without the ~137,000 embedding rows no example touches, several times
  # faster per step. The validation files are in it too, so that the calibration runs on
  # them share the vocabulary of the reported run.
  d.restrict_vocab = True
  d.vocab_files = VALIDATION_FILES + EVAL_FILES

  o = config.optim
  o.learning_rate = 3e-3
  o.warmup_steps = 20

  config.eval.bpb_files = list(BPB_FILES)
  config.eval.bpb_during_training = True

  t = config.train
  t.batch_size = 8
  t.num_steps = 100
  t.log_every = 10
  t.eval_every = 50
  t.eval_batches = 4
  t.checkpoint_every = 50
  if variant == "bd3lm":
    return config

  cross = variant == "cross"
  config.runner = "smoke_distill"
  d.teacher_tokenizer = "llama3" if cross else "qwen3"
  d.teacher_max_len = 128
  d.alignment = "chunks" if cross else "positions"

  config.distill = common.distill_config()
  config.distill.recipe = "tide_cross" if cross else "tide_shared"
  config.distill.alignment = d.alignment
  config.distill.max_chunks = 128  # at most one chunk per student token
  config.distill.chunk_temperature = 2.0

  # The teacher is trained by the smoke run itself (stage 1) and registered like a real one.
  config.teacher = common.teacher_config(
      "qwen_bidirectional",
      tokenizer=d.teacher_tokenizer,
      mask_token_id=128002 if cross else 151669,  # Llama-3: <|reserved_special_token_0|>
      param_dtype="float32",
      dtype="float32",
      convert_if_missing=True,  # one process converts the teacher it trained in stage 1
  )

  config.smoke = config_dict.ConfigDict()
  config.smoke.variant = variant
  config.smoke.teacher_steps = 1000
  config.smoke.teacher_learning_rate = 3e-3
  config.smoke.teacher_model = config_dict.ConfigDict(
      dict(
          vocab_size=128256 if cross else 151936,
          hidden_size=128,
          num_layers=4,
          num_heads=4,
          num_kv_heads=2,
          head_dim=32,
          intermediate_size=384,
          tie_word_embeddings=True,
      )
  )
  return config
