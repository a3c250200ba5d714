"""Recipes: which distillation term the one train step adds, chosen by configuration.

A recipe is an objective plus two options (SPEC 3.4):

| preset        | alignment ``positions`` (pipeline B) | alignment ``chunks`` (pipeline A)  |
|---------------|--------------------------------------|------------------------------------|
| ``bd3lm``     | none                                 | none                               |
| ``kl``        | forward_kl                           | (refused)                          |
| ``reverse_kl``| reverse_kl                           | (refused)                          |
| ``tide_shared``| forward_kl + TIDAL + CompDemo token | calm + TIDAL (chunk form) + CompDemo chunk |
| ``calm``      | (refused)                            | calm                               |
| ``tide_cross``| reverse_kl                           | reverse_calm                       |

``recipe = 'custom'`` takes ``custom.objective``, ``custom.tidal`` and ``custom.compdemo``.
Validation (:func:`validate_distill_config`) refuses unsupported combinations with one
sentence; :func:`distillation_loss` is the single entry point of the train step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from tide_jax.distill import chunks as chunks_lib
from tide_jax.distill import terms as terms_lib

Array = jax.Array

TOKEN_OBJECTIVES = ("forward_kl", "reverse_kl")
CHUNK_OBJECTIVES = ("calm", "reverse_calm", "reverse_binary_kl")
REVERSE_OBJECTIVES = ("reverse_kl", "reverse_calm", "reverse_binary_kl")
ALIGNMENTS = ("positions", "chunks")
# preset -> alignment -> (objective, tidal, compdemo)
PRESETS = {
    "bd3lm": {"positions": (None, False, False), "chunks": (None, False, False)},
    "kl": {"positions": ("forward_kl", False, False)},
    "reverse_kl": {"positions": ("reverse_kl", False, False)},
    "tide_shared": {"positions": ("forward_kl", True, True), "chunks": ("calm", True, True)},
    "calm": {"chunks": ("calm", False, False)},
    "tide_cross": {
        "positions": ("reverse_kl", False, False),
        "chunks": ("reverse_calm", False, False),
    },
}
METRIC_NAMES = (
    "forward_kl",
    "reverse_kl",
    "tidal",
    "calm",
    "reverse_calm",
    "reverse_binary_kl",
    "chunk_tidal",
)


def default_config() -> ml_collections.ConfigDict:
  """The ``config.distill`` section with its defaults (SPEC 3-4)."""
  c = ml_collections.ConfigDict()
  c.recipe = "bd3lm"  # a preset name, or "custom"
  c.alignment = "positions"  # "positions" (shared tokenizer) or "chunks" (cross tokenizer)
  c.weight = 1.0  # multiplies the distillation term
  c.temperature = 2.0  # token-level T (with the T^2 factor)
  c.chunk_temperature = 5.0  # chunk-level T: s = exp(log P / T)
  c.shared_vocab = ml_collections.config_dict.placeholder(int)  # e.g. 151646
  c.max_chunks = 512  # static chunk slots per example
  c.chunk_size = 128  # positions per block in the memory-bounded terms
  c.tidal = ml_collections.ConfigDict(
      dict(l0=0.1, l1=0.9, growth="cosine", axis="both", timestep_weight="midrange")
  )
  c.compdemo = ml_collections.ConfigDict(dict(ratio=0.5, granularity="auto"))
  c.custom = ml_collections.ConfigDict(dict(objective="forward_kl", tidal=False, compdemo=False))
  return c


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A validated recipe (hashable; every field static for jit)."""

  name: str
  alignment: str
  objective: str | None
  tidal: bool
  compdemo_ratio: float  # 0 = one ordinary teacher pass
  compdemo_granularity: str  # "token" or "chunk"
  weight: float
  temperature: float
  chunk_temperature: float
  shared_vocab: int | None
  max_chunks: int
  chunk_size: int
  tidal_options: terms_lib.TidalOptions

  @property
  def term(self) -> str | None:
    """The name of the term evaluated (and logged)."""
    if self.objective is None:
      return None
    if self.tidal:
      return "tidal" if self.objective == "forward_kl" else "chunk_tidal"
    return self.objective

  @property
  def uses_teacher(self) -> bool:
    return self.objective is not None

  @property
  def uses_compdemo(self) -> bool:
    return self.uses_teacher and self.compdemo_ratio > 0


def _fail(message: str):
  raise ValueError(message)


def _choose(name: str, value, allowed) -> None:
  if value not in allowed:
    _fail(f"Unknown distill.{name} {value!r}; use one of {', '.join(map(str, allowed))}.")


