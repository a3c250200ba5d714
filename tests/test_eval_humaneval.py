"""HumanEval harness: canonical solutions pass, bad programs fail safely, pass@k is exact."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tide_jax.data.tokenizers import get_tokenizer
from tide_jax.eval import humaneval


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def test_canonical_solutions_pass_and_empty_completions_fail(problems, tmp_path):
  assert len(problems) == 164
  canonical = {t: [p["canonical_solution"]] for t, p in problems.items()}
  empty = {t: [""] for t in problems}
  both = {t: canonical[t] + empty[t] for t in problems}
  start = time.monotonic()
  results = humaneval.check_completions(problems, both, workers=2, timeout_s=5.0)
  elapsed = time.monotonic() - start
  ok = humaneval.score({t: r[:1] for t, r in results.items()}, ks=(1,))
  bad = humaneval.score({t: r[1:] for t, r in results.items()}, ks=(1,))
  failing = [t for t, r in results.items() if r[0]["status"] != "passed"]
  assert failing == [], [results[t][0]["detail"] for t in failing[:3]]
  assert ok["summary"]["pass@1"] == 1.0 and ok["num_problems"] == 164
  assert bad["summary"]["pass@1"] == 0.0
  # Both samples together: exactly one of two passes, so pass@1 = 0.5 and pass@2 = 1.
  both_scores = humaneval.score(results, ks=(1, 2))
  assert both_scores["summary"] == {"pass@1": 0.5, "pass@2": 1.0}
  path = str(tmp_path / "he.json")
  humaneval.write_report(path, both_scores, results, {"note": "canonical + empty"})
  report = json.load(open(path))
  assert report["problems"]["HumanEval/0"]["samples"][0]["status"] == "passed"
  assert report["problems"]["HumanEval/0"]["correct"] == 1
  print(f"328 programs checked in {elapsed:.1f} s")


def test_infinite_loop_and_unbounded_allocation_fail_within_the_timeout(problems):
  p = problems["HumanEval/0"]
  loop = "    while True:\n        pass\n"
  fork_and_sleep = "    import os, time\n    os.fork()\n    time.sleep(100)\n"
  start = time.monotonic()
  results = humaneval.check_completions(
      {p["task_id"]: p}, {p["task_id"]: [loop, fork_and_sleep]}, workers=2, timeout_s=2.0
  )
  assert [r["status"] for r in results[p["task_id"]]] == ["timeout", "timeout"]
  assert time.monotonic() - start < 8.0
  # The memory limit, not the clock, stops an unbounded allocation (the timeout is long).
  hog = "    x = []\n    while True:\n        x.append(bytearray(10**7))\n"
  start = time.monotonic()
  res = humaneval.check_completions(
      {p["task_id"]: p}, {p["task_id"]: [hog]}, timeout_s=20.0, memory_mb=256
  )[p["task_id"]][0]
  assert res["status"] == "failed" and "MemoryError" in res["detail"]
  assert time.monotonic() - start < 20.0
  # The evaluator is still healthy.
  assert humaneval.run_program("print('fine')").passed
  assert humaneval.run_program("raise SystemExit(3)").status == "failed"


def test_programs_run_in_a_separate_process():
  # A program that kills its own process must not take the evaluator with it.
  res = humaneval.run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
  assert res.status == "failed"
  assert humaneval.run_program(f"import os\nassert os.getpid() != {os.getpid()}\n").passed


@given(st.integers(1, 60), st.data())
def test_pass_at_k_equals_the_closed_form(n, data):
  c = data.draw(st.integers(0, n))
  k = data.draw(st.integers(1, n))
  expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
  with pytest.raises(ValueError, match="1 <= k <= n"):
    humaneval.pass_at_k(3, 1, 5)


def test_completion_post_processing(problems):
  p = problems["HumanEval/0"]
  body = p["canonical_solution"]
  fenced = "Here you go:\n```python\n" + p["prompt"] + body + "```\nDone."
  assert humaneval.completion_to_program(p, fenced) == p["prompt"] + body
  # A bare body is cut at the first new top-level statement.
  tail = body + "\n\ndef unrelated():\n    pass\nprint(1)\n"
  assert humaneval.completion_to_program(p, tail) == p["prompt"] + body + "\n"
  # A full function without the prompt's imports still gets them (List from typing).
  only_def = (
      "```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
      + body
      + "```"
  )
  program = humaneval.completion_to_program(p, only_def)
  assert program.startswith("from typing import List")
  res = humaneval.run_program(humaneval.test_program(p, program))
  assert res.passed, res.detail
  # An unterminated fence runs to the end of the reply.
  assert humaneval.completion_to_program(p, "```python\n" + body) == p["prompt"] + body


def test_chat_prompt_uses_the_students_template(problems):
  tok = get_tokenizer("qwen3")
  text = humaneval.chat_prompt(tok, problems["HumanEval/3"])
  # The Qwen3 format with thinking disabled: the prompt ends in an empty think block.
  assert text.startswith("<|im_start|>user\n")
  assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert problems["HumanEval/3"]["prompt"] in text


def test_unknown_problem_id_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown HumanEval problem id.*HumanEval/999"):
    humaneval.load_problems(["HumanEval/1", "HumanEval/999"])
  with pytest.raises(ValueError, match="unknown problem id"):
    humaneval.check_completions(humaneval.load_problems(["HumanEval/1"]), {"Foo/1": ["x"]})


def test_end_to_end_with_a_tiny_student_writes_the_report(tmp_path):
  from tests.sampler_fixtures import tiny_decoder
  from tide_jax.diffusion import sampler

  tok = get_tokenizer("qwen3")
  model = tiny_decoder(seed=6, scale=3.0, vocab=151936)
  cfg = sampler.SamplerConfig(
      block_size=4,
      steps_per_block=4,
      max_new_tokens=8,
      mask_token_id=151669,
      eos_token_id=tok.eos_token_id,
      context_len=1024,
  )
  path = str(tmp_path / "humaneval.json")
  tasks = ["HumanEval/2", "HumanEval/0"]
  scores = humaneval.evaluate_humaneval(
      model, tok, cfg, out_json=path, task_ids=tasks, batch_size=2, timeout_s=3.0
  )
  report = json.load(open(path))
  assert list(report["problems"]) == tasks and report["num_problems"] == 2
  assert report["settings"]["block_size"] == 4 and report["settings"]["num_samples"] == 1
  for task in tasks:
    sample = report["problems"][task]["samples"][0]
    assert sample["status"] in ("passed", "failed", "timeout")
    assert sample["program"] == humaneval.completion_to_program(
        humaneval.load_problems([task])[task], sample["completion"]
    )
  per = [report["problems"][t]["pass@1"] for t in tasks]
  assert scores["summary"]["pass@1"] == pytest.approx(np.mean(per))
  with pytest.raises(ValueError, match="k=5 needs at least that many samples"):
    humaneval.evaluate_humaneval(model, tok, cfg, out_json=path, ks=(1, 5), task_ids=tasks)
