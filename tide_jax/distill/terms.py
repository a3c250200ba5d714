"""Token-level terms: the student's cross-entropy and the distillation terms (docs/method.md §3.1, §3.4).

A *token term* compares the student's and the teacher's distributions at one position,
on logits already cut to the shared vocabulary: ``value(zs, zt, lam) -> [c]`` and its
derivative ``grad(zs, zt, lam) -> [c, V']`` with respect to ``zs`` (closed forms, float32).
``TOKEN_TERMS`` names them; adding a term is one class here and one line in the recipe
table (``recipes.py``).

Row kernels (see ``fused.py``) evaluate terms one block of rows at a time from hidden
states and output kernels, never from materialised ``[rows, vocab]`` logits:

* :class:`TargetRows`: ``log softmax(z)[target]`` (the cross-entropy) and whether the
  argmax is the target;
* :class:`PairedRows`: the cross-entropy of the student and one token term against the
  teacher row paired with it, from ONE projection of the student's hidden states, and
  whether both models' argmax agree on the shared vocabulary.

Functions over flat rows return ``(loss_sum, count)``: the weighted sum of the
per-position losses (the ``T^2`` factor included) and the number of positions with a
positive weight; the term's value is ``masked_mean(loss_sum, count)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tide_jax.distill import fused, online

Array = jax.Array
Projection = fused.Projection

GROWTHS = ("cosine", "linear")
AXES = ("both", "training_only", "timestep_only")
TIMESTEP_WEIGHTS = ("midrange", "uniform")
MIDRANGE_CENTER = 0.5
MIDRANGE_WIDTH = 0.15


# ----------------------------------------------------------------------------- TIDAL lambda


@dataclasses.dataclass(frozen=True)
class TidalOptions:
  """TIDAL's schedule (docs/method.md §3.1): lambda grows from ``l0`` to ``l1`` over training."""

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


# ----------------------------------------------------------------------------- token terms
#
# Each term: ``value(zs, zt, lam) -> [c]`` on (cut) logits; ``row_stats(zs, zt, lam) ->
# [c, G]``, what its gradient needs about a whole row (log-sum-exps, a divergence); and
# ``tile_grad(zs, zt, lam, stats) -> [c, tile]``, d value / d zs on any range of columns
# from those columns' logits and the row statistics. ``grad`` is the whole row's.
#
# And the forward's tile-by-tile form (``PairedRows`` drives it; ``online.py``):
# ``tile_init(c) -> carry``, ``tile_update(carry, zs, zt, lam, mask, sweep) -> carry`` for
# the ``[c, tile]`` logits of a range of columns (``mask [1, tile]`` bool: the columns that
# count, or None when all do), and ``tile_finish(carry, lam) -> (value [c], row_stats)``.
# ``sweeps`` is how many passes over the vocabulary it needs (the Jensen-Shannon
# divergence's mixture needs both log-sum-exps first: two).


def _lse(z: Array) -> Array:
  return jax.nn.logsumexp(z, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Term:
  temperature: float = 2.0
  sweeps = 1

  def grad(self, zs, zt, lam):
    return self.tile_grad(zs, zt, lam, self.row_stats(zs, zt, lam))

  def _scaled(self, z, mask):
    """``z / T`` with ``-inf`` in the columns that do not count."""
    return online.masked(z / self.temperature, mask, -jnp.inf)


class ForwardKL(_Term):
  """``T^2 KL(softmax(zt/T) || softmax(zs/T))``; d/dzs = ``T (p_s - p_t)``."""

  def value(self, zs, zt, lam):
    ls, lt = _log_probs(zs, self.temperature), _log_probs(zt, self.temperature)
    return self.temperature**2 * jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)

  def row_stats(self, zs, zt, lam):
    t = self.temperature
    return jnp.stack([_lse(zs / t), _lse(zt / t)], axis=1)

  def tile_grad(self, zs, zt, lam, stats):
    t = self.temperature
    return t * (jnp.exp(zs / t - stats[:, :1]) - jnp.exp(zt / t - stats[:, 1:2]))

  # KL = E_target[xt - xs] - lse(xt) + lse(xs), x = z / T and xt the target's logits
  # (the teacher's here, TIDAL's mixture in its subclass).
  def _target(self, zs, zt, lam, mask):
    return self._scaled(zt, mask)

  def tile_init(self, rows):
    return online.softmax_init(rows), online.softmax_init(rows, 1)

  def tile_update(self, carry, zs, zt, lam, mask, sweep):
    xs, xt = self._scaled(zs, mask), self._target(zs, zt, lam, mask)
    gap = online.masked(xt - xs, mask, 0.0)
    return online.softmax_update(carry[0], xs), online.softmax_update(carry[1], xt, gap)

  def tile_finish(self, carry, lam):
    lse_s, lse_t = online.logsumexp(carry[0]), online.logsumexp(carry[1])
    (gap,) = online.means(carry[1])
    return self.temperature**2 * (gap - lse_t + lse_s), jnp.stack([lse_s, lse_t], axis=1)