def validate_distill_config(
    cfg: ml_collections.ConfigDict, *, student_vocab: int, teacher_vocab: int | None
) -> Recipe:
  """Checks ``config.distill`` and returns its :class:`Recipe` (one clear error otherwise).

  ``teacher_vocab`` may be None for ``bd3lm`` (no teacher).
  """
  _choose("recipe", cfg.recipe, (*PRESETS, "custom"))
  _choose("alignment", cfg.alignment, ALIGNMENTS)
  if cfg.recipe == "custom":
    _choose("custom.objective", cfg.custom.objective, (*TOKEN_OBJECTIVES, *CHUNK_OBJECTIVES))
    objective, tidal, compdemo = (
        cfg.custom.objective,
        bool(cfg.custom.tidal),
        bool(cfg.custom.compdemo),
    )
  else:
    if cfg.alignment not in PRESETS[cfg.recipe]:
      needed = next(iter(PRESETS[cfg.recipe]))
      _fail(
          f"Recipe {cfg.recipe!r} needs distill.alignment={needed!r} "
          f"({'chunk terms need a chunk alignment' if needed == 'chunks' else 'token terms need position pairs'})."
      )
    objective, tidal, compdemo = PRESETS[cfg.recipe][cfg.alignment]
  if objective in CHUNK_OBJECTIVES and cfg.alignment != "chunks":
    _fail(
        f"The chunk objective {objective!r} needs distill.alignment='chunks' "
        "(a chunk alignment); set it or choose a token objective."
    )
  if objective in TOKEN_OBJECTIVES and cfg.alignment != "positions":
    _fail(
        f"The token objective {objective!r} needs distill.alignment='positions' (a shared "
        "tokenizer); with a chunk alignment use calm, reverse_calm or reverse_binary_kl."
    )
  if tidal and objective in REVERSE_OBJECTIVES:
    _fail(
        f"TIDAL cannot be combined with the reverse objective {objective!r}: its (1 - lambda) "
        "factor suppresses the reverse objective's self-selection; use a forward objective "
        "or turn TIDAL off."
    )
  tidal_options = terms_lib.TidalOptions(
      **{k: cfg.tidal[k] for k in ("l0", "l1", "growth", "axis", "timestep_weight")}
  )
  if not 0.0 <= tidal_options.l0 <= 1.0 or not 0.0 <= tidal_options.l1 <= 1.0:
    _fail("distill.tidal.l0 and distill.tidal.l1 must lie in [0, 1].")
  granularity = cfg.compdemo.granularity
  _choose("compdemo.granularity", granularity, ("auto", "token", "chunk"))
  if granularity == "auto":
    granularity = "token" if cfg.alignment == "positions" else "chunk"
  if (granularity == "chunk") != (cfg.alignment == "chunks"):
    _fail(
        f"CompDemo granularity {granularity!r} does not fit distill.alignment="
        f"{cfg.alignment!r}; use 'token' with positions and 'chunk' with chunks (or 'auto')."
    )
  if not 0.0 <= cfg.compdemo.ratio <= 1.0:
    _fail(f"distill.compdemo.ratio must lie in [0, 1], got {cfg.compdemo.ratio}.")
  for field in ("temperature", "chunk_temperature"):
    if not cfg[field] > 0:
      _fail(f"distill.{field} must be positive, got {cfg[field]}.")
  for field in ("max_chunks", "chunk_size"):
    if not int(cfg[field]) > 0:
      _fail(f"distill.{field} must be a positive integer, got {cfg[field]}.")
  if cfg.weight < 0:
    _fail(f"distill.weight must be non-negative, got {cfg.weight}.")
  shared_vocab = cfg.shared_vocab
  if (
      shared_vocab is not None
      and teacher_vocab is not None
      and not (0 < shared_vocab <= min(student_vocab, teacher_vocab))
  ):
    _fail(
        f"distill.shared_vocab={shared_vocab} is larger than the student vocabulary "
        f"({student_vocab}) or the teacher vocabulary ({teacher_vocab}); use at most "
        f"{min(student_vocab, teacher_vocab)}."
    )
  if (
      objective in TOKEN_OBJECTIVES
      and shared_vocab is None
      and teacher_vocab is not None
      and teacher_vocab != student_vocab
  ):
    _fail(
        f"The student ({student_vocab}) and teacher ({teacher_vocab}) vocabularies differ; "
        "set distill.shared_vocab to the size of their common prefix."
    )
  if objective is not None and teacher_vocab is None:
    _fail(f"Recipe {cfg.recipe!r} needs a teacher; configure one or use recipe 'bd3lm'.")
  return Recipe(
      name=cfg.recipe,
      alignment=cfg.alignment,
      objective=objective,
      tidal=tidal,
      compdemo_ratio=float(cfg.compdemo.ratio) if compdemo else 0.0,
      compdemo_granularity=granularity,
      weight=float(cfg.weight),
      temperature=float(cfg.temperature),
      chunk_temperature=float(cfg.chunk_temperature),
      shared_vocab=None if shared_vocab is None else int(shared_vocab),
      max_chunks=int(cfg.max_chunks),
      chunk_size=int(cfg.chunk_size),
      tidal_options=tidal_options,
  )


