"""Recipes: presets, configuration validation and the train step's entry point (SPEC 3.4)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.distill import compdemo, recipes

F32_HI = float(np.float32(1 - 1e-7))
F32_LO = float(np.float32(1e-7))


def config(**overrides):
  cfg = recipes.default_config()
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name,alignment,term,compdemo_ratio",
    [
        ("bd3lm", "positions", None, 0.0),
        ("kl", "positions", "forward_kl", 0.0),
        ("reverse_kl", "positions", "reverse_kl", 0.0),
        ("tide_shared", "positions", "tidal", 0.5),
        ("tide_shared", "chunks", "chunk_tidal", 0.5),
        ("calm", "chunks", "calm", 0.0),
        ("tide_cross", "chunks", "reverse_calm", 0.0),
        ("tide_cross", "positions", "reverse_kl", 0.0),
    ],
)
def test_presets(name, alignment, term, compdemo_ratio):
  recipe = recipes.validate_distill_config(
      config(recipe=name, alignment=alignment), student_vocab=100, teacher_vocab=100
  )
  assert recipe.term == term and recipe.compdemo_ratio == compdemo_ratio
  assert recipe.compdemo_granularity == ("token" if alignment == "positions" else "chunk")
  hash(recipe)  # static argument of the jitted step


@pytest.mark.parametrize(
    "overrides,vocabs,message",
    [
        (
            dict(recipe="custom", **{"custom.objective": "reverse_kl", "custom.tidal": True}),
            (100, 100),
            "TIDAL cannot be combined with the reverse objective",
        ),
        (
            dict(
                recipe="custom",
                alignment="chunks",
                **{"custom.objective": "reverse_calm", "custom.tidal": True},
            ),
            (100, 120),
            "TIDAL cannot be combined",
        ),
        (dict(recipe="calm"), (100, 100), "chunk terms need a chunk alignment"),
        (
            dict(recipe="custom", **{"custom.objective": "reverse_calm"}),
            (100, 100),
            "needs distill.alignment='chunks'",
        ),
        (dict(recipe="kl", shared_vocab=101), (100, 120), "larger than the student vocabulary"),
        (dict(recipe="kl", shared_vocab=130), (140, 120), "larger than"),
        (dict(recipe="kl"), (100, 120), "set distill.shared_vocab"),
        (dict(recipe="tide-shared"), (100, 100), "Unknown distill.recipe 'tide-shared'"),
        (dict(alignment="bytes"), (100, 100), "Unknown distill.alignment"),
        (dict(recipe="tide_shared", **{"tidal.growth": "exp"}), (100, 100), "Unknown TIDAL growth"),
        (dict(recipe="tide_shared", **{"compdemo.ratio": 1.5}), (100, 100), "ratio must lie"),
        (
            dict(recipe="tide_shared", **{"compdemo.granularity": "chunk"}),
            (100, 100),
            "does not fit",
        ),
        (dict(recipe="kl", temperature=0.0), (100, 100), "temperature must be positive"),
        (dict(recipe="kl"), (100, None), "needs a teacher"),
    ],
)
def test_validation_refuses_with_one_sentence(overrides, vocabs, message):
  with pytest.raises(ValueError, match=message):
    recipes.validate_distill_config(
        config(**overrides), student_vocab=vocabs[0], teacher_vocab=vocabs[1]
    )


# ----------------------------------------------------------------------------- token level


def token_case(seed, b=2, ls=8, vs=40, vt=48, scale=30.0):
  rng = np.random.default_rng(seed)
  student = rng.uniform(-scale, scale, (b, ls, vs)).astype(np.float32)
  teacher = rng.uniform(-scale, scale, (b, ls, vt)).astype(np.float32)
  mask = rng.random((b, ls)) < 0.5
  t = rng.uniform(0.05, 0.95, b).astype(np.float32)
  return student, teacher, mask, t


def test_kl_recipe_matches_float64_and_logs_metrics():
  student, teacher, mask, t = token_case(0)
  cfg = config(recipe="kl", shared_vocab=32, weight=0.7, chunk_size=5)
  loss, metrics = jax.jit(
      lambda s, te: recipes.distillation_loss(
          cfg, student_logits=s, teacher_logits=te, aux={"distill_mask": mask}, t=t, progress=0.3
      )
  )(student, teacher)
  T = 2.0
  ls = log_softmax64(student[..., :32] / T)
  lt = log_softmax64(teacher[..., :32] / T)
  per = T * T * (np.exp(lt) * (lt - ls)).sum(-1)
  expected = per[mask].mean()
  np.testing.assert_allclose(metrics["distill/forward_kl"], expected, rtol=2e-5)
  np.testing.assert_allclose(loss, 0.7 * expected, rtol=2e-5)
  agree = (student[..., :32].argmax(-1) == teacher[..., :32].argmax(-1))[mask].mean()
  np.testing.assert_allclose(metrics["distill/agreement"], agree, rtol=1e-6)
  assert metrics["distill/count"] == mask.sum() and metrics["distill/lambda_mean"] == 0
  assert metrics["distill/tidal"] == 0 and metrics["distill/reverse_calm"] == 0


def test_tide_shared_tokens_with_compdemo_rows_matches_float64():
  student, _, mask, t = token_case(1, vt=40)
  b, ls, v = student.shape
  rng = np.random.default_rng(1)
  # Teacher of a different length, doubled by CompDemo, paired through positions.
  lt = 10
  pairs = np.array([[1, 2, 3, -1, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 9]], np.int32)
  mask &= pairs >= 0
  teacher2 = rng.uniform(-30, 30, (2 * b, lt, v)).astype(np.float32)
  teacher_masked = np.asarray(compdemo.flags_to_teacher(mask, pairs, lt))
  in_a = np.asarray(
      compdemo.teacher_split(
          jax.random.key(0), 0.5, mask, teacher_masked, granularity="token", pair_teacher_pos=pairs
      )
  )
  rows_t = np.asarray(compdemo.pass_rows(in_a))
  rows_s = np.take_along_axis(rows_t, np.maximum(pairs, 0), axis=1)
  aux = {"distill_mask": mask, "teacher_rows": rows_s}
  cfg = config(recipe="tide_shared")
  recipe = recipes.validate_distill_config(cfg, student_vocab=v, teacher_vocab=v)
  progress = 0.5
  loss, metrics = recipes.distillation_loss(
      recipe, student_logits=student, teacher_logits=teacher2, aux=aux, t=t, progress=progress
  )
  chosen = teacher2.reshape(-1, v)[rows_s]  # [b, ls, v]
  lam = (0.1 + 0.8 * 0.5) * (1 - np.asarray(t, np.float64))[:, None] * np.ones((b, ls))
  w = np.exp(-((np.asarray(t, np.float64) - 0.5) ** 2) / (2 * 0.15**2))[:, None] * np.ones((b, ls))
  T = 2.0
  mix = ((1 - lam[..., None]) * student + lam[..., None] * chosen) / T
  lr, lsm = log_softmax64(mix), log_softmax64(student / T)
  per = T * T * w * (np.exp(lr) * (lr - lsm)).sum(-1)
  np.testing.assert_allclose(loss, per[mask].mean(), rtol=2e-5)
  np.testing.assert_allclose(metrics["distill/lambda_mean"], lam[mask].mean(), rtol=1e-6)
  # The student gets a gradient only at distilled positions.
  grad = jax.grad(
      lambda s: recipes.distillation_loss(
          recipe, student_logits=s, teacher_logits=teacher2, aux=aux, t=t, progress=progress
      )[0]
  )(student)
  assert np.all(np.asarray(grad)[~mask] == 0) and np.abs(np.asarray(grad)[mask]).sum() > 0


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "tide_shared"])
def test_nothing_distilled_gives_zero_without_nan(name):
  student, teacher, mask, t = token_case(2, vt=40)
  aux = {"distill_mask": np.zeros_like(mask)}
  fn = lambda s: recipes.distillation_loss(
      config(recipe=name), student_logits=s, teacher_logits=teacher, aux=aux, t=t, progress=0.9
  )
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(student)
  assert loss == 0 and all(np.isfinite(v) for v in metrics.values())
  assert np.all(np.asarray(grad) == 0)


def test_bd3lm_needs_no_teacher():
  student, _, mask, t = token_case(3)
  loss, metrics = recipes.distillation_loss(
      config(recipe="bd3lm"), student_logits=student, teacher_logits=None, aux={}, t=t, progress=0.0
  )
  assert loss == 0 and metrics["distill/loss"] == 0


def test_missing_aux_key_is_named():
  student, teacher, mask, t = token_case(3, vt=40)
  with pytest.raises(ValueError, match="needs aux\\['distill_mask'\\]"):
    recipes.distillation_loss(
        config(recipe="kl"),
        student_logits=student,
        teacher_logits=teacher,
        aux={},
        t=t,
        progress=0.0,
    )


def test_each_recipe_compiles_once():
  student, teacher, mask, t = token_case(4, vt=40)
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def step(recipe, s, te, m, t, p):
    traces.append(recipe.name)
    return recipes.distillation_loss(
        recipe, student_logits=s, teacher_logits=te, aux={"distill_mask": m}, t=t, progress=p
    )[0]

  built = {
      n: recipes.validate_distill_config(config(recipe=n), student_vocab=40, teacher_vocab=40)
      for n in ("bd3lm", "kl", "reverse_kl", "tide_shared", "tide_cross")
  }
  for progress in (0.1, 0.6):
    for recipe in built.values():
      step(recipe, student, teacher, mask, t, progress)
  assert sorted(traces) == sorted(built)


# ----------------------------------------------------------------------------- chunk level


def chunk_case(seed):
  rng = np.random.default_rng(seed)
  b, ls, lt, vs, vt, c = 2, 10, 12, 30, 36, 6
  s_ids = np.array([[0, 0, 1, 2, 2, 3, 4, 4, 5, -1], [0, 1, 1, 2, 3, 3, 3, 4, -1, -1]], np.int32)
  t_ids = np.array(
      [[0, 1, 1, 1, 2, 3, 3, 4, 5, 5, -1, -1], [0, 0, 1, 2, 2, 3, 4, 4, 4, -1, -1, -1]], np.int32
  )
  masked = np.array([[0, 1, 1, 1, 0, 0, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0, 0, 1, 0, 0]], bool)
  prompt = np.zeros((b, ls), bool)
  prompt[0, 0] = True  # chunk 0 of example 0 is a prompt chunk
  student = rng.uniform(-50, 50, (b, ls, vs)).astype(np.float32) / 10
  teacher = rng.uniform(-50, 50, (b, lt, vt)).astype(np.float32) / 10
  s_targets = rng.integers(0, vs, (b, ls)).astype(np.int32)
  t_targets = rng.integers(0, vt, (b, lt)).astype(np.int32)
  # Make one teacher chunk confidently right so both sides of q = 1/2 occur.
  teacher[1, 0, t_targets[1, 0]] = 40.0
  teacher[1, 1, t_targets[1, 1]] = 40.0
  aux = dict(
      student_targets=s_targets,
      student_chunk_ids=s_ids,
      student_masked=masked,
      student_prompt=prompt,
      teacher_targets=t_targets,
      teacher_chunk_ids=t_ids,
  )
  return student, teacher, aux, c


def np_chunk_probs(logits, targets, ids, c, T):
  logp = np.take_along_axis(log_softmax64(logits), targets[..., None], -1)[..., 0]
  sums = np.zeros((ids.shape[0], c))
  for i in range(ids.shape[0]):
    for j in range(ids.shape[1]):
      if ids[i, j] >= 0:
        sums[i, ids[i, j]] += logp[i, j]
  return np.clip(np.exp(sums / T), F32_LO, F32_HI)


@pytest.mark.parametrize("name", ["tide_cross", "calm", "tide_shared"])
def test_chunk_recipes_match_float64(name):
  student, teacher, aux, c = chunk_case(5)
  T = 5.0
  t = np.array([0.3, 0.8], np.float32)
  cfg = config(recipe=name, alignment="chunks", max_chunks=c, chunk_temperature=T, chunk_size=4)
  recipe = recipes.validate_distill_config(cfg, student_vocab=30, teacher_vocab=36)
  loss, metrics = jax.jit(
      lambda s: recipes.distillation_loss(
          recipe, student_logits=s, teacher_logits=teacher, aux=aux, t=t, progress=0.25
      )
  )(student)
  s = np_chunk_probs(student, aux["student_targets"], aux["student_chunk_ids"], c, T)
  q = np_chunk_probs(teacher, aux["teacher_targets"], aux["teacher_chunk_ids"], c, T)
  active = np.zeros((2, c), bool)
  for i in range(2):
    for k in range(c):
      tokens = aux["student_chunk_ids"][i] == k
      active[i, k] = (
          aux["student_masked"][i][tokens].any()
          and not aux["student_prompt"][i][tokens].any()
          and (aux["teacher_chunk_ids"][i] == k).any()
      )
  if name == "tide_cross":
    per = -(s * np.log(q) + (1 - s) * np.log(1 - q))
  elif name == "calm":
    per = -(q * np.log(s) + (1 - q) * np.log(1 - s))
  else:
    g = (1 - math.cos(math.pi * 0.25)) / 2
    lam = ((0.1 + 0.8 * g) * (1 - t.astype(np.float64)))[:, None]
    w = np.exp(-((t.astype(np.float64) - 0.5) ** 2) / (2 * 0.15**2))[:, None]
    m = np.clip((1 - lam) * s + lam * q, F32_LO, F32_HI)
    per = -(m * np.log(s) + (1 - m) * np.log(1 - s)) * w
    np.testing.assert_allclose(
        metrics["distill/lambda_mean"], np.broadcast_to(lam, (2, c))[active].mean(), rtol=1e-6
    )
  np.testing.assert_allclose(loss, per[active].mean(), rtol=1e-4)
  assert metrics["distill/count"] == active.sum() and 0 <= metrics["distill/agreement"] <= 1
  assert np.isfinite(
      jax.grad(
          lambda x: recipes.distillation_loss(
              recipe, student_logits=x, teacher_logits=teacher, aux=aux, t=t, progress=0.25
          )[0]
      )(student)
  ).all()


def test_chunk_recipe_with_no_active_chunk_is_zero():
  student, teacher, aux, c = chunk_case(6)
  aux = dict(aux, student_masked=np.zeros_like(aux["student_masked"]))
  cfg = config(recipe="tide_cross", alignment="chunks", max_chunks=c)
  fn = lambda x: recipes.distillation_loss(
      cfg, student_logits=x, teacher_logits=teacher, aux=aux, t=np.array([0.5, 0.5]), progress=0.5
  )[0]
  assert fn(student) == 0
  assert np.all(np.asarray(jax.grad(fn)(student)) == 0)


def test_tide_cross_student_gradient_matches_the_float64_chain_rule():
  student, teacher, aux, c = chunk_case(7)
  T = 5.0
  t = np.array([0.4, 0.6], np.float32)
  recipe = recipes.validate_distill_config(
      config(
          recipe="tide_cross", alignment="chunks", max_chunks=c, chunk_temperature=T, chunk_size=3
      ),
      student_vocab=30,
      teacher_vocab=36,
  )
  grad = jax.grad(
      lambda x: recipes.distillation_loss(
          recipe, student_logits=x, teacher_logits=teacher, aux=aux, t=t, progress=0.5
      )[0]
  )(student)
  s = np_chunk_probs(student, aux["student_targets"], aux["student_chunk_ids"], c, T)
  q = np_chunk_probs(teacher, aux["teacher_targets"], aux["teacher_chunk_ids"], c, T)
  ids = aux["student_chunk_ids"]
  active = np.zeros((2, c), bool)
  for i in range(2):
    for k in range(c):
      tokens = ids[i] == k
      active[i, k] = (
          aux["student_masked"][i][tokens].any() and not aux["student_prompt"][i][tokens].any()
      )
  assert ((s > F32_LO) & (s < F32_HI))[active].all()  # no clamp: the chain rule applies
  # d loss / d z = (1/n) log((1-q)/q) * (s / T) * (onehot(x) - softmax(z)) per chunk token.
  probs = np.exp(log_softmax64(student))
  expected = np.zeros_like(probs)
  for i in range(2):
    for j in range(ids.shape[1]):
      k = ids[i, j]
      if k >= 0 and active[i, k]:
        coeff = np.log((1 - q[i, k]) / q[i, k]) * s[i, k] / T / active.sum()
        expected[i, j] = coeff * (np.eye(30)[aux["student_targets"][i, j]] - probs[i, j])
  np.testing.assert_allclose(grad, expected, atol=1e-6, rtol=1e-4)
