"""lm-evaluation-harness model ``tide_jax``: a trained student from a workdir or an HF export.

Importing this module registers the model name ``tide_jax`` with the harness; the harness's
own model names stay available. From the command line, this module runs the harness's
CLI with the name registered:

  python -m tide_jax.lm_eval run --model tide_jax \\
      --model_args workdir=runs/smoke/student_tide_shared,steps_per_block=32 \\
      --tasks gsm8k --batch_size 8 --output_path results/

From Python:

  import lm_eval
  import tide_jax.lm_eval  # registers "tide_jax"
  results = lm_eval.simple_evaluate(model="tide_jax", model_args="pretrained=out/student_hf",
                                    tasks=["hellaswag"])

Model arguments (``--model_args key=value,...``):
  workdir=DIR         a training workdir (local or gs://): its latest checkpoint and its
                      config.json (tokenizer, block size, mask token, schedule, sampler.*)
  pretrained=DIR      or an HF directory written by ``--mode=export`` (bd3lm.json)
  steps_per_block, max_new_tokens, temperature, order, context_len
                      sampler settings (default: the config's ``sampler.*``, or for an
                      export one token per step, 256 tokens, greedy, low_confidence)
  max_length          longest context + continuation a likelihood scores (default 2048)
  rolling_window      tokens per window of loglikelihood_rolling (default: the run's
                      data.max_len; for an export 512)
  bound_grid, bound_seed
                      the likelihood bound's time grid and mask seed
  greedy_check        compute is_greedy for loglikelihood (default true)
  seed                sampler seed (temperature > 0)
The harness's ``--batch_size`` sets prompts per sampler call; ``--device`` is ignored (JAX
places the model on its default backend). See :mod:`tide_jax.eval.harness` for what
``generate_until`` and ``loglikelihood`` compute.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import lm_eval.models  # noqa: F401  (the harness's own model names, registered lazily)
from etils import epath
from lm_eval.__main__ import cli_evaluate
from lm_eval.api import registry
from lm_eval.utils import simple_parse_args_string
from ml_collections import config_dict

from tide_jax import modes
from tide_jax.eval import bpb, harness, sample_cli

MODEL_NAME = "tide_jax"
SAMPLER_ARGS = ("steps_per_block", "max_new_tokens", "temperature", "order", "context_len")
MODEL_ARGS = (
    "workdir",
    "pretrained",
    *SAMPLER_ARGS,
    "max_length",
    "rolling_window",
    "bound_grid",
    "bound_seed",
    "greedy_check",
    "seed",
    "batch_size",
    "max_batch_size",
    "device",
)


def read_workdir_config(workdir: str) -> config_dict.ConfigDict:
  """The resolved config a training run wrote to ``<workdir>/config.json``."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{workdir} has no config.json; pass the workdir of a training run, or an "
        "exported HF directory as pretrained=DIR."
    )
  return config_dict.ConfigDict(json.loads(path.read_text()))


def _sampler_overrides(values: dict) -> dict:
  """The given (not None) sampler arguments, cast to SamplerConfig's field types."""
  casts = {
      "steps_per_block": int,
      "max_new_tokens": int,
      "temperature": float,
      "order": str,
      "context_len": int,
  }
  return {name: casts[name](value) for name, value in values.items() if value is not None}


class TideJaxLM(harness.BlockDiffusionLM):
  """The ``tide_jax`` harness model; see the module docstring for its arguments."""

  def __init__(
      self,
      workdir: str | None = None,
      pretrained: str | None = None,
      steps_per_block: int | None = None,
      max_new_tokens: int | None = None,
      temperature: float | None = None,
      order: str | None = None,
      context_len: int | None = None,
      max_length: int | None = None,
      rolling_window: int | None = None,
      bound_grid: int | None = None,
      bound_seed: int = 0,
      greedy_check: bool = True,
      seed: int = 0,
      batch_size: int | str = 8,
      max_batch_size: int | None = None,
      device: str | None = None,
  ):
    if (workdir is None) == (pretrained is None):
      raise ValueError(
          "Give the tide_jax model exactly one of workdir=DIR (a training run) or "
          "pretrained=DIR (an export of --mode=export)."
      )
    try:
      batch_size = int(batch_size)
    except ValueError:
      raise ValueError(
          f"batch_size must be an integer for tide_jax, got {batch_size!r}; pass "
          "--batch_size 8 (prompts per sampler call)."
      ) from None
    overrides = _sampler_overrides(
        {
            "steps_per_block": steps_per_block,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "order": order,
            "context_len": context_len,
        }
    )
    if workdir is not None:
      config = read_workdir_config(workdir)
      model, step = modes.load_trained_student(config, workdir)
      tokenizer = bpb.student_tokenizer(config)
      cfg = dataclasses.replace(modes.sampler_config(config, tokenizer), **overrides)
      grid = int(config.eval.bpb_grid)
      window = int(config.data.max_len)
      info = {"workdir": str(workdir), "step": step}
    else:
      model, tokenizer, cfg = sample_cli.load_student(pretrained, **overrides)
      grid = harness.BoundSettings().grid
      window = harness.DEFAULT_ROLLING_WINDOW
      info = {"pretrained": str(pretrained)}
    bound = harness.BoundSettings(
        grid=int(bound_grid) if bound_grid is not None else grid,
        seed=int(bound_seed),
        schedule=cfg.schedule,
    )
    super().__init__(
        model,
        tokenizer,
        cfg,
        max_length=int(max_length) if max_length is not None else None,
        rolling_window=int(rolling_window) if rolling_window is not None else window,
        batch_size=batch_size,
        bound=bound,
        greedy_check=bool(greedy_check),
        seed=int(seed),
        info=info,
    )

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    args = dict(arg_dict)
    args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
      raise ValueError(
          f"Unknown tide_jax model argument(s) {', '.join(unknown)}; use "
          f"{', '.join(MODEL_ARGS[:-3])}."
      )
    return cls(**args)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)


# Registered by import path rather than by class, so that running this file as a script
# (``python -m``, where it is ``__main__``) and importing it register the same target.
registry.model_registry.register(MODEL_NAME, target="tide_jax.lm_eval:TideJaxLM")


def main() -> None:
  """The harness's command line with ``tide_jax`` registered; bad model arguments end in
  one sentence (exit code 2) instead of a traceback."""
  try:
    cli_evaluate()
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
