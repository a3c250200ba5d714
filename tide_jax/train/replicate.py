"""The miniature replication of the paper's comparison (``config.runner = "replicate"``).

One command runs the whole study resumably into a workdir, then writes the report
(``replicate_report.py``: the table, the figures and the generated part of
``docs/replication.md``) from the runs it finds there::

  <workdir>/teachers/{B,A}/            bidirectional MDLM teachers (Qwen3 / Llama-3 tokenizer),
                                        trained here, written as HF directories and converted
  <workdir>/<split>/<condition>/seed<k>/   the student under each recipe, one run per seed
  <workdir>/report/                      results.json, replication.md, the figures

Conditions (identical student, batches and steps within a seed; 3 seeds):
  bd3lm (no teacher: one run per seed, the baseline of both pipelines),
  B (shared tokenizer, position alignment): kl, reverse_kl, tide_shared,
  A (cross tokenizer, chunk alignment): calm, tide_shared, tide_cross,
  TIDAL's axes on one pipeline: tide_shared with timestep_only and training_only (``both``
  is the pipeline's tide_shared itself).

Stages run in ``replicate.workers`` spawned processes side by side (teachers first); each
stage is ``loop.train_and_evaluate`` in its own workdir, so an interrupted study resumes
where it stopped, and a finished stage is not run again. Every stage records its process
CPU seconds and wall time (``cost.json``), from which the report estimates the study's
wall time on an idle machine.

``replicate.split = "validation"`` runs the students on the validation split instead (for
choosing hyper-parameters; with several ``replicate.learning_rates``, one student per
learning rate); ``replicate.quick = True`` runs the whole study in miniature (tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import threading
import time
from typing import Any

import jax
from etils import epath
from flax import nnx
from ml_collections import config_dict

from tide_jax import teachers
from tide_jax.convert import hf_checkpoint, streaming
from tide_jax.data import builder, options, vocab
from tide_jax.train import checkpoint, loop, mdlm_teacher, replicate_report

SPLITS = ("test", "validation")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of the study.

  Attributes:
    name: its path below the study's workdir (``teachers/B``, ``test/kl_B/seed0``, ...).
    kind: ``teacher`` or ``student``.
    condition: the student condition's label (``bd3lm``, ``kl_B``, ...); the pipeline of a
      teacher.
    pipeline: ``A`` or ``B`` (the bd3lm baseline runs with B's data; it reads no teacher).
    recipe: the distillation recipe (``mdlm`` for a teacher).
    seed: the run's seed (initialisation, batch order, noise).
    config: the resolved run config.
    export_hf: also write the trained model as an HF directory (teachers; the student
      whose reliability curve the report draws).
  """

  name: str
  kind: str
  condition: str
  pipeline: str
  recipe: str
  seed: int
  config: Any
  export_hf: bool = False


def _copy(config) -> config_dict.ConfigDict:
  out = config_dict.ConfigDict(config.copy_and_resolve_references())
  out.unlock()
  return out


def apply_quick(config) -> config_dict.ConfigDict:
  """The study in miniature: every stage and report cell, from a few steps of tiny models."""
  c = _copy(config)
  r = c.replicate
  c.data.train_files = ["pystdlib://json/*.py"]
  r.validation_files = ["pystdlib://this.py"]
  r.test_files = ["pystdlib://colorsys.py"]
  c.data.vocab_files = r.validation_files + r.test_files
  c.data.max_len = c.data.teacher_max_len = 64
  c.distill.max_chunks = 64
  for shape in (c.model, r.teacher):
    shape.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    shape.intermediate_size = 64
  c.train.update(batch_size=2, num_steps=4, eval_every=2, log_every=2, eval_batches=1)
  c.train.checkpoint_every = 4
  c.optim.warmup_steps = 1
  r.teacher.update(num_steps=4, batch_size=2)
  c.eval.update(bpb_grid=2, bpb_max_texts=1)
  r.seeds = list(r.seeds)[:2]
  r.reliability_ratios = 3
  r.reliability_max_texts = 1
  return c


def _split_files(config) -> list[str]:
  r = config.replicate
  if r.split not in SPLITS:
    raise ValueError(f"replicate.split={r.split!r}; use 'test' or 'validation'.")
  return list(r.test_files if r.split == "test" else r.validation_files)


def pipeline_config(config, pipeline: str, root: str, files) -> config_dict.ConfigDict:
  """The students' config of a pipeline, with its held-out files and the restricted vocabulary."""
  p = config.replicate.pipelines[pipeline]
  c = _copy(config)
  del c["replicate"], c["runner"]
  c.data.teacher_tokenizer = p.teacher_tokenizer
  c.data.alignment = c.distill.alignment = p.alignment
  c.teacher.tokenizer = p.teacher_tokenizer
  c.teacher.mask_token_id = int(p.teacher_mask_token_id)
  c.data.eval_files = list(files)
  c.eval.bpb_files = list(files)
  if not c.data.cache_dir:
    c.data.cache_dir = os.path.join(root, "data")  # shared by every stage
  return vocab.restricted_config(c, root)