class ReverseKL(_Term):
  """``T^2 KL(softmax(zs/T) || softmax(zt/T))``; d/dzs = ``T p_s (a - KL)``, a = log p_s - log p_t."""

  def value(self, zs, zt, lam):
    ls, lt = _log_probs(zs, self.temperature), _log_probs(zt, self.temperature)
    return self.temperature**2 * jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)

  def row_stats(self, zs, zt, lam):
    t = self.temperature
    ls, lt = _log_probs(zs, t), _log_probs(zt, t)
    kl = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
    return jnp.stack([_lse(zs / t), _lse(zt / t), kl], axis=1)

  def tile_grad(self, zs, zt, lam, stats):
    t = self.temperature
    ls, lt = zs / t - stats[:, :1], zt / t - stats[:, 1:2]
    return t * jnp.exp(ls) * (ls - lt - stats[:, 2:3])

  # KL = E_ps[xs - xt] - lse(xs) + lse(xt), x = z / T.
  def tile_init(self, rows):
    return online.softmax_init(rows, 1), online.softmax_init(rows)

  def tile_update(self, carry, zs, zt, lam, mask, sweep):
    xs, xt = self._scaled(zs, mask), self._scaled(zt, mask)
    gap = online.masked(xs - xt, mask, 0.0)
    return online.softmax_update(carry[0], xs, gap), online.softmax_update(carry[1], xt)

  def tile_finish(self, carry, lam):
    lse_s, lse_t = online.logsumexp(carry[0]), online.logsumexp(carry[1])
    (gap,) = online.means(carry[0])
    kl = gap - lse_s + lse_t
    return self.temperature**2 * kl, jnp.stack([lse_s, lse_t, kl], axis=1)


class Tidal(ForwardKL):
  """``T^2 KL(r || softmax(zs/T))`` with the constant target
  ``r = softmax(((1 - lam) zs + lam zt) / T)``; d/dzs = ``T (p_s - r)``. ``lam [c]``."""

  def _mixed(self, zs, zt, lam):
    lam = lam[:, None]
    return ((1.0 - lam) * zs + lam * zt) / self.temperature

  def target_log_probs(self, zs, zt, lam):
    return jax.nn.log_softmax(self._mixed(zs, zt, lam), axis=-1)

  def value(self, zs, zt, lam):
    ls, lr = _log_probs(zs, self.temperature), self.target_log_probs(zs, zt, lam)
    return self.temperature**2 * jnp.sum(jnp.exp(lr) * (lr - ls), axis=-1)

  def row_stats(self, zs, zt, lam):
    return jnp.stack([_lse(zs / self.temperature), _lse(self._mixed(zs, zt, lam))], axis=1)

  def tile_grad(self, zs, zt, lam, stats):
    t = self.temperature
    return t * (jnp.exp(zs / t - stats[:, :1]) - jnp.exp(self._mixed(zs, zt, lam) - stats[:, 1:2]))

  def _target(self, zs, zt, lam, mask):  # the tile form is ForwardKL's, against r
    return online.masked(self._mixed(zs, zt, lam), mask, -jnp.inf)


