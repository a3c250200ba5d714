"""HumanEval harness: canonical solutions pass, bad programs fail safely, pass@k is exact."""

from __future__ import annotations

import json
import math
import os
import random
import signal
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
  # posix.fork: os.fork itself is disabled by the guards.
  fork_and_sleep = "    import posix, time\n    posix.fork()\n    time.sleep(100)\n"
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


def test_exiting_early_with_status_zero_does_not_pass(problems):
  p = problems["HumanEval/0"]
  full = "```python\nimport sys\nsys.exit(0)\ndef has_close_elements(numbers, threshold):\n    pass\n```"
  early = [
      "    raise SystemExit(0)\n",
      "    import os\n    os._exit(0)\n",
      "    import sys\n    sys.exit(0)\n",
      "    exit(0)\n",
      full,
  ]
  results = humaneval.check_completions(
      {p["task_id"]: p}, {p["task_id"]: early + [p["canonical_solution"]]}, timeout_s=5.0
  )[p["task_id"]]
  assert [r["status"] for r in results] == ["failed"] * len(early) + ["passed"], results


def test_each_program_runs_in_its_own_empty_directory():
  res = humaneval.run_program("import os\nassert os.listdir('.') == [], os.listdir('.')\n")
  assert res.passed, res.detail


def test_guards_block_os_system_and_changes_to_files_outside_the_directory(tmp_path):
  victim = tmp_path / "victim.txt"
  victim_dir = tmp_path / "victim_dir"
  victim_dir.mkdir()
  (victim_dir / "keep.txt").write_text("keep")
  created = tmp_path / "created.txt"
  attacks = [
      f"import os\nos.system('rm -f {victim}')",
      f"import os\nos.remove('{victim}')",
      f"import os\nos.unlink('{victim}')",
      f"import shutil\nshutil.rmtree('{victim_dir}')",
      f"import os\nos.rename('{victim}', '{created}')",
      f"open('{victim}', 'w').write('overwritten')",
      f"import pathlib\npathlib.Path('{created}').write_text('new')",
      f"import os\nos.close(os.open('{created}', os.O_CREAT | os.O_WRONLY))",
      f"import subprocess\nsubprocess.run(['rm', '-f', '{victim}'])",
  ]
  for source in attacks:
    victim.write_text("original")
    res = humaneval.run_program(source)
    assert res.status == "failed", (source, res)
    assert victim.read_text() == "original", source
    assert (victim_dir / "keep.txt").read_text() == "keep", source
    assert not created.exists(), source


def _processes_with(tag: str) -> list[int]:
  found = []
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/cmdline", "rb") as f:
        if tag.encode() in f.read():
          found.append(int(name))
    except (OSError, ValueError):
      continue
  return found


def _sleep_tag() -> str:
  """A unique ``sleep`` argument (seconds) to find a program's processes by."""
  return f"86{random.randrange(10**6):06d}.5"


def _kill(pids: list[int]) -> None:
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_process_count_is_limited_and_no_process_outlives_the_program():
  tag = _sleep_tag()
  bomb = (
      "import posix, time\n"
      "for _ in range(60):\n"
      "    if posix.fork() == 0:\n"
      f"        posix.execv('/bin/sleep', ['sleep', '{tag}'])\n"
      "time.sleep(5)\n"
  )
  res = humaneval.run_program(bomb, timeout_s=10.0)  # at most 16 processes by default
  survivors = _processes_with(tag)
  _kill(survivors)
  assert res.status == "failed", res
  # Root is exempt from RLIMIT_NPROC: the supervisor's count stops the program instead.
  assert "more than 16 processes" in res.detail or "BlockingIOError" in res.detail, res
  assert survivors == []


def test_a_double_forked_setsid_child_does_not_outlive_the_program():
  tag = _sleep_tag()
  escape = (
      "import posix, time\n"
      "child = posix.fork()\n"
      "if child == 0:\n"
      "    posix.setsid()\n"
      "    if posix.fork() == 0:\n"
      f"        posix.execv('/bin/sleep', ['sleep', '{tag}'])\n"
      "    posix._exit(0)\n"
      "posix.waitpid(child, 0)\n"
      "time.sleep(0.5)\n"
  )
  res = humaneval.run_program(escape, timeout_s=5.0)
  survivors = _processes_with(tag)
  _kill(survivors)
  assert res.passed, res  # the program itself completed; what it left behind was killed
  assert survivors == []
