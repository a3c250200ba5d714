"""Token-level distillation terms over flat positions (SPEC 3.1 and 3.4).

Every term takes

* ``student_logits [N, Vs]`` (any float dtype, usually bfloat16; differentiated),
* ``teacher_logits [N, Vt]``, or ``[R, Vt]`` together with ``teacher_rows [N]`` int32
  naming the teacher row paired with each student position (never differentiated),
* ``weights [N]`` float32: the per-position weight, 0 where a position is not distilled,

computes in float32 one block of ``chunk_size`` positions at a time (see ``rows.py``)
and returns ``(loss_sum, count)``: the weighted sum of the per-position losses (the
``T^2`` factor included) and the number of positions with a positive weight. The term's
value is ``masked_mean(loss_sum, count)``, exactly 0 when nothing is distilled.

``shared_vocab`` cuts both logits to their first ``shared_vocab`` entries before any
softmax; without it both vocabularies must have the same size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tide_jax.distill import rows as rows_lib

Array = jax.Array

GROWTHS = ("cosine", "linear")
AXES = ("both", "training_only", "timestep_only")
TIMESTEP_WEIGHTS = ("midrange", "uniform")
MIDRANGE_CENTER = 0.5
MIDRANGE_WIDTH = 0.15


# ----------------------------------------------------------------------------- TIDAL lambda


@dataclasses.dataclass(frozen=True)
class TidalOptions:
  """TIDAL's schedule (SPEC 3.1): lambda grows from ``l0`` to ``l1`` over training."""

  l0: float = 0.1
  l1: float = 0.9
  growth: str = "cosine"
  axis: str = "both"
  timestep_weight: str = "midrange"

  def __post_init__(self):
    for name, value, allowed in (
        ("growth", self.growth, GROWTHS),
        ("axis", self.axis, AXES),
        ("timestep_weight", self.timestep_weight, TIMESTEP_WEIGHTS),
    ):
      if value not in allowed:
        raise ValueError(f"Unknown TIDAL {name} {value!r}; use one of {', '.join(allowed)}.")


def tidal_lambda(
    progress: Array | float, t: Array, options: TidalOptions = TidalOptions()
) -> Array:
  """lambda(p, t) for training progress ``p`` in [0, 1] and diffusion times ``t`` (any shape).

  training axis ``l0 + (l1 - l0) g(p)`` with ``g(p) = (1 - cos(pi p)) / 2`` or ``p``;
  ``both`` multiplies it by ``1 - t``; ``training_only`` uses it alone;
  ``timestep_only`` is ``l1 (1 - t)``.
  """
  t = jnp.asarray(t, jnp.float32)
  p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  g = (1.0 - jnp.cos(jnp.pi * p)) / 2.0 if options.growth == "cosine" else p
  lam_train = options.l0 + (options.l1 - options.l0) * g
  if options.axis == "both":
    return lam_train * (1.0 - t)
  if options.axis == "training_only":
    return jnp.broadcast_to(lam_train, t.shape)
  return options.l1 * (1.0 - t)


def timestep_weight(t: Array, mode: str = "midrange") -> Array:
  """``exp(-(t - 0.5)^2 / (2 * 0.15^2))`` ("midrange") or 1 ("uniform"), same shape as t."""
  t = jnp.asarray(t, jnp.float32)
  if mode == "uniform":
    return jnp.ones_like(t)
  if mode != "midrange":
    raise ValueError(f"Unknown timestep weight {mode!r}; use midrange or uniform.")
  return jnp.exp(-((t - MIDRANGE_CENTER) ** 2) / (2.0 * MIDRANGE_WIDTH**2))


# ----------------------------------------------------------------------------- row kernels


@dataclasses.dataclass(frozen=True)
class _Kernel:
  temperature: float = 1.0
  shared_vocab: int | None = None

  def cut(self, z):
    return z if self.shared_vocab is None else z[:, : self.shared_vocab]

  def log_probs(self, z):
    return jax.nn.log_softmax(self.cut(z) / self.temperature, axis=-1)