class JensenShannon(_Term):
  """``T^2 JS(p_t, p_s)`` with ``m = (p_t + p_s) / 2``, symmetric and bounded by ``T^2 log 2``;
  d/dzs = ``T/2 p_s (a - sum p_s a)``, a = log p_s - log m."""

  sweeps = 2  # the mixture m needs both log-sum-exps first

  def _parts(self, zs, zt):
    ls, lt = _log_probs(zs, self.temperature), _log_probs(zt, self.temperature)
    lm = jnp.logaddexp(ls, lt) - jnp.log(2.0)
    return ls, lt, lm

  def value(self, zs, zt, lam):
    ls, lt, lm = self._parts(zs, zt)
    kl_t = jnp.sum(jnp.exp(lt) * (lt - lm), axis=-1)
    kl_s = jnp.sum(jnp.exp(ls) * (ls - lm), axis=-1)
    return self.temperature**2 * 0.5 * (kl_t + kl_s)

  def row_stats(self, zs, zt, lam):
    t = self.temperature
    ls, _, lm = self._parts(zs, zt)
    kl_s = jnp.sum(jnp.exp(ls) * (ls - lm), axis=-1)
    return jnp.stack([_lse(zs / t), _lse(zt / t), kl_s], axis=1)

  def tile_grad(self, zs, zt, lam, stats):
    t = self.temperature
    ls, lt = zs / t - stats[:, :1], zt / t - stats[:, 1:2]
    a = ls - (jnp.logaddexp(ls, lt) - jnp.log(2.0))
    return t * 0.5 * jnp.exp(ls) * (a - stats[:, 2:3])

  # Sweep 0: both log-sum-exps; sweep 1: KL(p_t || m) and KL(p_s || m) from them.
  def tile_init(self, rows):
    zero = jnp.zeros((rows,), jnp.float32)
    return online.softmax_init(rows), online.softmax_init(rows), zero, zero

  def tile_update(self, carry, zs, zt, lam, mask, sweep):
    state_s, state_t, kl_t, kl_s = carry
    xs, xt = self._scaled(zs, mask), self._scaled(zt, mask)
    if sweep == 0:
      return online.softmax_update(state_s, xs), online.softmax_update(state_t, xt), kl_t, kl_s
    ls = xs - online.logsumexp(state_s)[:, None]
    lt = xt - online.logsumexp(state_t)[:, None]
    lm = jnp.logaddexp(ls, lt) - jnp.log(2.0)
    kl_t = kl_t + jnp.sum(online.masked(jnp.exp(lt) * (lt - lm), mask, 0.0), axis=-1)
    kl_s = kl_s + jnp.sum(online.masked(jnp.exp(ls) * (ls - lm), mask, 0.0), axis=-1)
    return state_s, state_t, kl_t, kl_s

  def tile_finish(self, carry, lam):
    state_s, state_t, kl_t, kl_s = carry
    stats = jnp.stack([online.logsumexp(state_s), online.logsumexp(state_t), kl_s], axis=1)
    return self.temperature**2 * 0.5 * (kl_t + kl_s), stats


# Terms by the name a recipe uses (recipes.py); each takes the temperature.
TOKEN_TERMS = {
    "forward_kl": ForwardKL,
    "reverse_kl": ReverseKL,
    "tidal": Tidal,
    "jensen_shannon": JensenShannon,
}


def _log_probs(z: Array, temperature: float) -> Array:
  return jax.nn.log_softmax(z / temperature, axis=-1)


def make_token_term(name: str, temperature: float):
  if name not in TOKEN_TERMS:
    raise ValueError(f"Unknown token term {name!r}; use one of {', '.join(TOKEN_TERMS)}.")
  if not temperature > 0:
    raise ValueError(f"The distillation temperature must be positive, got {temperature}.")
  return TOKEN_TERMS[name](temperature=float(temperature))


# ----------------------------------------------------------------------------- row kernels


def _onehot(targets: Array, width: int, start: Array | int = 0) -> Array:
  """``[c, width]`` float32: 1 where column ``start + j`` is the row's target."""
  columns = start + jnp.arange(width, dtype=jnp.int32)
  return (columns[None, :] == targets[:, None]).astype(jnp.float32)


