"""Tiny distillation setups for the mesh, checkpoint and multi-host tests.

Small vocabularies keep these runs fast: a byte-level tokenizer (256 byte tokens + 2
specials) for the student and the shared-tokenizer teacher, and a byte-level BPE with a
few merges trained on the same text for the cross-tokenizer teacher. Teachers are random
tiny HF models (Qwen3 bidirectional, or a synthetic LLaDA2 MoE), converted once.
"""

from __future__ import annotations

import json
import os
import sysconfig

import ml_collections
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import common
from tests import teachers_fixtures
from tests.hf_fixtures import tiny_qwen
from tide_jax import teachers

SPECIALS = ["<|endoftext|>", "<|mask|>"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
CORPUS = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py"]
EVAL = ["json/tool.py"]
STUDENT_VOCAB = 264  # 258 tokens, padded to a multiple of 8 (tensor-shardable)
CROSS_VOCAB = 328  # BPE teacher: 320 tokens, padded


def corpus_files(root: str) -> tuple[list[str], list[str]]:
  """Copies of a few standard-library files (stable text for every test run)."""
  stdlib = sysconfig.get_paths()["stdlib"]
  os.makedirs(root, exist_ok=True)

  def copy(names, sub):
    out = os.path.join(root, sub)
    os.makedirs(out, exist_ok=True)
    for name in names:
      with open(os.path.join(stdlib, name), encoding="utf-8") as f:
        text = f.read()[:6000]
      with open(os.path.join(out, name.replace("/", "_")), "w", encoding="utf-8") as f:
        f.write(text)
    return [os.path.join(out, "*.py")]

  return copy(CORPUS, "train"), copy(EVAL, "eval")


def _save(backend: Tokenizer, path: str) -> str:
  os.makedirs(path, exist_ok=True)
  backend.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": SPECIALS[0],
            "pad_token": SPECIALS[0],
            "chat_template": TEMPLATE,
        },
        f,
    )
  return path


def byte_tokenizer(path: str) -> str:
  """Byte-level tokenizer without merges: ids 0-255 are bytes, 256-257 the specials."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (len(c), c))
  backend = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(SPECIALS)
  return _save(backend, path)


def bpe_tokenizer(path: str, files: list[str]) -> str:
  """Byte-level BPE of 320 tokens trained on ``files`` (specials first: ids 0-1)."""
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320,
      special_tokens=SPECIALS,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  backend.train(files, trainer)
  return _save(backend, path)


def qwen_teacher(root: str, vocab: int, seed: int) -> str:
  """A random one-layer Qwen3 teacher converted to orbax (float32); returns its directory."""
  hf_dir, out = os.path.join(root, "hf"), os.path.join(root, "orbax")
  tiny_qwen("qwen3", hf_dir, tied=True, vocab=vocab, head_dim=8, num_layers=1, seed=seed)
  teachers.convert_teacher(hf_dir, out, param_dtype="float32")
  return out


def llada2_teacher(root: str, vocab: int) -> str:
  """A random synthetic LLaDA2 MoE (8 experts, 2 active) converted to orbax (float32)."""
  hf = teachers_fixtures.tiny_llada2_config(
      vocab_size=vocab, pad_token_id=vocab - 2, eos_token_id=vocab - 1, num_hidden_layers=2
  )
  hf_dir, out = os.path.join(root, "hf"), os.path.join(root, "orbax")
  teachers_fixtures.write_checkpoint(
      hf_dir, hf, teachers_fixtures.random_llada2_tensors(hf, seed=3, scale=0.1)
  )
  teachers.convert_teacher(hf_dir, out, param_dtype="float32")
  return out


def tiny_config(
    *,
    recipe: str,
    tokenizer: str,
    teacher_tokenizer: str | None,
    teacher_name: str = "qwen_bidirectional",
    teacher_checkpoint: str = "",
    teacher_mask_id: int = 257,
    train_files,
    eval_files,
    cache_dir: str,
    mesh: dict | None = None,
    num_steps: int = 3,
    batch_size: int = 8,
) -> ml_collections.ConfigDict:
  """A 3-step distillation (or BD3LM) run of a 2-layer student on 32-token rows."""
  c = common.base_config()
  c.seed = 0
  c.block_size = 16
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers = STUDENT_VOCAB, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size = 4, 2, 8, 64
  m.max_position_embeddings = 256
  c.objective.mask_token_id = 257
  c.objective.row_block = 256
  d = c.data
  d.format, d.tokenizer, d.max_len = "text", tokenizer, 32
  d.train_files, d.eval_files, d.cache_dir = list(train_files), list(eval_files), cache_dir
  o = c.optim
  # eps well above the gradients' rounding noise: Adam's m / sqrt(v) would otherwise turn
  # a gradient of ~1e-9 into a full-size step whose sign depends on summation order.
  o.learning_rate, o.warmup_steps, o.eps, o.weight_decay = 2e-3, 0, 1e-4, 0.0
  t = c.train
  t.batch_size, t.num_steps = batch_size, num_steps
  t.log_every, t.eval_every, t.eval_batches = 1, 0, 1
  t.checkpoint_every, t.keep_checkpoints = 1000, 2
  for key, value in (mesh or {}).items():
    c.mesh[key] = value
  if recipe == "bd3lm":
    return c
  cross = recipe == "tide_cross"
  d.teacher_tokenizer = teacher_tokenizer
  d.teacher_max_len = 32
  d.alignment = "chunks" if cross else "positions"
  c.distill = common.distill_config()
  c.distill.recipe = recipe
  c.distill.alignment = d.alignment
  c.distill.max_chunks = 32
  c.distill.chunk_temperature = 2.0
  c.teacher = common.teacher_config(
      teacher_name,
      checkpoint=teacher_checkpoint,
      tokenizer=teacher_tokenizer,
      mask_token_id=teacher_mask_id,
      param_dtype="float32",
      dtype="float32",
  )
  return c


def get_config(arg: str) -> ml_collections.ConfigDict:
  """``--config=tests/parallel_fixtures.py:ARGS.json``: ``tiny_config(**json)`` for CLI tests."""
  with open(arg) as f:
    return tiny_config(**json.load(f))