class _ForwardKL(_Kernel):
  """``T^2 KL(softmax(zt/T) || softmax(zs/T))``; d/dzs = ``T (p_s - p_t)``."""

  def value(self, zs, zt, extra):
    ls, lt = self.log_probs(zs), self.log_probs(zt)
    return self.temperature**2 * jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)

  def grad(self, zs, zt, extra):
    return self.temperature * (jnp.exp(self.log_probs(zs)) - jnp.exp(self.log_probs(zt)))


class _ReverseKL(_Kernel):
  """``T^2 KL(softmax(zs/T) || softmax(zt/T))``; d/dzs = ``T p_s (a - KL)``, a = log p_s - log p_t."""

  def value(self, zs, zt, extra):
    ls, lt = self.log_probs(zs), self.log_probs(zt)
    return self.temperature**2 * jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)

  def grad(self, zs, zt, extra):
    ls, lt = self.log_probs(zs), self.log_probs(zt)
    ps, a = jnp.exp(ls), ls - lt
    kl = jnp.sum(ps * a, axis=-1, keepdims=True)
    return self.temperature * ps * (a - kl)


class _Tidal(_Kernel):
  """``T^2 KL(r || softmax(zs/T))`` with the constant target
  ``r = softmax(((1 - lam) zs + lam zt) / T)``; d/dzs = ``T (p_s - r)``. extra = lam [c]."""

  def target_log_probs(self, zs, zt, lam):
    lam = lam[:, None]
    return self.log_probs((1.0 - lam) * zs + lam * zt)

  def value(self, zs, zt, lam):
    ls, lr = self.log_probs(zs), self.target_log_probs(zs, zt, lam)
    return self.temperature**2 * jnp.sum(jnp.exp(lr) * (lr - ls), axis=-1)

  def grad(self, zs, zt, lam):
    return self.temperature * (
        jnp.exp(self.log_probs(zs)) - jnp.exp(self.target_log_probs(zs, zt, lam))
    )


class _TargetLogProb(_Kernel):
  """``log softmax(z)[x]``; d/dz = ``onehot(x) - softmax(z)``. extra = x [c] int32."""

  def value(self, z, _, targets):
    picked = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(z, axis=-1)

  def grad(self, z, _, targets):
    onehot = jnp.arange(z.shape[-1])[None, :] == targets[:, None]
    return onehot.astype(jnp.float32) - jax.nn.softmax(z, axis=-1)


# ----------------------------------------------------------------------------- helpers


def resolve_shared_vocab(
    student_vocab: int, teacher_vocab: int, shared_vocab: int | None
) -> int | None:
  """The column cut to apply (None when the vocabularies already match)."""
  if shared_vocab is None:
    if student_vocab != teacher_vocab:
      raise ValueError(
          f"The student vocabulary ({student_vocab}) and the teacher vocabulary "
          f"({teacher_vocab}) differ; set distill.shared_vocab to the size of "
          "their common prefix."
      )
    return None
  if not 0 < shared_vocab <= min(student_vocab, teacher_vocab):
    raise ValueError(
        f"distill.shared_vocab={shared_vocab} must be between 1 and the smaller "
        f"vocabulary ({min(student_vocab, teacher_vocab)})."
    )
  return None if shared_vocab == student_vocab == teacher_vocab else shared_vocab


def masked_mean(loss_sum: Array, count: Array) -> Array:
  """``loss_sum / count``, exactly 0 when ``count`` is 0."""
  return jnp.where(count > 0, loss_sum / jnp.maximum(count, 1.0), 0.0)


def _weighted(per_row: Array, weights: Array) -> tuple[Array, Array]:
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != per_row.shape:
    raise ValueError(f"weights must have shape {per_row.shape}, got {weights.shape}.")
  active = weights != 0
  loss_sum = jnp.sum(jnp.where(active, weights * per_row, 0.0))
  return loss_sum, jnp.sum(weights > 0).astype(jnp.float32)


def _pair_kernel(cls, student_logits, teacher_logits, temperature, shared_vocab):
  if temperature <= 0:
    raise ValueError(f"The distillation temperature must be positive, got {temperature}.")
  cut = resolve_shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], shared_vocab)
  return cls(temperature=float(temperature), shared_vocab=cut)


# ----------------------------------------------------------------------------- terms