def _target_log_prob(z: Array, targets: Array) -> tuple[Array, Array]:
  """``(log softmax(z)[target], logsumexp(z))`` per row."""
  lse = _lse(z)
  return jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0] - lse, lse


def _width(z: Array, width: int) -> Array:
  """``z [c, V']`` cut or zero-padded to ``width`` columns."""
  if z.shape[1] >= width:
    return z[:, :width]
  return jnp.pad(z, [(0, 0), (0, width - z.shape[1])])


@dataclasses.dataclass(frozen=True)
class TargetRows:
  """``log softmax(z)[target]`` (values ``[c, 1]``) and ``argmax(z) == target`` (stats
  ``[c, 1]``); d/dz = ``onehot(target) - softmax(z)``. ``extra = targets [c]`` int32."""

  def forward(self, z, _, targets):
    logp, lse = _target_log_prob(z, targets)
    correct = jnp.argmax(z, axis=-1) == targets
    return logp[:, None], correct[:, None].astype(jnp.float32), lse[:, None]

  def vjp(self, z, _, targets, g):
    """Full-width gradient (``tile_vjp`` on all columns)."""
    return self.tile_vjp(z, None, targets, _lse(z)[:, None], g, 0)

  def tile_vjp(self, z, _, targets, stats, g, start):
    probs = jnp.exp(z - stats[:, :1])
    return g[:, :1] * (_onehot(targets, z.shape[1], start) - probs)

  # The same outputs tile by tile (``fused`` prefers this form; ``online.py``): the
  # log-sum-exp, the target's logit and the argmax, kept across pieces of columns.

  def tile_init(self, rows):
    return online.softmax_init(rows), jnp.zeros((rows,), jnp.float32), online.argmax_init(rows)

  def tile_update(self, carry, z, _, targets, start, vocab, sweep=0):
    softmax, target, argmax = carry
    tile = z.shape[1]
    columns = start + jnp.arange(tile, dtype=jnp.int32)
    if vocab is not None:  # the last tile runs past the vocabulary
      z = jnp.where(columns[None, :] < vocab, z, -jnp.inf)
    local = targets - start
    here = (local >= 0) & (local < tile)
    picked = jnp.take_along_axis(z, jnp.clip(local, 0, tile - 1)[:, None], axis=-1)[:, 0]
    return (
        online.softmax_update(softmax, z),
        target + jnp.where(here, picked, 0.0),
        online.argmax_update(argmax, z, columns),
    )

  def tile_finish(self, carry, targets):
    softmax, target, (_, best_column) = carry
    lse = online.logsumexp(softmax)
    correct = (best_column == targets).astype(jnp.float32)
    return (target - lse)[:, None], correct[:, None], lse[:, None]


