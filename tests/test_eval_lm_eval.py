"""lm-evaluation-harness through the ``tide_jax`` adapter on a tiny trained student.

The tasks are the repository's own (tests/lm_eval_tasks: YAML over a JSON file), and the
harness runs with every socket connection refused, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from configs import smoke
from tests.test_train_e2e import REPO, run_main
from tide_jax.diffusion import masks, sampler, schedules
from tide_jax import modes
from tide_jax.eval import bpb, harness, sample_cli
from tide_jax import lm_eval as tide_lm_eval
from tide_jax.train import loop

TASKS = os.path.join(REPO, "tests", "lm_eval_tasks")
GEN_DOCS = json.load(open(os.path.join(TASKS, "tide_tiny.json")))["generation"]
MAX_NEW = 32
STEPS = 8


def tiny_config(root):
  c = smoke.get_config("bd3lm")
  c.data.restrict_vocab = False  # the prompts below are encoded with the full tokenizer
  c.data.max_len = 64
  c.data.train_files = ["pystdlib://json/*.py"]
  c.data.cache_dir = str(root / "cache")
  c.train.batch_size = 2
  c.train.num_steps = 6
  c.train.eval_every = 6
  c.train.eval_batches = 1
  c.train.checkpoint_every = 6
  c.optim.warmup_steps = 2
  c.sampler.max_new_tokens = MAX_NEW
  c.sampler.steps_per_block = STEPS
  c.eval.bpb_files = ["pystdlib://this.py"]
  c.eval.bpb_max_texts = 1
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  config = tiny_config(root)
  workdir = str(root / "wd")
  loop.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope="module")
def lm(trained):
  _, workdir = trained
  return tide_lm_eval.TideJaxLM(workdir=workdir, batch_size=4, bound_grid=4)


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def request(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_local_tasks_through_the_registered_model(trained, no_network, monkeypatch, capsys):
  config, workdir = trained
  calls = []
  plain_generate = sampler.generate

  def spy(model, prompts, cfg, key=None):
    tokens, new = plain_generate(model, prompts, cfg, key)
    calls.append((prompts, cfg, new))
    return tokens, new

  monkeypatch.setattr(sampler, "generate", spy)
  results = lm_eval.simple_evaluate(
      model="tide_jax",
      model_args=f"workdir={workdir}",
      tasks=["tide_tiny_gen", "tide_tiny_mc"],
      task_manager=TaskManager(include_path=TASKS),
      apply_chat_template=True,
      log_samples=True,
      batch_size=4,
  )
  gen, mc = results["results"]["tide_tiny_gen"], results["results"]["tide_tiny_mc"]
  assert 0.0 <= gen["exact_match,none"] <= 1.0 and "exact_match_stderr,none" in gen
  for metric in ("acc,none", "acc_norm,none"):
    assert mc[metric] * 5 == pytest.approx(round(mc[metric] * 5), abs=1e-9)  # 5 documents
    assert 0.0 <= mc[metric] <= 1.0 and metric.replace(",", "_stderr,") in mc
  assert results["n-shot"] == {"tide_tiny_gen": 0, "tide_tiny_mc": 0}
  assert results["n-samples"]["tide_tiny_mc"] == {"original": 5, "effective": 5}
  assert results["config"]["block_size"] == 32 and results["config"]["steps_per_block"] == STEPS
  for sample in results["samples"]["tide_tiny_mc"]:
    assert len(sample["resps"]) == 2  # one (log-likelihood bound, is_greedy) per choice
    for ((value, is_greedy),) in sample["resps"]:
      assert value < 0 and isinstance(is_greedy, bool)

  # Generation is --mode=sample's: the same chat-rendered prompt ids, the same sampler
  # settings, the same new tokens, and the reply cut at the task's stop string.
  prompts = [doc["prompt"] for doc in GEN_DOCS]
  tokenizer = bpb.student_tokenizer(config)
  cfg = modes.sampler_config(config, tokenizer)
  expected_ids = sample_cli.encode_prompts(tokenizer, prompts)
  wanted = {tuple(ids) for ids in expected_ids}
  generation_calls = [c for c in calls if any(tuple(p) in wanted for p in c[0])]
  assert len(generation_calls) == 1  # 4 prompts in one batch of 4
  harness_prompts, harness_cfg, harness_new = generation_calls[0]
  assert harness_cfg == cfg
  by_prompt = {tuple(p): n for p, n in zip(harness_prompts, harness_new)}
  assert sorted(by_prompt) == sorted(tuple(p) for p in expected_ids)

  recorded = []
  plain_timed = sample_cli.timed_generate
  monkeypatch.setattr(
      sample_cli,
      "timed_generate",
      lambda *a: recorded.append(plain_timed(*a)) or recorded[-1],
  )
  generations, _ = modes.run_sample(config, workdir, prompts, chat=False)
  ((sample_new, _),) = recorded
  for ids, new in zip(expected_ids, sample_new):
    assert by_prompt[tuple(ids)] == new
  replies = {s["doc"]["prompt"]: s["resps"][0][0] for s in results["samples"]["tide_tiny_gen"]}
  for prompt, generation in zip(prompts, generations):
    assert replies[prompt] == harness.cut_at_stop(generation.text, ["</answer>"])
  assert any(generation.new_tokens > 0 for generation in generations)


def reference_bound(model, context, continuation, block, grid, max_length, seed=0):
  """-log p(continuation | context) bound re-derived with float64 log-softmax."""
  ctx_len = -(-len(context) // block) * block
  length = ctx_len + -(-len(continuation) // block) * block
  ids = np.zeros(length, np.int64)
  valid = np.zeros(length, bool)
  ids[ctx_len - len(context) : ctx_len] = context
  ids[ctx_len : ctx_len + len(continuation)] = continuation
  valid[ctx_len - len(context) : ctx_len + len(continuation)] = True
  u = np.ones(length, np.float32)
  u[ctx_len : ctx_len + len(continuation)] = (
      np.random.default_rng(seed).random(max_length)[: len(continuation)].astype(np.float32)
  )
  both = np.concatenate([valid, valid])
  attn = masks.bd3lm_attention_mask(length, block)[None] & both[None, None, :]
  positions = np.tile(np.arange(length), 2)[None]
  total = 0.0
  for t in (np.arange(grid) + 0.5) / grid:
    masked = u < np.float32(1.0 - schedules.alpha(jnp.float32(t)))
    x_t = np.where(masked, 151669, ids)
    hidden = model.hidden_states(jnp.asarray(np.concatenate([x_t, ids])[None]), positions, attn)
    logits = np.asarray(model.logits(hidden[:, :length]), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -logp[np.arange(length), ids]
    total += float(schedules.loss_weight(jnp.float32(t))) * nll[masked].sum()
  return total / grid


def test_loglikelihood_is_the_conditional_diffusion_bound(lm):
  short = ("import json\n", "def load(path):")
  long = ("x = 1\n" * 30, " return x")
  other = ("class A:\n    def f(self):", "\n        pass")
  alone = lm.loglikelihood([request("loglikelihood", *short)])
  batch = lm.loglikelihood([request("loglikelihood", *r) for r in (long, short, other)])
  # Left padding and batching leave a request's score unchanged.
  np.testing.assert_allclose(batch[1][0], alone[0][0], rtol=1e-5)
  for pair, (value, _) in zip((long, short, other), batch):
    context, continuation = lm._encode_pair(*pair)
    bound = reference_bound(
        lm.model, context, continuation, block=32, grid=lm.bound.grid, max_length=lm.max_length
    )
    np.testing.assert_allclose(-value, bound, rtol=1e-4)
  # A continuation that is not the greedy one is not greedy; the greedy one is.
  context = lm._encode("def load(path):\n")
  greedy_cfg = dataclasses.replace(lm.sampler_config, max_new_tokens=32, temperature=0.0)
  _, (greedy,) = sampler.generate(lm.model, [context], greedy_cfg)
  assert len(greedy) >= 4
  altered = greedy[:3] + [(greedy[3] + 1) % 1000]
  assert lm._greedy_matches([(context, greedy[:4]), (context, altered)]) == [True, False]
  # Rolling likelihood: the bound over the whole text in windows of data.max_len (64 here),
  # the bits-per-byte evaluator's number in nats.
  text = "import os\nimport sys\n\n\ndef main(argv):\n    return len(argv)\n" * 10
  assert len(lm._encode(text)) > 2 * lm.rolling_window
  (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
  result = bpb.bits_per_byte(
      lm.model,
      lm.tokenizer,
      [text],
      block_size=32,
      max_len=64,
      mask_token_id=151669,
      grid=lm.bound.grid,
  )
  assert result.num_windows == 3
  np.testing.assert_allclose(-rolling, result.total_bits * np.log(2.0), rtol=1e-6)


def test_exported_directory_generates_what_the_workdir_does(trained, lm, tmp_path):
  config, workdir = trained
  export_dir = modes.run_export(config, workdir, str(tmp_path / "hf"))
  exported = tide_lm_eval.TideJaxLM(
      pretrained=export_dir,
      max_new_tokens=MAX_NEW,
      steps_per_block=STEPS,
      context_len=int(config.sampler.context_len),
      bound_grid=lm.bound.grid,
      batch_size=4,
  )
  assert exported.sampler_config == lm.sampler_config
  requests = [request("generate_until", d["prompt"], {"until": ["\n\n\n"]}) for d in GEN_DOCS]
  assert exported.generate_until(requests) == lm.generate_until(requests)
  scored = [request("loglikelihood", "import", " json")]
  np.testing.assert_allclose(exported.loglikelihood(scored)[0][0], lm.loglikelihood(scored)[0][0])


def test_task_overrides_are_reported(lm, capsys):
  asks = {"until": ["\n"], "max_gen_toks": 1024, "do_sample": True, "temperature": 0.7}
  lm.generate_until([request("generate_until", "import", asks)])
  out = capsys.readouterr().out
  assert "task asked for max_gen_toks=1024; generated max_new_tokens=32 (1x)" in out
  assert "task asked for do_sample=True, temperature=0.7; sampled at temperature=0.0" in out


def test_mode_eval_writes_the_harness_table_next_to_bits_per_byte(trained):
  _, workdir = trained
  res = run_main(
      f"--workdir={workdir}",
      "--mode=eval",
      "--config.data.restrict_vocab=False",
      "--config.data.max_len=64",
      f"--config.sampler.max_new_tokens={MAX_NEW}",
      f"--config.sampler.steps_per_block={STEPS}",
      "--config.eval.tasks=tide_tiny_mc",
      "--config.eval.task_paths=tests/lm_eval_tasks",
      "--config.eval.limit=3",
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert "|tide_tiny_mc|" in res.stdout and "bits/byte" in res.stdout
  report = json.loads(open(os.path.join(workdir, "eval.json")).read())
  assert report["bits_per_byte"] > 0
  mc = report["lm_eval"]["results"]["tide_tiny_mc"]
  assert mc["acc,none"] * 3 == pytest.approx(round(mc["acc,none"] * 3), abs=1e-9)
  assert report["lm_eval"]["n-shot"] == {"tide_tiny_mc": 0}
  assert "|tide_tiny_mc|" in open(os.path.join(workdir, "lm_eval.md")).read()


def test_sampler_steps_do_not_move_the_block_size():
  c = smoke.get_config("bd3lm")
  assert c.sampler.steps_per_block == 32  # one token per step by default
  c.sampler.steps_per_block = STEPS
  assert (c.block_size, c.data.block_size, c.objective.block_size) == (32, 32, 32)
  c.block_size = 16
  assert c.sampler.steps_per_block == STEPS and c.data.block_size == 16


def test_bad_arguments_are_one_sentence(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(ValueError, match="exactly one of workdir=DIR"):
    tide_lm_eval.TideJaxLM()
  with pytest.raises(ValueError, match="batch_size must be an integer for tide_jax"):
    tide_lm_eval.TideJaxLM(workdir=workdir, batch_size="auto")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    tide_lm_eval.TideJaxLM(workdir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown lm-evaluation-harness task"):
    harness.run_tasks(None, ["no_such_task_anywhere"], task_paths=[TASKS])
  done = subprocess.run(
      [
          sys.executable,
          "-m",
          "tide_jax.lm_eval",
          "run",
          "--model=tide_jax",
          f"--model_args=workdir={workdir},steps=4",
          "--tasks=tide_tiny_mc",
          f"--include_path={TASKS}",
      ],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1"),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 2
  assert "error: Unknown tide_jax model argument(s) steps; use workdir, pretrained" in done.stderr
  assert "Traceback" not in done.stderr
