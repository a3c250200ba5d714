"""Defaults shared by every config; each experiment file overrides what it needs."""

from ml_collections import config_dict


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0
  c.block_size = 32

  c.model = config_dict.ConfigDict()
  m = c.model
  m.init_from = ""  # HF directory of the initial student; empty = random init
  m.model_type = "qwen3"
  m.vocab_size = 151936
  m.hidden_size = 1024
  m.num_layers = 28
  m.num_heads = 16
  m.num_kv_heads = 8
  m.head_dim = 128
  m.intermediate_size = 3072
  m.rope_theta = 1e6
  m.rms_norm_eps = 1e-6
  m.tie_word_embeddings = True
  m.max_position_embeddings = 40960
  m.param_dtype = "float32"
  m.dtype = "float32"
  # Per-layer activation recomputation: none, full, dots_saveable,
  # dots_with_no_batch_dims_saveable or save_attention. Typed `object` so that configs and
  # overrides that still give the old booleans load; True / False are read as full / none.
  m.remat = config_dict.FieldReference("none", field_type=object)
  # xla (dense reference), blocked (skips fully masked BD3LM tiles, any backend),
  # cudnn (NVIDIA GPUs, bf16) or splash (TPUs).
  m.attention_impl = "xla"

  c.objective = config_dict.ConfigDict()
  ob = c.objective
  ob.kind = "bd3lm"  # bd3lm (student) or mdlm (bidirectional, e.g. a teacher)
  ob.schedule = "linear"
  ob.t_eps = 1e-3
  ob.mask_token_id = 151669
  ob.block_size = c.get_ref("block_size")
  ob.row_block = 256  # rows per block of every fused vocabulary statistic (CE, terms, bpb)
  ob.vocab_tile = 4096  # vocabulary columns per tile (at most); docs/BENCHMARKS.md

  c.data = config_dict.ConfigDict()
  d = c.data
  d.format = "chat"
  d.tokenizer = "qwen3"
  d.train_files = config_dict.placeholder(list)
  d.eval_files = config_dict.placeholder(list)
  d.eval_fraction = 0.02
  d.max_len = 512
  d.block_size = c.get_ref("block_size")
  # Several examples per training row, each from a block boundary, attending only within
  # itself (per-example positions; see docs/data.md). Student-only: not with a teacher.
  d.packing = False
  d.chat_template = ""  # a Jinja template overriding the student tokenizer's ("" = its own)
  # The teacher side ("" = no teacher data): tokenizer spec, row length (0 = max_len), block
  # multiple (0 = block_size), template, and the alignment ("positions" or "chunks").
  d.teacher_tokenizer = ""
  d.teacher_max_len = 0
  d.teacher_block_size = 0
  d.teacher_chat_template = ""
  d.alignment = "chunks"
  d.max_pairs = 0  # position pairs kept per example (0 = max_len)
  d.cache_dir = ""
  # Train on the token ids the corpus uses (tide_jax/data/vocab.py): the vocabulary is cut
  # to them, renumbered, for every model of the run. vocab_files: more texts it must cover.
  d.restrict_vocab = False
  d.vocab_files = []
  d.strict = False
  d.num_workers = 0  # preprocessing processes (0 = automatic)
  d.max_records = 0  # read at most this many records per source and split (0 = all)
  d.prepare_on = "first_host"  # or "every_host" (each host into a host-local cache_dir)
  # Which answers are trained: "last" (the official release's choice) or "all".
  d.train_turns = "last"
  # Chat template variables. Thinking disabled, as the release renders the Qwen3 format: an
  # empty think block before the final answer and in every generation prompt.
  d.template_args = {"enable_thinking": False}
  d.teacher_template_args = {"enable_thinking": False}
  # A weighted mixture instead of train_files: [{"files": [...], "format": "chat",
  # "weight": 1.0, "name": "..."}, ...]; see docs/data.md.
  d.sources = []

  c.optim = config_dict.ConfigDict()
  o = c.optim
  o.learning_rate = 5e-5
  o.warmup_steps = 100
  o.decay = "cosine"
  o.lr_end_fraction = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.grad_clip = 1.0

  c.train = config_dict.ConfigDict()
  t = c.train
  t.batch_size = 32
  t.microbatches = 1  # > 1: accumulate gradients over this many slices inside the step
  t.num_steps = 1000
  t.epochs = 0  # > 0: num_steps = ceil(epochs * train records / batch_size)
  t.log_every = 50
  t.eval_every = 500
  t.eval_batches = 8
  t.checkpoint_every = 500
  t.checkpoint_every_minutes = 0.0  # > 0: also checkpoint when the last save is this old
  t.keep_checkpoints = 3
  t.async_checkpoint = False
  t.stop_at_step = 0  # > 0: checkpoint and stop after this step (time-sliced jobs)
  t.preemption_check_every = 1  # multi-host: combine the hosts' SIGTERM flags every n steps
  # > 0: different noise from the same seed (e.g. to resume past a NaN); see train/step.py.
  t.rng_offset = 0
  # gs:// workdirs: a run lock whose heartbeat is older than this is taken over (local
  # workdirs need no timeout: the lock dies with its process); see train/workdir_lock.py.
  t.workdir_lock_stale_s = 300.0

  # Device mesh (tide_jax.parallel.sharding): -1 = the remaining devices. The student's
  # parameters and optimizer state spread over fsdp x tensor, the teacher's over
  # tensor x expert x fsdp, the batch over data x fsdp x expert.
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1
  c.mesh.num_devices = 0  # 0 = every device; n = the first n (single process only)

  c.sampler = config_dict.ConfigDict()  # --mode=sample and HumanEval
  # One token per step (the paper): follows block_size unless set. A derived reference
  # (`* 1`), so that setting steps_per_block never writes through to block_size.
  c.sampler.steps_per_block = c.get_ref("block_size") * 1
  c.sampler.max_new_tokens = 256
  c.sampler.temperature = 0.0
  c.sampler.order = "low_confidence"
  c.sampler.context_len = 4096
  # > 0: each step also commits every masked position whose confidence exceeds this
  # (parallel decoding; a block can finish in fewer steps). 0 = the schedule alone.
  c.sampler.threshold = 0.0

  c.eval = config_dict.ConfigDict()  # --mode=eval and the periodic eval
  c.eval.bpb_files = config_dict.placeholder(list)  # default: data.eval_files
  c.eval.bpb_max_texts = 16
  c.eval.bpb_grid = 8
  c.eval.bpb_during_training = False  # also report bits per byte at every train.eval_every
  c.eval.humaneval = False
  c.eval.humaneval_samples = 1
  c.eval.humaneval_tasks = config_dict.placeholder(list)
  # lm-evaluation-harness tasks for --mode=eval (docs/eval.md), comma-separated like the
  # harness's --tasks: e.g. "gsm8k,hellaswag". Empty = none.
  c.eval.tasks = ""
  c.eval.task_paths = ""  # comma-separated directories of extra YAML tasks
  c.eval.num_fewshot = -1  # -1 = each task's own default
  c.eval.limit = 0  # documents per task; 0 = all
  c.eval.chat_template = False  # render the harness's prompts with the chat template
  c.eval.batch_size = 8  # prompts per sampler call and rows per likelihood evaluation
  return c