@dataclasses.dataclass(frozen=True)
class PairedRows:
  """The student's cross-entropy and a token term against its paired teacher row.

  ``extra = {"targets": [c] int32, "lam": [c] float32}``. Values ``[c, 2]``:
  ``log softmax(zs)[target]`` over the student's whole vocabulary and the term on both
  logits cut to ``shared_vocab`` (the cut comes first: vocabularies may differ beyond
  it). Stats ``[c, 2]``: whether the student's argmax is the target, and whether both
  argmaxes over the shared vocabulary agree.
  """

  term: _Term
  shared_vocab: int | None = None

  def _cut(self, z):
    return z if self.shared_vocab is None else z[:, : self.shared_vocab]

  def forward(self, zs, zt, extra):
    targets, lam = extra["targets"], extra["lam"]
    logp, lse = _target_log_prob(zs, targets)
    cs, ct = self._cut(zs), self._cut(zt)
    value = self.term.value(cs, ct, lam)
    correct = jnp.argmax(zs, axis=-1) == targets
    agree = jnp.argmax(cs, axis=-1) == jnp.argmax(ct, axis=-1)
    grad_stats = jnp.concatenate([lse[:, None], self.term.row_stats(cs, ct, lam)], axis=1)
    flags = jnp.stack([correct, agree], 1).astype(jnp.float32)
    return jnp.stack([logp, value], axis=1), flags, grad_stats

  def vjp(self, zs, zt, extra, g):
    """Full-width gradient (``tile_vjp`` on all columns)."""
    return self.tile_vjp(zs, zt, extra, self.forward(zs, zt, extra)[2], g, 0)

  def tile_vjp(self, zs, zt, extra, stats, g, start):
    width = zs.shape[1]
    zt = _width(zt, width)
    ce = g[:, :1] * (_onehot(extra["targets"], width, start) - jnp.exp(zs - stats[:, :1]))
    term = g[:, 1:2] * self.term.tile_grad(zs, zt, extra["lam"], stats[:, 1:])
    if self.shared_vocab is not None:  # columns beyond the shared vocabulary: no term
      columns = start + jnp.arange(width, dtype=jnp.int32)
      term = jnp.where(columns[None, :] < self.shared_vocab, term, 0.0)
    return ce + term

  # The forward tile by tile: the cross-entropy's state (``TargetRows``), the argmax of
  # both logits over the shared vocabulary, and the term's own state (its ``sweeps``).

  @property
  def tile_form(self):  # a term without one (a new term's first version) uses the block form
    return hasattr(self.term, "tile_update")

  @property
  def tile_sweeps(self):
    return self.term.sweeps

  def tile_init(self, rows):
    argmax = online.argmax_init(rows)
    return TargetRows().tile_init(rows), argmax, argmax, self.term.tile_init(rows)

  def tile_update(self, carry, zs, zt, extra, start, vocab, sweep=0):
    ce, student_best, teacher_best, term = carry
    columns = start + jnp.arange(zs.shape[1], dtype=jnp.int32)
    limit = vocab if self.shared_vocab is None else self.shared_vocab
    mask = None if limit is None else columns[None, :] < limit
    if sweep == 0:
      ce = TargetRows().tile_update(ce, zs, None, extra["targets"], start, vocab)
      if self.shared_vocab is not None:  # else the cross-entropy's argmax is this one
        student_best = online.argmax_update(
            student_best, online.masked(zs, mask, -jnp.inf), columns
        )
      teacher_best = online.argmax_update(teacher_best, online.masked(zt, mask, -jnp.inf), columns)
    term = self.term.tile_update(term, zs, zt, extra["lam"], mask, sweep)
    return ce, student_best, teacher_best, term

  def tile_finish(self, carry, extra):
    ce, student_best, teacher_best, term = carry
    logp, correct, lse = TargetRows().tile_finish(ce, extra["targets"])
    if self.shared_vocab is None:
      student_best = ce[2]
    agree = (student_best[1] == teacher_best[1]).astype(jnp.float32)
    value, row_stats = self.term.tile_finish(term, extra["lam"])
    values = jnp.stack([logp[:, 0], value], axis=1)
    flags = jnp.concatenate([correct, agree[:, None]], axis=1)
    return values, flags, jnp.concatenate([lse, row_stats], axis=1)


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


def weighted_sum(per_row: Array, weights: Array) -> tuple[Array, Array]:
  """``(sum of weights * per_row where weights != 0, number of positive weights)``."""
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != per_row.shape:
    raise ValueError(f"weights must have shape {per_row.shape}, got {weights.shape}.")
  loss_sum = jnp.sum(jnp.where(weights != 0, weights * per_row, 0.0))
  return loss_sum, jnp.sum(weights > 0).astype(jnp.float32)


# ----------------------------------------------------------------------------- over flat rows


def target_log_probs(
    model: Projection,
    targets: Array,
    *,
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    vocab_tile: int = fused.VOCAB_TILE,
) -> tuple[Array, Array]:
  """``log softmax(h W)[target]`` and ``argmax(h W) == target`` per row: ``[N]`` float32 each.

  Differentiable in ``model.hidden`` and ``model.kernel`` (the first output).
  """
  values, stats = fused.row_statistics(
      TargetRows(),
      model,
      extra=targets.astype(jnp.int32),
      block_rows=block_rows,
      vocab_tile=vocab_tile,
  )
  return values[:, 0], stats[:, 0]


