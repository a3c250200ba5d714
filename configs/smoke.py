"""CPU smoke run: a tiny Qwen3-shaped BD3LM student on Python standard-library source.

Real tokenizer (the Qwen2/Qwen3 vocabulary, 151,936 embedding rows), real text, a few
minutes on 2 CPU cores. Usage:

  python -m tide_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
  python -m tide_jax.main --config=configs/smoke.py --workdir=/tmp/smoke --config.train.num_steps=20
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = common.base_config()
  config.seed = 0
  config.block_size = 32

  m = config.model
  m.model_type = "qwen3"
  m.vocab_size = 151936          # the real Qwen3 embedding size
  m.hidden_size = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32                # != hidden / heads, as in the real Qwen3 configs
  m.intermediate_size = 192
  m.rope_theta = 1e6
  m.tie_word_embeddings = True

  config.objective.mask_token_id = 151669   # first free slot after the Qwen3 special tokens

  d = config.data
  d.format = "text"
  d.tokenizer = "qwen3"
  d.train_files = ["pystdlib://json/*.py", "pystdlib://email/*.py", "pystdlib://asyncio/*.py",
                   "pystdlib://collections/*.py", "pystdlib://importlib/*.py",
                   "pystdlib://logging/*.py", "pystdlib://concurrent/futures/*.py"]
  d.eval_files = ["pystdlib://http/*.py"]
  d.max_len = 128

  o = config.optim
  o.learning_rate = 3e-3
  o.warmup_steps = 20

  t = config.train
  t.batch_size = 4
  t.num_steps = 150
  t.log_every = 10
  t.eval_every = 50
  t.eval_batches = 4
  t.checkpoint_every = 50
  return config