def distill_config() -> config_dict.ConfigDict:
  """The ``config.distill`` section with its defaults (docs/method.md §3-4)."""
  c = config_dict.ConfigDict()
  c.recipe = "bd3lm"  # a preset name, or "custom"
  c.alignment = "positions"  # "positions" (shared tokenizer) or "chunks" (cross tokenizer)
  c.weight = 1.0  # multiplies the distillation term
  c.temperature = 2.0  # token-level T (with the T^2 factor)
  c.chunk_temperature = 5.0  # chunk-level T: s = exp(log P / T)
  c.shared_vocab = config_dict.placeholder(int)  # e.g. 151646
  c.max_chunks = 512  # static chunk slots per example
  c.tidal = config_dict.ConfigDict(
      dict(l0=0.1, l1=0.9, growth="cosine", axis="both", timestep_weight="midrange")
  )
  c.compdemo = config_dict.ConfigDict(dict(ratio=0.5, granularity="auto"))
  c.custom = config_dict.ConfigDict(dict(objective="forward_kl", tidal=False, compdemo=False))
  return c


def teacher_config(name: str, **overrides) -> config_dict.ConfigDict:
  """A teacher configuration section with every field present.

  Fields: ``name`` (a key of TEACHERS), ``checkpoint`` (converted orbax directory, local
  or gs://), ``hf_dir`` (the HF directory ``python -m tide_jax.convert --config=...``
  converts into ``checkpoint``; also the tokenizer source of "hf_dir" families),
  ``convert_if_missing`` (a single-process run may convert ``hf_dir`` itself when
  ``checkpoint`` holds no manifest; off by default: conversion is an explicit step run
  once, see launch/prepare.sh), ``tokenizer`` /
  ``chat_template`` / ``mask_token_id`` (overrides; empty or -1 = the family's),
  ``param_dtype`` (storage dtype when converting), ``dtype`` (compute dtype),
  ``moe_dispatch`` ("auto", "ragged", "tiled" or "dense"; MoE teachers only), ``remat``
  (a remat policy name as for ``model.remat``) and ``attention_impl`` (as for
  ``model.attention_impl``).
  """
  section = config_dict.ConfigDict(
      {
          "name": name,
          "checkpoint": "",
          "hf_dir": "",
          "convert_if_missing": False,
          "tokenizer": "",
          "chat_template": "",
          "mask_token_id": -1,
          "param_dtype": "bfloat16",
          "dtype": "bfloat16",
          "moe_dispatch": "auto",
          # Typed `object`: the old booleans (True / False = "full" / "none") still load.
          "remat": config_dict.FieldReference("none", field_type=object),
          "attention_impl": "xla",
      }
  )
  section.update(overrides)
  return section