def _aux(aux: dict, key: str, recipe: Recipe) -> Array:
  if key not in aux:
    _fail(
        f"Recipe {recipe.name!r} with alignment {recipe.alignment!r} needs aux[{key!r}]; "
        "build it in the batch (see docs/distill.md)."
    )
  return aux[key]


def _flat(x: Array) -> Array:
  return x.reshape(-1, x.shape[-1])


def _token_level(recipe, student_logits, teacher_logits, aux, t, progress):
  """Returns (loss_sum, count, lambda_sum, agree_sum) over distilled positions."""
  mask = _aux(aux, "distill_mask", recipe)
  b, length = mask.shape
  weights = mask.reshape(-1).astype(jnp.float32)
  rows = aux.get("teacher_rows")
  rows = None if rows is None else rows.reshape(-1).astype(jnp.int32)
  student, teacher = _flat(student_logits), _flat(teacher_logits)
  t_pos = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(b, 1), (b, length)).reshape(-1)
  common = dict(
      temperature=recipe.temperature,
      shared_vocab=recipe.shared_vocab,
      teacher_rows=rows,
      chunk_size=recipe.chunk_size,
  )
  if recipe.term == "tidal":
    loss_sum, count = terms_lib.tidal(
        student,
        teacher,
        weights,
        t=t_pos,
        progress=progress,
        options=recipe.tidal_options,
        **common,
    )
    lam = terms_lib.tidal_lambda(progress, t_pos, recipe.tidal_options)
  elif recipe.term == "forward_kl":
    loss_sum, count = terms_lib.forward_kl(student, teacher, weights, **common)
    lam = jnp.zeros_like(t_pos)
  else:
    loss_sum, count = terms_lib.reverse_kl(student, teacher, weights, **common)
    lam = jnp.zeros_like(t_pos)
  agree, _ = terms_lib.argmax_agreement(
      student,
      teacher,
      weights,
      shared_vocab=recipe.shared_vocab,
      teacher_rows=rows,
      chunk_size=recipe.chunk_size,
  )
  return loss_sum, count, jnp.sum(weights * lam), agree


def _chunk_level(recipe, student_logits, teacher_logits, aux, t, progress):
  """Returns (loss_sum, count, lambda_sum, agree_sum) over active chunks."""
  get = lambda key: _aux(aux, key, recipe)
  s_targets, s_ids = get("student_targets"), get("student_chunk_ids")
  t_targets, t_ids = get("teacher_targets"), get("teacher_chunk_ids")
  b = s_ids.shape[0]
  rows = aux.get("teacher_rows")
  rows = None if rows is None else rows.reshape(-1).astype(jnp.int32)
  student, teacher = _flat(student_logits), _flat(teacher_logits)
  size = recipe.chunk_size
  s_logp = terms_lib.target_log_probs(student, s_targets.reshape(-1), chunk_size=size)
  t_logp = terms_lib.gathered_target_log_probs(
      teacher, t_targets.reshape(-1), rows, chunk_size=size
  )
  c, temp = recipe.max_chunks, recipe.chunk_temperature
  s = chunks_lib.chunk_probability(s_logp.reshape(s_ids.shape), s_ids, c, temp)
  q = chunks_lib.chunk_probability(t_logp.reshape(t_ids.shape), t_ids, c, temp)
  active = chunks_lib.active_chunks(
      get("student_masked"), get("student_prompt"), s_ids, t_ids, c, aux.get("teacher_prompt")
  )
  t_seq = jnp.asarray(t, jnp.float32).reshape(b, 1)
  lam = weight = None
  if recipe.tidal:
    lam = terms_lib.tidal_lambda(progress, t_seq, recipe.tidal_options)
    weight = terms_lib.timestep_weight(t_seq, recipe.tidal_options.timestep_weight)
  loss_sum, count = chunks_lib.chunk_objective(
      recipe.objective if not recipe.tidal else "chunk_tidal", s, q, active, lam=lam, weight=weight
  )
  # Agreement: both models' greedy tokens reproduce the whole chunk, or both fail.
  s_wrong = terms_lib.argmax_ids(student, chunk_size=size) != s_targets.reshape(-1)
  t_wrong = terms_lib.argmax_ids(teacher, rows, chunk_size=size) != t_targets.reshape(-1)
  s_right = ~chunks_lib.chunk_any(s_wrong.reshape(s_ids.shape), s_ids, c)
  t_right = ~chunks_lib.chunk_any(t_wrong.reshape(t_ids.shape), t_ids, c)
  agree = jnp.sum(active & (s_right == t_right)).astype(jnp.float32)
  lam_sum = jnp.sum(jnp.where(active, lam, 0.0)) if lam is not None else jnp.float32(0.0)
  return loss_sum, count, lam_sum, agree