def forward_kl(
    student_logits: Array,
    teacher_logits: Array,
    weights: Array,
    *,
    temperature: float = 2.0,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
  """Forward KL(teacher || student) at temperature T, times T^2. Returns (loss_sum, count)."""
  kernel = _pair_kernel(_ForwardKL, student_logits, teacher_logits, temperature, shared_vocab)
  per_row = rows_lib.rowwise(
      kernel, student_logits, teacher_logits, teacher_rows, chunk_size=chunk_size
  )
  return _weighted(per_row, weights)


def reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    weights: Array,
    *,
    temperature: float = 2.0,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
  """Reverse KL(student || teacher) at temperature T, times T^2. Returns (loss_sum, count)."""
  kernel = _pair_kernel(_ReverseKL, student_logits, teacher_logits, temperature, shared_vocab)
  per_row = rows_lib.rowwise(
      kernel, student_logits, teacher_logits, teacher_rows, chunk_size=chunk_size
  )
  return _weighted(per_row, weights)


def tidal(
    student_logits: Array,
    teacher_logits: Array,
    weights: Array,
    *,
    t: Array,
    progress: Array | float,
    options: TidalOptions = TidalOptions(),
    temperature: float = 2.0,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
  """TIDAL (SPEC 3.1): ``T^2 w(t) KL(r || softmax(zs/T))`` with the constant target
  ``r = softmax(((1 - lambda) zs + lambda zt) / T)``.

  Args:
    t: ``[N]`` the diffusion time of each position's sequence.
    progress: training progress in [0, 1] (scalar).
  Returns:
    ``(loss_sum, count)``; the loss sum includes the timestep weight ``w(t)``.
  """
  kernel = _pair_kernel(_Tidal, student_logits, teacher_logits, temperature, shared_vocab)
  lam = tidal_lambda(progress, t, options)
  per_row = rows_lib.rowwise(
      kernel, student_logits, teacher_logits, teacher_rows, lam, chunk_size=chunk_size
  )
  return _weighted(per_row * timestep_weight(t, options.timestep_weight), weights)


def target_log_probs(
    logits: Array, targets: Array, *, chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE
) -> Array:
  """``log softmax(logits)[targets]`` per row, ``[N, V], [N] -> [N]`` float32, differentiable."""
  return rows_lib.rowwise(
      _TargetLogProb(), logits, None, None, targets.astype(jnp.int32), chunk_size=chunk_size
  )


def gathered_target_log_probs(
    logits: Array,
    targets: Array,
    rows: Array | None = None,
    *,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> Array:
  """Like :func:`target_log_probs` for a frozen model whose rows are gathered by ``rows``:
  ``logits [R, V]``, ``targets [N]``, ``rows [N]`` -> ``[N]`` float32, no gradient."""
  kernel = _TargetLogProb()
  return rows_lib.map_rows(
      lambda z, x: kernel.value(z.astype(jnp.float32), None, x),
      logits,
      rows,
      targets.astype(jnp.int32),
      chunk_size=chunk_size,
  )


def argmax_ids(
    logits: Array,
    rows: Array | None = None,
    *,
    vocab: int | None = None,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> Array:
  """Greedy token of each row (optionally within the first ``vocab`` ids), ``[N]`` int32."""
  return rows_lib.map_rows(
      lambda z, _: jnp.argmax(z if vocab is None else z[:, :vocab], axis=-1).astype(jnp.int32),
      logits,
      rows,
      None,
      chunk_size=chunk_size,
  )


def argmax_agreement(
    student_logits: Array,
    teacher_logits: Array,
    weights: Array,
    *,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    chunk_size: int = rows_lib.DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
  """(number of distilled positions where both models' argmax agree, count)."""
  cut = resolve_shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], shared_vocab)
  s = argmax_ids(student_logits, vocab=cut, chunk_size=chunk_size)
  t = argmax_ids(teacher_logits, teacher_rows, vocab=cut, chunk_size=chunk_size)
  return _weighted((s == t).astype(jnp.float32), (jnp.asarray(weights) > 0).astype(jnp.float32))


__all__ = [
    "TidalOptions",
    "tidal_lambda",
    "timestep_weight",
    "resolve_shared_vocab",
    "masked_mean",
    "forward_kl",
    "reverse_kl",
    "tidal",
    "target_log_probs",
    "gathered_target_log_probs",
    "argmax_ids",
    "argmax_agreement",
]