def paired_rows(
    name: str,
    student: Projection,
    teacher: Projection,
    targets: Array,
    *,
    lam: Array | None = None,
    temperature: float = 2.0,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    vocab_tile: int = fused.VOCAB_TILE,
) -> tuple[Array, Array, Array]:
  """Per-row student log-probability of ``targets``, token term ``name`` and argmax agreement.

  Args:
    name: a key of ``TOKEN_TERMS``.
    student: ``[N, E]`` hidden states and ``[E, Vs]`` kernel (differentiated).
    teacher: ``[N, Et]`` (or ``[R, Et]`` with ``teacher_rows``) and ``[Et, Vt]``.
    targets: ``[N]`` int32 clean tokens (for the cross-entropy).
    lam: ``[N]`` TIDAL lambda (``tidal`` only).
    temperature: T of the term (the value includes ``T^2``).
    shared_vocab: cut both logits to this many columns before the term.
    teacher_rows: ``[N]`` int32, the teacher row paired with each student row.
    block_rows: rows per block.
    vocab_tile: at most this many vocabulary columns per tile.

  Returns:
    ``(log_prob [N], term [N], agree [N])`` float32.
  """
  cut = resolve_shared_vocab(student.kernel.shape[-1], teacher.kernel.shape[-1], shared_vocab)
  kernel = PairedRows(make_token_term(name, temperature), cut)
  n = student.hidden.shape[0]
  extra = {
      "targets": targets.astype(jnp.int32),
      "lam": jnp.zeros((n,), jnp.float32) if lam is None else jnp.asarray(lam, jnp.float32),
  }
  values, stats = fused.row_statistics(
      kernel, student, teacher, teacher_rows, extra, block_rows=block_rows, vocab_tile=vocab_tile
  )
  return values[:, 0], values[:, 1], stats[:, 1]


def token_term(
    name: str,
    student: Projection,
    teacher: Projection,
    weights: Array,
    *,
    lam: Array | None = None,
    temperature: float = 2.0,
    shared_vocab: int | None = None,
    teacher_rows: Array | None = None,
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    vocab_tile: int = fused.VOCAB_TILE,
) -> tuple[Array, Array]:
  """``(loss_sum, count)`` of token term ``name`` over rows with ``weights [N]`` float32."""
  n = student.hidden.shape[0]
  _, per_row, _ = paired_rows(
      name,
      student,
      teacher,
      jnp.zeros((n,), jnp.int32),
      lam=lam,
      temperature=temperature,
      shared_vocab=shared_vocab,
      teacher_rows=teacher_rows,
      block_rows=block_rows,
      vocab_tile=vocab_tile,
  )
  return weighted_sum(per_row, weights)


def forward_kl(student, teacher, weights, **kwargs) -> tuple[Array, Array]:
  """Forward KL(teacher || student) at temperature T, times T^2: ``(loss_sum, count)``."""
  return token_term("forward_kl", student, teacher, weights, **kwargs)


def reverse_kl(student, teacher, weights, **kwargs) -> tuple[Array, Array]:
  """Reverse KL(student || teacher) at temperature T, times T^2: ``(loss_sum, count)``."""
  return token_term("reverse_kl", student, teacher, weights, **kwargs)


def tidal(
    student,
    teacher,
    weights,
    *,
    t: Array,
    progress: Array | float,
    options: TidalOptions = TidalOptions(),
    **kwargs,
) -> tuple[Array, Array]:
  """TIDAL (docs/method.md §3.1): ``T^2 w(t) KL(r || softmax(zs/T))`` with the constant target
  ``r = softmax(((1 - lambda) zs + lambda zt) / T)``.

  Args:
    t: ``[N]`` the diffusion time of each position's sequence.
    progress: training progress in [0, 1] (scalar).
  Returns:
    ``(loss_sum, count)``; the loss sum includes the timestep weight ``w(t)``.
  """
  lam = tidal_lambda(progress, t, options)
  weights = jnp.asarray(weights, jnp.float32) * timestep_weight(t, options.timestep_weight)
  return token_term("tidal", student, teacher, weights, lam=lam, **kwargs)
