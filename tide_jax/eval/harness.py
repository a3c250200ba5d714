"""A trained block-diffusion student behind lm-evaluation-harness's ``LM`` interface.

* ``generate_until``: the cached BD3LM block sampler (:mod:`tide_jax.diffusion.sampler`)
  with the configured :class:`~tide_jax.diffusion.sampler.SamplerConfig`; prompts are
  encoded without special tokens (with ``apply_chat_template`` the harness renders the
  chat template first), so a prompt generates exactly what ``--mode=sample`` generates
  for it. Each reply is cut at the first of the task's ``until`` strings.
* ``loglikelihood``: a diffusion model has no exact likelihood; the score is the negative
  of the masked-diffusion **bound** (:func:`tide_jax.eval.bpb.window_nats`, the ELBO the
  student is trained on), conditioned on the context: context tokens are visible and
  never masked, only the continuation is masked and scored. ``log p >= -bound``, so the
  returned number is a lower bound on the log-likelihood, evaluated on a fixed grid of t
  with fixed masks (the same per-token thresholds for every request, so the choices of
  a multiple-choice question are scored under the same noise). The context is
  left-padded to a block boundary, so the continuation starts on a new block, as a
  generation does. ``is_greedy`` says whether the block sampler at temperature 0 would
  generate exactly the continuation.
* ``loglikelihood_rolling``: the same bound over the whole text, in independent windows
  of ``rolling_window`` tokens (each window starts without context, which only loosens
  the bound, as in :mod:`tide_jax.eval.bpb`).

The bound runs the student on ``[x_t ; x_0]`` with a dense ``2L x 2L`` attention mask, so
its memory grows with the square of the row length; ``max_length`` (default 2,048, the
harness's default for HF models) and ``rolling_window`` (default 512, the student's
training length in the paper) keep rows short.

The sampler's settings govern every generation: the budget is ``max_new_tokens`` and the
temperature is the sampler's (the paper's protocol uses the same 256-token budget for
every benchmark). A task that asks for other values is named once in a notice.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from lm_eval.api.model import LM
from lm_eval.utils import make_table

from tide_jax.diffusion import sampler
from tide_jax.eval import bpb

DEFAULT_MAX_LENGTH = 2048  # context + continuation scored by loglikelihood
DEFAULT_ROLLING_WINDOW = 512  # tokens per window of loglikelihood_rolling


@dataclasses.dataclass(frozen=True)
class BoundSettings:
  """How ``loglikelihood`` evaluates the diffusion bound.

  Attributes:
    grid: midpoint times of the t integral (``eval.bpb_grid``).
    seed: seed of the fixed per-token mask thresholds.
    schedule: the student's alpha(t) schedule.
  """

  grid: int = 8
  seed: int = 0
  schedule: str = "linear"


def _until_list(until: Any) -> list[str]:
  if until is None:
    return []
  if isinstance(until, str):
    return [until]
  return [u for u in until if u]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """``text`` up to the earliest occurrence of any stop string."""
  end = len(text)
  for stop in until:
    hit = text.find(stop)
    if hit != -1:
      end = min(end, hit)
  return text[:end]


class BlockDiffusionLM(LM):
  """lm-evaluation-harness model over an in-memory student.

  Args:
    model: a :class:`tide_jax.models.dense.DenseDecoder` trained as a BD3LM student.
    tokenizer: its tokenizer (``PreTrainedTokenizerFast``).
    sampler_config: block size, steps per block, budget, temperature, order, schedule,
      mask and EOS ids, context length.
    max_length: longest context + continuation the likelihood scores, in tokens (longer
      contexts lose their beginning); default ``DEFAULT_MAX_LENGTH`` or the context
      length when that is shorter.
    rolling_window: tokens per window of ``loglikelihood_rolling`` (a multiple of the block
      size); default ``DEFAULT_ROLLING_WINDOW``.
    batch_size: prompts per sampler call and rows per bound evaluation.
    bound: settings of the likelihood bound.
    greedy_check: compute ``is_greedy`` for ``loglikelihood`` by generating (one extra
      sampler call per batch); False reports ``is_greedy=False`` for every request, which
      only the tasks that read it (e.g. LAMBADA's accuracy) notice.
    seed: PRNG seed of the sampler (used when the temperature is above 0).
    info: extra fields for the harness's results ``config`` (where the model came from).
  """

  def __init__(
      self,
      model,
      tokenizer,
      sampler_config: sampler.SamplerConfig,
      *,
      max_length: int | None = None,
      rolling_window: int = DEFAULT_ROLLING_WINDOW,
      batch_size: int = 8,
      bound: BoundSettings = BoundSettings(),
      greedy_check: bool = True,
      seed: int = 0,
      info: dict | None = None,
  ):
    super().__init__()
    sampler_config.validate()
    if batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    self.model = model
    self.tokenizer = tokenizer
    self.sampler_config = sampler_config
    self.max_length = int(max_length or min(DEFAULT_MAX_LENGTH, sampler_config.context_len))
    self.rolling_window = int(rolling_window)
    for name, value in (("max_length", self.max_length), ("rolling_window", self.rolling_window)):
      if value < sampler_config.block_size or value % sampler_config.block_size:
        raise ValueError(
            f"{name}={value} must be a positive multiple of the block size "
            f"{sampler_config.block_size}."
        )
    self.batch_size = int(batch_size)
    self.bound = bound
    self.greedy_check = bool(greedy_check)
    self.seed = int(seed)
    self.info = dict(info or {})
    self.notices: collections.Counter[str] = collections.Counter()

  # ------------------------------------------------------------------ harness hooks
  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", "") or "tide_jax").replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return getattr(self.tokenizer, "chat_template", None) or ""

  def apply_chat_template(
      self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
  ) -> str:
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
    )

  def get_model_info(self) -> dict:
    cfg = self.sampler_config
    return {
        **self.info,
        "block_size": cfg.block_size,
        "steps_per_block": cfg.steps_per_block,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "order": cfg.order,
        "loglikelihood": f"diffusion bound (grid {self.bound.grid}, seed {self.bound.seed})",
    }

  # ------------------------------------------------------------------ tokens
  def _encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False) if text else []

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where encoding them together splits.

    Trailing spaces of the context move to the continuation (where tokenizers attach
    them); an empty context becomes the EOS token, as the harness's HF models use their
    end-of-text token, since the bound and the sampler need at least one context token.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
      continuation = context[-spaces:] + continuation
      context = context[:-spaces]
    if not context:
      return [self.sampler_config.eos_token_id], self._encode(continuation)
    whole = self._encode(context + continuation)
    head = self._encode(context)
    if whole[: len(head)] != head:
      self._note("context and continuation merge into one token; continuation encoded alone")
      return head, self._encode(continuation)
    return head, whole[len(head) :]

  def _note(self, message: str) -> None:
    self.notices[message] += 1

  def report_notices(self) -> list[str]:
    """Prints and clears what was adjusted or overridden (with counts)."""
    lines = [f"{message} ({count}x)" for message, count in sorted(self.notices.items())]
    for line in lines:
      print(f"tide_jax lm_eval: {line}", flush=True)
    self.notices.clear()
    return lines

  # ------------------------------------------------------------------ generation
  def _prompt_limit(self, cfg: sampler.SamplerConfig) -> int:
    budget = cfg.num_blocks * cfg.block_size
    return (cfg.context_len - budget) // cfg.block_size * cfg.block_size

  def _generate(self, prompts: list[list[int]], cfg: sampler.SamplerConfig) -> list[list[int]]:
    """New tokens (up to EOS) for each prompt, batched in order of length."""
    limit = self._prompt_limit(cfg)
    if limit < 1:
      raise ValueError(
          f"context_len={cfg.context_len} leaves no room for a prompt next to "
          f"{cfg.max_new_tokens} new tokens; raise context_len or lower max_new_tokens."
      )
    fitted = []
    for ids in prompts:
      if len(ids) > limit:
        self._note(f"prompt cut to its last {limit} tokens to fit context_len={cfg.context_len}")
        ids = ids[-limit:]
      fitted.append(ids)
    order = sorted(range(len(fitted)), key=lambda i: -len(fitted[i]))
    out: list[list[int]] = [[] for _ in fitted]
    key = jax.random.PRNGKey(self.seed)
    width = min(self.batch_size, len(order))
    for start in range(0, len(order), width):
      batch = order[start : start + width]
      prompts_in = [fitted[i] for i in batch]
      # A short last batch is filled with copies of its first prompt, so every batch of one
      # padded length reuses one compiled program (the sampler is batch-invariant).
      prompts_in += [prompts_in[0]] * (width - len(prompts_in))
      _, new = sampler.generate(self.model, prompts_in, cfg, jax.random.fold_in(key, start))
      for i, tokens in zip(batch, new):
        out[i] = tokens
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    cfg = self.sampler_config
    prompts, stops = [], []
    for request in requests:
      context, gen_kwargs = request.args
      gen_kwargs = dict(gen_kwargs or {})
      stops.append(_until_list(gen_kwargs.pop("until", None)))
      asked = gen_kwargs.pop("max_gen_toks", None)
      if asked is not None and int(asked) != cfg.max_new_tokens:
        self._note(
            f"task asked for max_gen_toks={asked}; generated max_new_tokens={cfg.max_new_tokens}"
        )
      do_sample = bool(gen_kwargs.pop("do_sample", False))
      temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
      if (temperature if do_sample else 0.0) != cfg.temperature:
        self._note(
            f"task asked for do_sample={do_sample}, temperature={temperature}; sampled at "
            f"temperature={cfg.temperature}"
        )
      for name in sorted(gen_kwargs):
        self._note(f"generation argument {name}={gen_kwargs[name]!r} has no sampler equivalent")
      ids = self._encode(context)
      if not ids:
        self._note("empty prompt replaced by the EOS token")
        ids = [cfg.eos_token_id]
      prompts.append(ids)
    replies = []
    for request, tokens, until in zip(requests, self._generate(prompts, cfg), stops):
      text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
      self.cache_hook.add_partial("generate_until", request.args, text)
      replies.append(text)
    self.report_notices()
    return replies

  # ------------------------------------------------------------------ likelihood
  def _bound_rows(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """The bound in nats on ``-log p(continuation | context)`` for each pair: ``[n]``.

    Rows are ``[padding, context | continuation, padding]`` with the context ending and
    the continuation starting on a block boundary. Rows of one padded length share one
    compiled program.
    """
    bsz = self.sampler_config.block_size
    thresholds = np.random.default_rng(self.bound.seed).random(self.max_length).astype(np.float32)
    buckets: dict[int, list[int]] = collections.defaultdict(list)
    layouts = []
    for i, (context, continuation) in enumerate(pairs):
      cont_len = -(-len(continuation) // bsz) * bsz
      if cont_len + bsz > self.max_length:
        raise ValueError(
            f"A continuation of {len(continuation)} tokens does not fit max_length="
            f"{self.max_length} with a block of context; raise max_length."
        )
      room = self.max_length - cont_len
      if len(context) > room:
        self._note(f"context cut to its last {room} tokens to fit max_length={self.max_length}")
        context = context[-room:]
      ctx_len = -(-len(context) // bsz) * bsz
      layouts.append((context, continuation, ctx_len))
      buckets[ctx_len + cont_len].append(i)
    nats = np.zeros(len(pairs), np.float64)
    for length, members in sorted(buckets.items()):
      ids = np.zeros((len(members), length), np.int32)
      valid = np.zeros((len(members), length), bool)
      uniforms = np.ones((len(members), length), np.float32)  # u = 1: never masked
      for row, i in enumerate(members):
        context, continuation, ctx_len = layouts[i]
        ids[row, ctx_len - len(context) : ctx_len] = context
        ids[row, ctx_len : ctx_len + len(continuation)] = continuation
        valid[row, ctx_len - len(context) : ctx_len + len(continuation)] = True
        uniforms[row, ctx_len : ctx_len + len(continuation)] = thresholds[: len(continuation)]
      data = bpb.BpbData(ids, valid, uniforms, num_bytes=0, num_texts=len(members))
      nats[members] = bpb.window_nats(
          self.model,
          data,
          block_size=bsz,
          mask_token_id=self.sampler_config.mask_token_id,
          grid=self.bound.grid,
          schedule=self.bound.schedule,
          batch_size=self.batch_size,
      )
    return nats

  def _greedy_matches(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether greedy block sampling from each context generates exactly its continuation."""
    greedy = dataclasses.replace(self.sampler_config, temperature=0.0)
    by_blocks: dict[int, list[int]] = collections.defaultdict(list)
    for i, (_, continuation) in enumerate(pairs):
      by_blocks[-(-len(continuation) // greedy.block_size)].append(i)
    matches = [False] * len(pairs)
    for blocks, members in by_blocks.items():
      cfg = dataclasses.replace(greedy, max_new_tokens=blocks * greedy.block_size)
      generated = self._generate([pairs[i][0] for i in members], cfg)
      for i, tokens in zip(members, generated):
        continuation = pairs[i][1]
        matches[i] = tokens[: len(continuation)] == continuation
    return matches

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self._encode_pair(*request.args) for request in requests]
    empty = [i for i, (_, continuation) in enumerate(pairs) if not continuation]
    if empty:
      raise ValueError(
          f"{len(empty)} request(s) have an empty continuation (first: request {empty[0]}); "
          "the harness task must give text to score."
      )
    nats = self._bound_rows(pairs)
    greedy = self._greedy_matches(pairs) if self.greedy_check else [False] * len(pairs)
    results = []
    for request, value, is_greedy in zip(requests, nats, greedy):
      result = (-float(value), bool(is_greedy))
      self.cache_hook.add_partial("loglikelihood", request.args, result)
      results.append(result)
    self.report_notices()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for request in requests:
      (text,) = request.args
      data = bpb.prepare_texts(
          self.tokenizer,
          [text],
          max_len=self.rolling_window,
          block_size=self.sampler_config.block_size,
          pad_id=self.sampler_config.eos_token_id,
          seed=self.bound.seed,
      )
      nats = bpb.window_nats(
          self.model,
          data,
          block_size=self.sampler_config.block_size,
          mask_token_id=self.sampler_config.mask_token_id,
          grid=self.bound.grid,
          schedule=self.bound.schedule,
          batch_size=self.batch_size,
      )
      value = -float(nats.sum())
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
      out.append(value)
    return out


def run_tasks(
    lm: LM,
    tasks: Sequence[str],
    *,
    task_paths: Sequence[str] = (),
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 0,
) -> dict:
  """Runs harness tasks on ``lm`` and returns the harness's results dictionary.

  Args:
    lm: the model (e.g. a :class:`BlockDiffusionLM`).
    tasks: harness task or group names (``gsm8k``, ``mmlu``, a task of ``task_paths``).
    task_paths: directories of extra YAML tasks (the harness's ``--include_path``).
    num_fewshot: shots for tasks that do not fix them to 0 (None: each task's default).
    limit: documents per task (None: all).
    apply_chat_template: render prompts with the tokenizer's chat template.
    log_samples: keep every document's prompt and response under ``results["samples"]``.
    seed: the harness's python/numpy/few-shot seeds.
  """
  # The evaluator imports datasets, pandas and the metric libraries (about a second) and
  # the task index reads every bundled task config (several seconds); training, sampling
  # and bits per byte never need either, so they are imported on first use.
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  tasks = [tasks] if isinstance(tasks, str) else list(tasks)
  if not tasks:
    raise ValueError("No harness tasks given; set eval.tasks, e.g. ['gsm8k', 'hellaswag'].")
  manager = TaskManager(include_path=[str(p) for p in task_paths] or None)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ValueError(
        f"Unknown lm-evaluation-harness task(s) {', '.join(unknown)}; check the names "
        "(`python -m lm_eval ls tasks`) or add the directory of your YAML tasks to "
        "eval.task_paths."
    )
  return evaluator.simple_evaluate(
      model=lm,
      tasks=tasks,
      num_fewshot=num_fewshot,
      limit=limit,
      task_manager=manager,
      apply_chat_template=apply_chat_template,
      log_samples=log_samples,
      random_seed=seed,
      numpy_random_seed=seed,
      torch_random_seed=None,
      fewshot_random_seed=seed,
  )


def results_table(results: dict) -> str:
  """The harness's markdown table of a results dictionary (tasks, then groups if any)."""
  table = make_table(results)
  if results.get("groups"):
    table += "\n" + make_table(results, "groups")
  return table


def _names(comma_separated: str) -> list[str]:
  return [name.strip() for name in comma_separated.split(",") if name.strip()]


def run_config_tasks(
    config, workdir: str, model, tokenizer, sampler_config: sampler.SamplerConfig, step
) -> dict[str, Any]:
  """``--mode=eval``'s harness tasks: ``config.eval.tasks`` on the student.

  The table is printed and written to ``<workdir>/lm_eval.md``.

  Returns:
    The harness's per-task metrics (``results``, plus ``groups`` and ``n-shot``).
  """
  ev = config.eval
  lm = BlockDiffusionLM(
      model,
      tokenizer,
      sampler_config,
      rolling_window=int(config.data.max_len),
      batch_size=int(ev.batch_size),
      bound=BoundSettings(grid=int(ev.bpb_grid), seed=0, schedule=config.objective.schedule),
      info={"workdir": str(workdir), "step": step},
  )
  results = run_tasks(
      lm,
      _names(ev.tasks),
      task_paths=_names(ev.task_paths),
      num_fewshot=int(ev.num_fewshot) if int(ev.num_fewshot) >= 0 else None,
      limit=int(ev.limit) or None,
      apply_chat_template=bool(ev.chat_template),
      seed=int(config.seed),
  )
  table = results_table(results)
  print(table, flush=True)
  epath.Path(workdir, "lm_eval.md").write_text(table)
  return {key: results[key] for key in ("results", "groups", "n-shot") if key in results}
