"""The distillation plan: what one training step draws, asks the teacher, and scores.

A :class:`Plan` is built once per run from the validated configuration and is the only
place that knows how the pieces of a step fit together:

1. :meth:`Plan.draw` draws the step's noise once: ``t``, the student's mask (made
   chunk-consistent for chunk alignments), the teacher's mask carried through the
   alignment, and CompDemo's split;
2. :meth:`Plan.totals` counts the normalisers of the whole batch (maskable tokens,
   masked tokens, distilled positions or chunks), so micro-batches add up to the batch;
3. :meth:`Plan.loss_parts` runs the student (``diffusion.forward``), asks the teacher for
   the hidden states of its prediction positions (one call, CompDemo's passes interleaved
   per sequence), and sums the student's cross-entropy and the recipe's term from hidden
   states and output kernels, a block of rows at a time on each device's own rows
   (``parallel.batch_map`` + ``distill.fused``);
4. :meth:`Plan.loss` and :meth:`Plan.metrics` turn the sums into the loss and its metrics.

Typed alignments (:class:`PositionAlignment`, :class:`ChunkAlignment`) replace
string-keyed dictionaries; the recipe (``recipes.Recipe``) is validated once, before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tide_jax.diffusion import forward, noising, schedules
from tide_jax.distill import chunks as chunks_lib
from tide_jax.distill import compdemo, fused, recipes, terms
from tide_jax.parallel import batch_map
from tide_jax.teachers import Teacher

Array = jax.Array
Projection = fused.Projection


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Objective:
  """The student's diffusion objective (the ``objective`` config section).

  Attributes:
    kind: ``bd3lm`` (the student) or ``mdlm`` (a bidirectional model).
    schedule: alpha(t) schedule name.
    t_eps: lower bound of ``t``.
    mask_token_id: the student's mask token.
    block_size: B.
    row_block: rows per block of the fused vocabulary statistics.
    vocab_tile: vocabulary columns per tile of their forward and backward passes (at most).
  """

  kind: str
  schedule: str
  t_eps: float
  mask_token_id: int
  block_size: int
  row_block: int
  vocab_tile: int = fused.VOCAB_TILE

  @classmethod
  def from_config(cls, config) -> "Objective":
    o = config.objective
    return cls(
        kind=o.kind,
        schedule=o.schedule,
        t_eps=float(o.t_eps),
        mask_token_id=int(o.mask_token_id),
        block_size=int(config.block_size),
        row_block=int(o.row_block),
        vocab_tile=int(o.vocab_tile),
    )


# ----------------------------------------------------------------------------- alignments


@struct.dataclass
class PositionAlignment:
  """Shared tokenizer: the teacher position paired with each student position.

  Attributes:
    teacher_pos: ``[b, Ls]`` int32, -1 where a student position has no pair.
  """

  teacher_pos: Array

  @classmethod
  def from_batch(cls, batch: dict[str, Array]) -> "PositionAlignment":
    """From the batch's ``pair_student``/``pair_teacher`` ``[b, P]`` index lists (-1 padded)."""
    pair_s, pair_t = batch["pair_student"], batch["pair_teacher"]
    b, length = batch["input_ids"].shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], pair_s.shape)
    target = jnp.where(pair_s >= 0, pair_s, length)  # padding entries are dropped
    out = jnp.full((b, length), -1, jnp.int32)
    return cls(out.at[rows, target].set(pair_t.astype(jnp.int32), mode="drop"))


@struct.dataclass
class ChunkAlignment:
  """Cross tokenizer: per-token byte-chunk ids on both sides (-1 = in no chunk).

  Attributes:
    student: ``[b, Ls]`` int32; teacher: ``[b, Lt]`` int32.
  """

  student: Array
  teacher: Array

  @classmethod
  def from_batch(cls, batch: dict[str, Array]) -> "ChunkAlignment":
    return cls(batch["student_chunk"], batch["teacher_chunk"])


def alignment_of(recipe: recipes.Recipe | None, batch: dict[str, Array]):
  if recipe is None or not recipe.uses_teacher:
    return None
  if recipe.alignment == "chunks":
    return ChunkAlignment.from_batch(batch)
  return PositionAlignment.from_batch(batch)


