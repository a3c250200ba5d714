"""The miniature replication of the paper's comparison (docs/replication.md).

  configs/replicate.py        the CPU study: 2 teachers, 9 student conditions x 3 seeds
  configs/replicate.py:gpu    the same study with larger models, batches and step counts

Corpus: Python standard-library source. Training packages below; the validation split
(hyper-parameter choice) and the test split (the reported figures) are other packages.
Tokenizers: Qwen3 for the student and the pipeline B teacher, Llama-3 for the pipeline A
teacher, each restricted to the ids the corpus uses (data.restrict_vocab).

  python -m tide_jax.main --config=configs/replicate.py --workdir=runs/replicate \\
      --config.replicate.split=validation --config.replicate.learning_rates=3e-3,1e-2
  python -m tide_jax.main --config=configs/replicate.py --workdir=runs/replicate

The first (the learning-rate sweep on the validation split; docs/replication.md gives the
exact, smaller set of conditions it ran) trains the teachers, which the second (the study
on the test split) then reuses from the same workdir.
"""

from ml_collections import config_dict

from configs import common

VARIANTS = ("cpu", "gpu")
TRAIN_PACKAGES = (
    "email",
    "asyncio",
    "collections",
    "importlib",
    "logging",
    "concurrent",
    "json",
    "multiprocessing",
    "unittest",
    "xml",
)
VALIDATION_FILES = ["pystdlib://wsgiref/*.py"]
TEST_FILES = ["pystdlib://dbm/*.py", "pystdlib://curses/*.py", "pystdlib://venv/*.py"]


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown replicate variant {variant!r}; use one of {', '.join(VARIANTS)}.")
  gpu = variant == "gpu"
  config = common.base_config()
  config.runner = "replicate"
  config.seed = 0
  config.block_size = 32

  # The student: a tiny Qwen3-shaped BD3LM model, the same for every recipe.
  m = config.model
  m.model_type = "qwen3"
  m.vocab_size = 151936  # replaced by the restricted vocabulary's size
  m.hidden_size = 128 if gpu else 64
  m.num_layers = 4 if gpu else 2
  m.num_heads = 4 if gpu else 2
  m.num_kv_heads = 2 if gpu else 1
  m.head_dim = 32
  m.intermediate_size = 384 if gpu else 192
  m.tie_word_embeddings = True
  config.objective.mask_token_id = 151669  # Qwen3's first free id; restricted like the rest
  config.objective.row_block = 1024

  d = config.data
  d.format = "text"
  d.tokenizer = "qwen3"
  d.train_files = [f"pystdlib://{package}/**/*.py" for package in TRAIN_PACKAGES]
  d.eval_files = list(TEST_FILES)  # the runner sets the split's files
  d.eval_fraction = 0.0
  d.max_len = 128
  d.teacher_max_len = 160  # Llama-3 needs a few more tokens than Qwen3 for some pieces
  d.restrict_vocab = True
  d.vocab_files = VALIDATION_FILES + TEST_FILES  # one vocabulary for both splits

  o = config.optim
  # One learning rate for every recipe, to be chosen on the validation split before the
  # study is run (docs/replication.md, "Choosing the settings").
  o.learning_rate = 3e-3
  o.warmup_steps = 20
  o.decay = "cosine"

  config.eval.bpb_files = list(TEST_FILES)  # the runner sets the split's files
  config.eval.bpb_during_training = True
  config.eval.bpb_grid = 8
  config.eval.bpb_max_texts = 64

  t = config.train
  t.batch_size = 32 if gpu else 8
  t.num_steps = 2000 if gpu else 200
  t.log_every = 50
  t.eval_every = 200 if gpu else 50
  t.eval_batches = 4
  t.checkpoint_every = 500 if gpu else 100
  t.keep_checkpoints = 1

  # The paper's distillation settings (docs/method.md section 4), for every recipe alike.
  config.distill = common.distill_config()
  config.distill.temperature = 2.0
  config.distill.chunk_temperature = 2.0
  config.distill.max_chunks = 128
  config.teacher = common.teacher_config(
      "qwen_bidirectional", param_dtype="float32", dtype="float32", convert_if_missing=True
  )

  r = config.replicate = config_dict.ConfigDict()
  r.split = "test"  # "validation": the hyper-parameter choice (bits per byte on it)
  r.validation_files = VALIDATION_FILES
  r.test_files = TEST_FILES
  r.seeds = [0, 1, 2]
  r.learning_rates = []  # more than one: the sweep on the validation split
  r.workers = 2  # processes running stages side by side (one per core of a 2-core CPU)
  r.quick = False  # the whole study in miniature (tests): tiny models, a few steps
  r.pipelines = config_dict.ConfigDict(
      dict(
          B=dict(
              teacher_tokenizer="qwen3",
              teacher_mask_token_id=151669,
              alignment="positions",
              recipes=["bd3lm", "kl", "reverse_kl", "tide_shared"],
          ),
          A=dict(
              teacher_tokenizer="llama3",
              teacher_mask_token_id=128002,  # <|reserved_special_token_0|>
              alignment="chunks",
              recipes=["bd3lm", "calm", "tide_shared", "tide_cross"],
          ),
      )
  )
  r.ablation_pipeline = "B"  # TIDAL's axes: tide_shared with each of them
  r.ablation_axes = ["timestep_only", "training_only", "both"]
  r.teacher = config_dict.ConfigDict(
      dict(
          hidden_size=256 if gpu else 128,
          num_layers=6 if gpu else 4,
          num_heads=8 if gpu else 4,
          num_kv_heads=4 if gpu else 2,
          head_dim=32,
          intermediate_size=768 if gpu else 384,
          num_steps=6000 if gpu else 1500,
          learning_rate=3e-3,
          batch_size=32 if gpu else 8,
      )
  )
  r.teacher_margin = 0.25  # the teachers' bits per byte should be this far below bd3lm's
  r.reliability_ratios = 10
  r.reliability_max_texts = 8
  r.doc = "docs/replication.md"  # "" = write the report into the workdir only
  r.figures_dir = "docs/replication"
  return config