def teacher_stage(config, pipe_cfg, pipeline: str) -> Stage:
  """A bidirectional MDLM teacher on the same corpus with its own (restricted) tokenizer.

  Its periodic evaluation reads the validation split (what its training length was chosen
  on); the report measures it on the test split.
  """
  r = config.replicate
  # replicate.teacher holds the teacher's model fields next to its training settings.
  shape = {key: value for key, value in r.teacher.items() if key in checkpoint.SHAPE_FIELDS}
  t = mdlm_teacher.mdlm_teacher_config(
      pipe_cfg,
      shape,
      num_steps=r.teacher.num_steps,
      learning_rate=r.teacher.learning_rate,
      batch_size=r.teacher.batch_size,
  )
  t.data.eval_files = list(r.validation_files)
  t.eval.bpb_files = list(r.validation_files)
  t.train.eval_every = max(1, int(r.teacher.num_steps) // 5)
  t.train.checkpoint_every = max(1, int(r.teacher.num_steps) // 3)
  return Stage(f"teachers/{pipeline}", "teacher", pipeline, pipeline, "mdlm", int(t.seed), t, True)


def condition_name(recipe: str, pipeline: str, axis: str = "both") -> str:
  """``bd3lm``, ``kl_B``, ``tide_shared_A``, ``tide_shared_B_timestep_only``, ..."""
  if recipe == "bd3lm":
    return "bd3lm"
  return f"{recipe}_{pipeline}" + ("" if axis == "both" else f"_{axis}")


def student_conditions(config) -> list[tuple[str, str, str]]:
  """``(recipe, pipeline, TIDAL axis)`` of every student condition, bd3lm first, once."""
  r = config.replicate
  out = [("bd3lm", "B", "both")]
  for pipeline in ("B", "A"):
    out += [(recipe, pipeline, "both") for recipe in r.pipelines[pipeline].recipes]
  out += [("tide_shared", r.ablation_pipeline, axis) for axis in r.ablation_axes]
  seen, unique = set(), []
  for recipe, pipeline, axis in out:
    name = condition_name(recipe, pipeline, axis)
    if name not in seen:
      seen.add(name)
      unique.append((recipe, pipeline, axis))
  return unique


def student_stages(config, pipe_cfgs: dict, root: str) -> list[Stage]:
  r = config.replicate
  rates = [float(lr) for lr in r.learning_rates] or [None]
  stages = []
  for lr in rates:
    prefix = r.split if lr is None else f"{r.split}/lr_{lr:g}"
    for recipe, pipeline, axis in student_conditions(config):
      for seed in r.seeds:
        s = _copy(pipe_cfgs[pipeline])
        s.seed = int(seed)
        s.distill.recipe = recipe
        s.distill.tidal.axis = axis
        teacher_dir = os.path.join(root, "teachers", pipeline)
        s.teacher.hf_dir = os.path.join(teacher_dir, "hf")
        s.teacher.checkpoint = os.path.join(teacher_dir, "converted")
        s.teacher.convert_if_missing = False  # the teacher stage converts it, once
        if lr is not None:
          s.optim.learning_rate = lr
        name = condition_name(recipe, pipeline, axis)
        export = recipe == "bd3lm" and seed == r.seeds[0] and lr is None
        stages.append(
            Stage(
                f"{prefix}/{name}/seed{seed}",
                "student",
                name,
                pipeline,
                recipe,
                int(seed),
                s,
                export,
            )
        )
  return stages


def plan(config, root: str) -> tuple[list[Stage], list[Stage], dict]:
  """The teacher stages, the student stages and the resolved pipeline configs."""
  files = _split_files(config)
  pipe_cfgs = {p: pipeline_config(config, p, root, files) for p in ("B", "A")}
  teacher_stages = [teacher_stage(config, pipe_cfgs[p], p) for p in ("B", "A")]
  return teacher_stages, student_stages(config, pipe_cfgs, root), pipe_cfgs


# ----------------------------------------------------------------------------- execution


def _finished(workdir: str, stage_kind: str, num_steps: int) -> bool:
  root = epath.Path(workdir)
  if not (root / "summary.json").exists() or not (root / "cost.json").exists():
    return False
  if json.loads((root / "summary.json").read_text())["step"] != num_steps:
    return False
  return stage_kind != "teacher" or (root / "converted" / streaming.MANIFEST).exists()


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run_stage(name: str, kind: str, config_json: str, workdir: str, export_hf: bool) -> dict:
  """Trains one stage (in a worker process): log in ``<workdir>/log.txt``, cost in cost.json."""
  config = config_dict.ConfigDict(json.loads(config_json))
  os.makedirs(workdir, exist_ok=True)
  cpu0, wall0 = _cpu_seconds(), time.time()
  with open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8") as log:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
      result = loop.train_and_evaluate(config, workdir)
      if export_hf:
        hf_dir = os.path.join(workdir, "hf")
        hf_checkpoint.save_dense_as_hf(
            nnx.merge(result["graphdef"], result["state"].params), hf_dir
        )
        if kind == "teacher":
          teachers.convert_teacher(
              hf_dir, os.path.join(workdir, "converted"), param_dtype="float32", overwrite=True
          )
  cost = {"cpu_s": _cpu_seconds() - cpu0, "wall_s": time.time() - wall0, "steps": result["step"]}
  (epath.Path(workdir) / "cost.json").write_text(json.dumps(cost, indent=2))
  return {"name": name, **cost}


def exit_with_parent(parent: int, poll_s: float = 2.0) -> None:
  """Ends this process once ``parent`` is gone (a worker's watch, on its own thread).

  A runner stopped by a signal that reaches only its own process (a scheduler's SIGTERM,
  ``kill PID``) would otherwise leave its workers training, and writing checkpoints into
  the study's workdir, with nobody to collect their results.
  """
  while os.getppid() == parent:
    time.sleep(poll_s)
  os._exit(1)


def _init_worker(cache_dir: str) -> None:
  threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
  # Compiled steps are shared through the persistent cache: the seeds of a condition (and
  # a resumed stage) compile the same program.
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def prepare_data(stages: list[Stage]) -> None:
  """Prepares every dataset the stages read, here, once: workers then only read them (two
  workers preparing the same dataset at once would race)."""
  seen = set()
  for stage in stages:
    opts = options.parse_options(stage.config.data)
    if opts.fingerprint() not in seen:
      seen.add(opts.fingerprint())
      builder.prepare(opts)


def execute(stages: list[Stage], root: str, workers: int) -> list[dict]:
  """Runs the unfinished stages, ``workers`` at a time, longest (distilling) first; returns
  the costs of the stages it ran."""
  todo = [
      s
      for s in stages
      if not _finished(os.path.join(root, s.name), s.kind, int(s.config.train.num_steps))
  ]
  done = len(stages) - len(todo)
  if done:
    print(f"   {done} of {len(stages)} stages already finished", flush=True)
  ran = []
  if not todo:
    return ran
  todo.sort(key=lambda s: s.recipe == "bd3lm")
  context = multiprocessing.get_context("spawn")
  cache = os.path.join(root, "jax_cache")
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=max(1, int(workers)),
      mp_context=context,
      initializer=_init_worker,
      initargs=(cache,),
  ) as pool:
    futures = {
        pool.submit(
            run_stage,
            s.name,
            s.kind,
            s.config.to_json(),
            os.path.join(root, s.name),
            s.export_hf,
        ): s
        for s in todo
    }
    for future in concurrent.futures.as_completed(futures):
      stage = futures[future]
      try:
        cost = future.result()
      except Exception as err:
        pool.shutdown(cancel_futures=True)
        raise RuntimeError(
            f"stage {stage.name} failed ({err}); see {os.path.join(root, stage.name, 'log.txt')}, "
            "fix the cause and rerun the same command to resume"
        ) from err
      done += 1
      ran.append(cost)
      print(
          f"   [{done}/{len(stages)}] {stage.name}: {cost['steps']} steps, "
          f"{cost['cpu_s']:.0f} s CPU, {cost['wall_s']:.0f} s wall",
          flush=True,
      )
  return ran


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the study and writes its report; returns the report's results."""
  root = loop.absolute_workdir(workdir)
  if config.replicate.quick:
    config = apply_quick(config)
  wall0 = time.time()
  teacher_stages, students, pipe_cfgs = plan(config, root)
  r = config.replicate
  print(
      f"== replication study ({r.split} split{', quick' if r.quick else ''}) in {root}: "
      f"{len(teacher_stages)} teachers, {len(students)} student runs, {r.workers} workers",
      flush=True,
  )
  prepare_data(teacher_stages + students)
  print("== teachers (bidirectional masked diffusion)", flush=True)
  ran = execute(teacher_stages, root, r.workers)
  print("== students", flush=True)
  ran += execute(students, root, r.workers)
  print("== report", flush=True)
  session = {"wall0": wall0, "stage_cpu_s": sum(cost["cpu_s"] for cost in ran), "stages": len(ran)}
  return replicate_report.write_report(config, root, teacher_stages, students, pipe_cfgs, session)