# ----------------------------------------------------------------------------- one step's noise


@struct.dataclass
class Noise:
  """What a step drew, batch-major (micro-batches slice it with the batch).

  Attributes:
    x_t: ``[b, Ls]`` noised student tokens.
    masked: ``[b, Ls]`` bool, the student's masked positions.
    t: ``[b]`` float32 diffusion times, or ``[b, Ls]`` per token for packed rows (each
      example's own time on its tokens).
    teacher_masked: ``[b, Lt]`` bool, the teacher's masked set ``M`` (None without teacher).
    in_a: ``[b, Lt]`` bool, CompDemo's ``M_A`` (None without CompDemo).
    alignment: the batch's typed alignment (None without teacher).
  """

  x_t: Array
  masked: Array
  t: Array
  teacher_masked: Array | None = None
  in_a: Array | None = None
  alignment: Any = None


PART_NAMES = ("ce_sum", "nll_sum", "correct_sum", "distill_sum", "lambda_sum", "agree_sum")
TOTAL_NAMES = ("maskable", "masked", "distilled")


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one step of a run is scored (static; built once per run).

  Attributes:
    objective: the student's diffusion objective.
    recipe: the validated recipe, or None for the student's loss alone.
    teacher: the frozen teacher when the recipe uses one.
  """

  objective: Objective
  recipe: recipes.Recipe | None = None
  teacher: Teacher | None = None

  def __post_init__(self):
    forward.check_objective(self.objective.kind)
    schedules.check_schedule(self.objective.schedule)
    if self.distills and self.teacher is None:
      raise ValueError(f"Recipe {self.recipe.name!r} needs a teacher; none was loaded.")

  @property
  def distills(self) -> bool:
    return self.recipe is not None and self.recipe.uses_teacher

  # --------------------------------------------------------------------------- 1. noise

  def draw(self, key: Array, batch: dict[str, Array]) -> Noise:
    """The step's noise for the whole batch (``batch['input_ids'] [b, Ls]``)."""
    obj = self.objective
    key_student, key_split = jax.random.split(key)
    key_t, key_mask = jax.random.split(key_student)
    ids, maskable = batch["input_ids"], batch["maskable"]
    if "segment_ids" not in batch:
      t = schedules.sample_t(key_t, ids.shape[0], obj.t_eps)
    elif self.distills:
      raise ValueError(
          "Packed batches (data.packing=True) cannot be distilled: they carry no teacher side; "
          "set data.packing=False."
      )
    else:
      t = schedules.sample_segment_t(key_t, batch["segment_ids"], obj.t_eps)
    _, masked = noising.noise_tokens(key_mask, ids, maskable, t, obj.mask_token_id, obj.schedule)
    if not self.distills:
      return Noise(noising.apply_mask(ids, masked, obj.mask_token_id), masked, t)
    recipe = self.recipe
    alignment = alignment_of(recipe, batch)
    teacher_len = batch["teacher_input_ids"].shape[1]
    if isinstance(alignment, ChunkAlignment):
      masked, teacher_masked = chunks_lib.chunk_consistent_masks(
          masked, alignment.student, alignment.teacher, recipe.max_chunks, maskable
      )
      masked &= maskable
    else:
      teacher_masked = compdemo.flags_to_teacher(masked, alignment.teacher_pos, teacher_len)
    teacher_masked &= batch["teacher_maskable"]
    in_a = None
    if recipe.uses_compdemo:
      chunked = isinstance(alignment, ChunkAlignment)
      in_a = compdemo.teacher_split(
          key_split,
          recipe.compdemo_ratio,
          masked,
          teacher_masked,
          granularity=recipe.compdemo_granularity,
          pair_teacher_pos=None if chunked else alignment.teacher_pos,
          student_chunk_ids=alignment.student if chunked else None,
          teacher_chunk_ids=alignment.teacher if chunked else None,
          max_chunks=recipe.max_chunks,
      )
    x_t = noising.apply_mask(ids, masked, obj.mask_token_id)
    return Noise(x_t, masked, t, teacher_masked, in_a, alignment)

  # --------------------------------------------------------------------------- 2. totals

  def totals(self, batch: dict[str, Array], noise: Noise) -> dict[str, Array]:
    """The batch's normalisers (float32 scalars): maskable, masked, distilled."""
    out = {
        "maskable": jnp.sum(batch["maskable"]).astype(jnp.float32),
        "masked": jnp.sum(noise.masked).astype(jnp.float32),
        "distilled": jnp.float32(0.0),
    }
    if self.distills:
      out["distilled"] = jnp.sum(self._distilled(batch, noise)).astype(jnp.float32)
    return out

  def _distilled(self, batch, noise) -> Array:
    """Where the term is taken: ``[b, Ls]`` positions or ``[b, C]`` active chunks (bool)."""
    alignment = noise.alignment
    if isinstance(alignment, PositionAlignment):
      return noise.masked & (alignment.teacher_pos >= 0)
    return chunks_lib.active_chunks(
        noise.masked,
        batch["valid"] & ~batch["maskable"],
        alignment.student,
        alignment.teacher,
        self.recipe.max_chunks,
        batch["teacher_valid"] & ~batch["teacher_maskable"],
    )

  # --------------------------------------------------------------------------- 3. sums

  def teacher_hidden(self, teacher_params, batch: dict[str, Array], noise: Noise) -> Array:
    """The teacher's prediction hidden states: ``[P b, Lt, Et]``, P = 2 with CompDemo
    (sequence ``i``'s passes at rows ``2i`` and ``2i + 1``), else 1."""
    clean, valid = batch["teacher_input_ids"], batch["teacher_valid"]
    if noise.in_a is None:
      return self.teacher.prediction_hidden(teacher_params, clean, noise.teacher_masked, valid)
    return self.teacher.prediction_hidden(
        teacher_params,
        compdemo.repeat_passes(clean),
        compdemo.doubled_masks(noise.teacher_masked, noise.in_a),
        compdemo.repeat_passes(valid),
    )

  def loss_parts(
      self,
      model,
      teacher_params,
      batch: dict[str, Array],
      noise: Noise,
      progress: Array | float,
  ) -> dict[str, Array]:
    """Partial sums (float32 scalars, ``PART_NAMES``) over the rows of ``batch``.

    Differentiable in the student ``model``'s parameters; sums over disjoint rows add up.
    """
    obj = self.objective
    ids = batch["input_ids"]
    hidden = forward.denoiser_hidden(
        model,
        ids,
        noise.x_t,
        kind=obj.kind,
        block_size=obj.block_size,
        valid=batch["valid"] if obj.kind == "mdlm" else None,
        segment_ids=batch.get("segment_ids"),  # packed rows (data.packing)
        positions=batch.get("positions"),
    )
    weight = schedules.loss_weight(noise.t, obj.schedule)
    weight = weight[:, None] if weight.ndim == 1 else weight
    rows = {
        "hidden": hidden,
        "targets": ids,
        "masked": noise.masked,
        "ce_weight": weight * noise.masked,
    }
    shared = {"kernel": model.output_kernel(), "progress": jnp.asarray(progress, jnp.float32)}
    if not self.distills:
      return batch_map.batch_sums(self._student_sums, rows, shared)
    rows.update(
        t=noise.t,
        teacher_hidden=self.teacher_hidden(teacher_params, batch, noise),
        distilled=self._distilled(batch, noise),
        passes=compdemo.pass_of(noise.in_a, batch["teacher_input_ids"].shape),
        alignment=noise.alignment,
    )
    if isinstance(noise.alignment, ChunkAlignment):
      rows["teacher_targets"] = batch["teacher_input_ids"]
    shared["teacher_kernel"] = self.teacher.output_kernel(teacher_params)
    return batch_map.batch_sums(self._distill_sums, rows, shared)

  def _student_sums(self, rows, shared, split) -> dict[str, Array]:
    logp, correct = _target_rows(split, rows["hidden"], shared["kernel"], rows["targets"], self)
    return _student_parts(rows, logp, correct)

  def _distill_sums(self, rows, shared, split) -> dict[str, Array]:
    if isinstance(rows["alignment"], PositionAlignment):
      return self._position_sums(rows, shared, split)
    return self._chunk_sums(rows, shared, split)

  def _teacher_rows(self, rows) -> Array:
    """Local row of ``teacher_hidden.reshape(-1, Et)`` for every teacher position: ``[b, Lt]``."""
    b, teacher_len = rows["passes"].shape
    passes = rows["teacher_hidden"].shape[0] // b
    sequence = jnp.arange(b, dtype=jnp.int32)[:, None] * passes + rows["passes"]
    return sequence * teacher_len + jnp.arange(teacher_len, dtype=jnp.int32)[None, :]

  def _position_sums(self, rows, shared, split) -> dict[str, Array]:
    recipe = self.recipe
    hidden, t = rows["hidden"], rows["t"]
    b, length, width = hidden.shape
    teacher_pos = rows["alignment"].teacher_pos
    teacher_rows = jnp.take_along_axis(self._teacher_rows(rows), jnp.maximum(teacher_pos, 0), 1)
    lam = jnp.zeros((b,), jnp.float32)
    step_weight = jnp.ones((b,), jnp.float32)
    if recipe.term == "tidal":
      lam = terms.tidal_lambda(shared["progress"], t, recipe.tidal_options)
      step_weight = terms.timestep_weight(t, recipe.tidal_options.timestep_weight)
    row_kernel = terms.PairedRows(
        terms.make_token_term(recipe.term, recipe.temperature),
        terms.resolve_shared_vocab(
            shared["kernel"].shape[1], shared["teacher_kernel"].shape[1], recipe.shared_vocab
        ),
    )
    teacher_hidden = rows["teacher_hidden"]

    def stats(r, whole):
      return fused.row_statistics(
          row_kernel,
          Projection(r["hidden"], whole["kernel"]),
          Projection(whole["teacher_hidden"], whole["teacher_kernel"]),
          r["teacher_rows"],
          {"targets": r["targets"], "lam": r["lam"]},
          block_rows=self.objective.row_block,
          vocab_tile=self.objective.vocab_tile,
      )

    values, flags = split.rowwise(
        stats,
        {
            "hidden": hidden.reshape(-1, width),
            "teacher_rows": teacher_rows.reshape(-1),
            "targets": rows["targets"].reshape(-1),
            "lam": jnp.repeat(lam, length),
        },
        {
            "kernel": split.varying(shared["kernel"]),
            "teacher_hidden": teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            "teacher_kernel": split.varying(shared["teacher_kernel"]),
        },
    )
    logp, term = values[:, 0].reshape(b, length), values[:, 1].reshape(b, length)
    correct, agree = flags[:, 0].reshape(b, length), flags[:, 1].reshape(b, length)
    parts = _student_parts(rows, logp, correct)
    distilled = rows["distilled"].astype(jnp.float32)
    parts["distill_sum"] = jnp.sum(distilled * step_weight[:, None] * term)
    parts["lambda_sum"] = jnp.sum(distilled * lam[:, None])
    parts["agree_sum"] = jnp.sum(distilled * agree)
    return parts

  def _chunk_sums(self, rows, shared, split) -> dict[str, Array]:
    recipe = self.recipe
    alignment = rows["alignment"]
    logp_s, correct_s = _target_rows(split, rows["hidden"], shared["kernel"], rows["targets"], self)
    teacher_hidden = rows["teacher_hidden"]
    flat_teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    gathered = jnp.take(flat_teacher, self._teacher_rows(rows), axis=0)  # [b, Lt, Et]
    logp_t, correct_t = _target_rows(
        split, gathered, shared["teacher_kernel"], rows["teacher_targets"], self
    )
    c, temp = recipe.max_chunks, recipe.chunk_temperature
    s = chunks_lib.chunk_probability(logp_s, alignment.student, c, temp)
    q = chunks_lib.chunk_probability(logp_t, alignment.teacher, c, temp)
    active = rows["distilled"]
    t_seq = rows["t"][:, None]
    lam = weight = None
    if recipe.tidal:
      lam = terms.tidal_lambda(shared["progress"], t_seq, recipe.tidal_options)
      weight = terms.timestep_weight(t_seq, recipe.tidal_options.timestep_weight)
    name = "chunk_tidal" if recipe.tidal else recipe.objective
    loss_sum, _ = chunks_lib.chunk_objective(name, s, q, active, lam=lam, weight=weight)
    # Agreement: both models' greedy tokens reproduce the whole chunk, or both fail.
    s_right = ~chunks_lib.chunk_any(correct_s < 0.5, alignment.student, c)
    t_right = ~chunks_lib.chunk_any(correct_t < 0.5, alignment.teacher, c)
    parts = _student_parts(rows, logp_s, correct_s)
    parts["distill_sum"] = loss_sum
    parts["lambda_sum"] = jnp.sum(jnp.where(active, lam, 0.0)) if lam is not None else 0.0
    parts["agree_sum"] = jnp.sum(active & (s_right == t_right)).astype(jnp.float32)
    return {k: jnp.asarray(v, jnp.float32) for k, v in parts.items()}

  # --------------------------------------------------------------------------- 4. loss

  def loss(self, parts: dict[str, Array], totals: dict[str, Array]) -> Array:
    """The scalar loss: cross-entropy per maskable token plus the weighted term."""
    loss = parts["ce_sum"] / jnp.maximum(totals["maskable"], 1.0)
    if self.distills:
      term = terms.masked_mean(parts["distill_sum"], totals["distilled"])
      loss = loss + self.recipe.weight * term
    return loss

  def metrics(self, parts: dict[str, Array], totals: dict[str, Array]) -> dict[str, Array]:
    """Scalars for logs: the loss pieces, masked-token NLL and accuracy, and distill/*."""
    masked = jnp.maximum(totals["masked"], 1.0)
    out = {
        "loss": self.loss(parts, totals),
        "ce_loss": parts["ce_sum"] / jnp.maximum(totals["maskable"], 1.0),
        "masked_nll": parts["nll_sum"] / masked,
        "masked_accuracy": parts["correct_sum"] / masked,
        "masked_fraction": totals["masked"] / jnp.maximum(totals["maskable"], 1.0),
        "maskable_tokens": totals["maskable"],
    }
    if self.recipe is None:
      return out
    count = totals["distilled"]
    value = terms.masked_mean(parts["distill_sum"], count)
    zero = jnp.float32(0.0)
    out.update({f"distill/{name}": zero for name in recipes.METRIC_NAMES})
    term = self.recipe.term
    if term is not None:
      out[f"distill/{term}"] = value
    out.update(
        {
            "distill/loss": self.recipe.weight * value if term is not None else zero,
            "distill/lambda_mean": terms.masked_mean(parts["lambda_sum"], count),
            "distill/agreement": terms.masked_mean(parts["agree_sum"], count),
            "distill/count": count,
        }
    )
    return out