PART_NAMES = ("loss_sum", "count", "lambda_sum", "agree_sum")


def distillation_parts(
    recipe: Recipe,
    *,
    student_logits: Array,
    teacher_logits: Array | None,
    aux: dict,
    t: Array,
    progress: Array | float,
) -> dict:
  """The additive pieces of the distillation term: ``loss_sum``, ``count``, ``lambda_sum``,
  ``agree_sum`` (float32 scalars). Sums over disjoint shards of the batch add up, so a
  caller inside ``shard_map`` can ``psum`` them and then call :func:`finalize`.
  Arguments as in :func:`distillation_loss`."""
  if recipe.term is None:
    return {name: jnp.float32(0.0) for name in PART_NAMES}
  if teacher_logits is None:
    _fail(f"Recipe {recipe.name!r} needs teacher logits; got None.")
  level = _token_level if recipe.alignment == "positions" else _chunk_level
  values = level(recipe, student_logits, teacher_logits, aux, t, progress)
  return dict(zip(PART_NAMES, values))


def finalize(recipe: Recipe, parts: dict) -> tuple[Array, dict]:
  """``(weight * term, metrics)`` from (possibly summed over shards) :func:`distillation_parts`."""
  zero = jnp.float32(0.0)
  metrics = {f"distill/{name}": zero for name in METRIC_NAMES}
  count = parts["count"]
  value = terms_lib.masked_mean(parts["loss_sum"], count)
  loss = recipe.weight * value if recipe.term is not None else zero
  if recipe.term is not None:
    metrics[f"distill/{recipe.term}"] = value
  metrics.update(
      {
          "distill/loss": loss,
          "distill/lambda_mean": terms_lib.masked_mean(parts["lambda_sum"], count),
          "distill/agreement": terms_lib.masked_mean(parts["agree_sum"], count),
          "distill/count": count,
      }
  )
  return loss, metrics


def distillation_loss(
    recipe: Recipe | ml_collections.ConfigDict,
    *,
    student_logits: Array,
    teacher_logits: Array | None,
    aux: dict,
    t: Array,
    progress: Array | float,
) -> tuple[Array, dict]:
  """The weighted distillation term of one step and its metrics.

  Args:
    recipe: a :class:`Recipe` (from :func:`validate_distill_config`) or ``config.distill``.
    student_logits: ``[b, Ls, Vs]`` predictions of the student's x_t half.
    teacher_logits: the teacher's prediction logits, ``[b, Ls, Vt]`` aligned with the
      student (positions) / ``[b, Lt, Vt]`` (chunks), or any ``[..., Vt]`` read through
      ``aux['teacher_rows']``; None for ``bd3lm``.
    aux: alignment and masks, see docs/distill.md:
      positions: ``distill_mask [b, Ls]`` bool, optional ``teacher_rows [b, Ls]`` int32;
      chunks: ``student_targets``, ``student_chunk_ids``, ``student_masked``,
      ``student_prompt`` ``[b, Ls]``; ``teacher_targets``, ``teacher_chunk_ids`` ``[b, Lt]``;
      optional ``teacher_rows [b, Lt]`` and ``teacher_prompt [b, Lt]``.
    t: ``[b]`` diffusion time of each sequence.
    progress: scalar training progress in [0, 1].
  Returns:
    ``(weight * term, metrics)``; metrics hold ``distill/<term>`` (unweighted value of
    every term name, 0 for terms not in the recipe), ``distill/loss``,
    ``distill/lambda_mean``, ``distill/agreement`` and ``distill/count``.
  """
  if isinstance(recipe, ml_collections.ConfigDict):
    recipe = validate_distill_config(
        recipe,
        student_vocab=student_logits.shape[-1],
        teacher_vocab=None if teacher_logits is None else teacher_logits.shape[-1],
    )
  parts = distillation_parts(
      recipe,
      student_logits=student_logits,
      teacher_logits=teacher_logits,
      aux=aux,
      t=t,
      progress=progress,
  )
  return finalize(recipe, parts)
