"""The entrypoint's non-training modes: eval, sample, chat and export.

Each loads the trained student from the workdir's latest checkpoint (or, without one,
``config.model.init_from``), so ``--mode=eval --workdir=DIR`` evaluates exactly what
``--mode=train --workdir=DIR`` produced.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
from etils import epath
from flax import nnx

from tide_jax import configs_lib
from tide_jax.convert import hf_checkpoint
from tide_jax.data import vocab
from tide_jax.diffusion import sampler
from tide_jax.eval import bpb, export, harness, humaneval, sample_cli
from tide_jax.models import dense
from tide_jax.train import checkpoint, loop, optimizer, step as step_lib


def resolved(config, workdir: str):
  """``config`` as the training run resolved it: with ``data.restrict_vocab``, the restricted
  tokenizers, vocabulary size and mask ids (``data.vocab``; idempotent)."""
  return vocab.restricted_config(config, loop.absolute_workdir(workdir))


def load_trained_student(config, workdir: str):
  """The student at the latest checkpoint of ``workdir`` (or its initial weights).

  Returns ``(model, step)``; step is None when no checkpoint exists.
  """
  workdir = loop.absolute_workdir(workdir)
  config = resolved(config, workdir)
  configs_lib.validate(config)
  model_cfg = configs_lib.student_model_config(config)
  latest = checkpoint.find_latest_step(workdir)
  restored = None
  if latest is not None:
    abstract = dense.abstract_decoder(model_cfg)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    tx, _ = optimizer.make_optimizer(config.optim, int(config.train.num_steps))
    abstract_state = jax.eval_shape(
        lambda p: step_lib.create_train_state(p, tx, int(config.seed)), abstract_params
    )
    ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
    try:  # a damaged newest step is reported and passed over, and left where it is
      restored = ckpt.restore_newest_intact(
          abstract_state,
          checkpoint.model_meta(model_cfg),
          lambda line: print(line, flush=True),
          set_aside=False,
      )
    finally:
      ckpt.close()
  if restored is not None:
    step, state, _ = restored
    return nnx.merge(graphdef, state.params), step
  if not config.model.init_from:
    raise FileNotFoundError(
        f"{workdir} holds no {'intact ' if latest is not None else ''}checkpoint and "
        "model.init_from is empty; train first (--mode=train) or set model.init_from."
    )
  # The initial student, before any training (the paper's baseline row).
  model = hf_checkpoint.load_dense_from_hf(
      config.model.init_from, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype
  )
  return model, None


def sampler_config(config, tokenizer) -> sampler.SamplerConfig:
  s = config.sampler
  return sampler.SamplerConfig(
      block_size=int(config.block_size),
      steps_per_block=int(s.steps_per_block),
      max_new_tokens=int(s.max_new_tokens),
      mask_token_id=int(config.objective.mask_token_id),
      eos_token_id=int(tokenizer.eos_token_id),
      temperature=float(s.temperature),
      order=s.order,
      schedule=config.objective.schedule,
      context_len=int(s.context_len),
      threshold=float(s.threshold),
  )


def run_eval(config, workdir: str) -> dict[str, Any]:
  """Bits per byte of held-out text (and HumanEval when ``eval.humaneval``)."""
  config = resolved(config, workdir)
  model, step = load_trained_student(config, workdir)
  tokenizer = bpb.student_tokenizer(config)
  ev = config.eval
  texts = bpb.held_out_texts(config, int(ev.bpb_max_texts))
  result = bpb.bits_per_byte(
      model,
      tokenizer,
      texts,
      block_size=int(config.block_size),
      max_len=int(config.data.max_len),
      mask_token_id=int(config.objective.mask_token_id),
      grid=int(ev.bpb_grid),
      schedule=config.objective.schedule,
      kind=config.objective.kind,
  )
  out = {
      "step": step,
      "bits_per_byte": result.bits_per_byte,
      "bits_per_token": result.bits_per_token,
      "num_texts": len(texts),
      "num_bytes": result.num_bytes,
      "num_tokens": result.num_tokens,
  }
  at = "initial weights (model.init_from)" if step is None else f"step {step}"
  print(
      f"{at}: {result.bits_per_byte:.4f} bits/byte, {result.bits_per_token:.4f} "
      f"bits/token over {len(texts)} texts ({result.num_bytes:,} bytes)",
      flush=True,
  )
  if ev.humaneval:
    report = os.path.join(workdir, "humaneval.json")
    he = humaneval.evaluate_humaneval(
        model,
        tokenizer,
        sampler_config(config, tokenizer),
        out_json=report,
        num_samples=int(ev.humaneval_samples),
        task_ids=list(ev.humaneval_tasks or []) or None,
    )
    out["humaneval"] = he["summary"]
    print(f"HumanEval per-problem report: {report}", flush=True)
  if config.eval.tasks:
    cfg = sampler_config(config, tokenizer)
    out["lm_eval"] = harness.run_config_tasks(config, workdir, model, tokenizer, cfg, step)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  epath.Path(workdir, "eval.json").write_text(json.dumps(out, indent=2))
  return out


def run_sample(config, workdir: str, prompts: Sequence[str], chat: bool) -> Any:
  config = resolved(config, workdir)
  model, _ = load_trained_student(config, workdir)
  tokenizer = bpb.student_tokenizer(config)
  cfg = sampler_config(config, tokenizer)
  if chat:
    return sample_cli.interactive_chat(model, tokenizer, cfg)
  if not prompts:
    raise ValueError("No prompts given; pass --prompt=TEXT (repeatable) or --chat.")
  return sample_cli.run_sample(model, tokenizer, list(prompts), cfg)


def run_export(config, workdir: str, out_dir: str | None, overwrite: bool = False) -> str:
  """Exports the student as an HF directory; a non-empty ``out_dir`` needs ``overwrite``."""
  config = resolved(config, workdir)
  model, step = load_trained_student(config, workdir)
  tokenizer = bpb.student_tokenizer(config)
  out_dir = out_dir or os.path.join(workdir, "hf_export")
  path = export.export_student(
      model,
      tokenizer,
      out_dir,
      block_size=int(config.block_size),
      mask_token_id=int(config.objective.mask_token_id),
      schedule=config.objective.schedule,
      overwrite=overwrite,
  )
  at = "initial weights" if step is None else f"step {step}"
  print(f"exported the student ({at}) to {path}", flush=True)
  return path