# ----------------------------------------------------------------------------- helpers


def _target_rows(split, hidden, kernel, targets, plan) -> tuple[Array, Array]:
  """``log softmax(h W)[target]`` and correctness per position: ``[b, L]`` each."""
  b, length, width = hidden.shape

  def stats(r, whole):
    return fused.row_statistics(
        terms.TargetRows(),
        Projection(r["hidden"], whole["kernel"]),
        extra=r["targets"],
        block_rows=plan.objective.row_block,
        vocab_tile=plan.objective.vocab_tile,
    )

  values, flags = split.rowwise(
      stats,
      {"hidden": hidden.reshape(-1, width), "targets": targets.reshape(-1).astype(jnp.int32)},
      {"kernel": split.varying(kernel)},
  )
  return values[:, 0].reshape(b, length), flags[:, 0].reshape(b, length)


def _student_parts(rows, logp: Array, correct: Array) -> dict[str, Array]:
  masked = rows["masked"].astype(jnp.float32)
  zero = jnp.float32(0.0)
  return {
      "ce_sum": -jnp.sum(rows["ce_weight"] * logp),
      "nll_sum": -jnp.sum(masked * logp),
      "correct_sum": jnp.sum(masked * correct),
      "distill_sum": zero,
      "lambda_sum": zero,
      "agree_sum": zero,
  }


def add_parts(a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
  return {k: a[k] + b[k] for k in a}
