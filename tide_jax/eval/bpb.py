"""Bits per UTF-8 byte of held-out text under the block-diffusion (BD3LM) likelihood bound.

The student's negative log-likelihood of a token sequence x is bounded by the
masked-diffusion ELBO

    -log p(x) <= int_0^1 w(t) E_{x_t ~ q(.|x, t)} [ sum_{i masked} -log p(x_i | x_t, x_<blk) ] dt

with ``w(t) = -alpha'(t) / (1 - alpha(t))``, evaluated exactly as in training: the input
is ``[x_t ; x_0]`` with the BD3LM mask, so each block is predicted from its noised self
and the clean earlier blocks. For a low-variance, reproducible number the integral is
the midpoint rule on a fixed grid of n times, and the masks are fixed too: every token
gets one uniform number ``u`` (from a seeded generator) and is masked at time t when
``u < 1 - alpha(t)``, which has the right marginal for every t. Dividing the bound (in
bits) by the number of UTF-8 bytes of the text makes students with different tokenizers
comparable.

Texts longer than ``max_len`` tokens are cut into consecutive windows that are scored
independently (each window starts without context, which only loosens the bound).
Padding at the end of the last window is neither scored nor attended to.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tide_jax.diffusion import masks, schedules


@dataclasses.dataclass(frozen=True)
class BpbData:
  """Tokenized evaluation text: windows of ``max_len`` tokens.

  Attributes:
    ids: int32 ``[n_windows, max_len]``; padding after the text holds ``pad_id``.
    valid: bool ``[n_windows, max_len]``, True on text tokens.
    uniforms: float32 ``[n_windows, max_len]`` fixed per-token mask thresholds.
    num_bytes: UTF-8 bytes of all texts.
    num_texts: texts given (empty ones included: they add no bytes and no tokens).
  """

  ids: np.ndarray
  valid: np.ndarray
  uniforms: np.ndarray
  num_bytes: int
  num_texts: int

  @property
  def num_tokens(self) -> int:
    return int(self.valid.sum())


@dataclasses.dataclass(frozen=True)
class BpbResult:
  bits_per_byte: float
  bits_per_token: float
  total_bits: float
  num_bytes: int
  num_tokens: int
  num_windows: int
  num_texts: int


def midpoint_grid(n: int) -> np.ndarray:
  """Times ``(i + 1/2) / n`` for i < n: float32 ``[n]``."""
  if n < 1:
    raise ValueError(f"The time grid needs at least one point, got {n}.")
  return ((np.arange(n) + 0.5) / n).astype(np.float32)


def prepare_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    max_len: int,
    block_size: int,
    pad_id: int | None = None,
    seed: int = 0,
) -> BpbData:
  """Tokenizes texts (no special tokens) into ``max_len`` windows with fixed mask thresholds."""
  masks.check_block_multiple(max_len, block_size)
  if isinstance(texts, str):
    raise ValueError("texts must be a list of strings, not one string; wrap it in a list.")
  if len(texts) == 0:
    raise ValueError("The text list is empty; pass at least one non-empty held-out text.")
  pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
  if pad_id is None:
    raise ValueError(
        "The tokenizer has no pad token; pass pad_id (any id works: padding is "
        "never attended to)."
    )
  windows, num_bytes = [], 0
  for text in texts:
    num_bytes += len(text.encode("utf-8"))
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    windows += [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
  if num_bytes == 0 or not windows:
    raise ValueError("All texts are empty; bits per byte needs at least one byte of text.")
  ids = np.full((len(windows), max_len), pad_id, np.int32)
  valid = np.zeros((len(windows), max_len), bool)
  for row, window in enumerate(windows):
    ids[row, : len(window)] = window
    valid[row, : len(window)] = True
  uniforms = np.random.default_rng(seed).random((len(windows), max_len)).astype(np.float32)
  return BpbData(ids, valid, uniforms, num_bytes, len(texts))


def _token_nll(model, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
  """``-log p(target)`` per position, ``[b, L]``, computing logits ``chunk`` positions at a time
  so that only a ``[b, chunk, V]`` slice of the vocabulary logits exists at once."""
  b, length, _ = hidden.shape
  n = length // chunk
  h = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
  y = targets.reshape(b, n, chunk).swapaxes(0, 1)

  def one(args):
    h_c, y_c = args
    logits = model.logits(h_c)
    picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  return jax.lax.map(one, (h, y)).swapaxes(0, 1).reshape(b, length)


def elbo_nats(
    model,
    ids: jax.Array,
    valid: jax.Array,
    uniforms: jax.Array,
    grid_t: jax.Array,
    *,
    block_size: int,
    mask_token_id: int,
    schedule: str = "linear",
    chunk: int | None = None,
) -> jax.Array:
  """The diffusion bound on ``-log p`` of each row, in nats: float32 ``[b]`` (jittable).

  Args:
    model: decoder with ``hidden_states`` / ``logits``.
    ids, valid, uniforms: ``[b, L]`` tokens, text flags and fixed mask thresholds.
    grid_t: float32 ``[n]`` times; the bound is the mean over them (midpoint rule).
    block_size: B (L must be a multiple).
    mask_token_id: the student's mask token.
    schedule: the alpha(t) schedule the student was trained with.
    chunk: positions per logits slice (defaults to B).
  """
  b, length = ids.shape
  chunk = chunk or block_size
  if length % chunk:
    raise ValueError(f"chunk {chunk} must divide the window length {length}.")
  both_valid = jnp.concatenate([valid, valid], axis=1)
  attn = jnp.asarray(masks.bd3lm_attention_mask(length, block_size))[None] & both_valid[:, None, :]
  positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), (b, 2))

  def at_time(total, t):
    masked = (uniforms < 1.0 - schedules.alpha(t, schedule)) & valid
    x_t = jnp.where(masked, jnp.asarray(mask_token_id, ids.dtype), ids)
    hidden = model.hidden_states(jnp.concatenate([x_t, ids], axis=1), positions, attn)
    nll = _token_nll(model, hidden[:, :length], ids, chunk)
    weight = schedules.loss_weight(t, schedule)
    return total + weight * jnp.sum(jnp.where(masked, nll, 0.0), axis=1), None

  total, _ = jax.lax.scan(at_time, jnp.zeros((b,), jnp.float32), grid_t)
  return total / grid_t.shape[0]


@functools.lru_cache(maxsize=16)
def _compiled_elbo(graphdef, block_size: int, mask_token_id: int, schedule: str, chunk):
  def run(state, ids, valid, uniforms, grid_t):
    return elbo_nats(
        nnx.merge(graphdef, state),
        ids,
        valid,
        uniforms,
        grid_t,
        block_size=block_size,
        mask_token_id=mask_token_id,
        schedule=schedule,
        chunk=chunk,
    )

  return jax.jit(run)


def window_nats(
    model: nnx.Module,
    data: BpbData,
    *,
    block_size: int,
    mask_token_id: int,
    grid: int | Sequence[float] = 8,
    schedule: str = "linear",
    batch_size: int = 8,
    chunk: int | None = None,
) -> np.ndarray:
  """The bound for every window, float64 ``[n_windows]`` nats, in fixed-size batches."""
  schedules.check_schedule(schedule)
  grid_t = midpoint_grid(grid) if isinstance(grid, int) else np.asarray(grid, np.float32)
  if grid_t.size == 0 or np.any((grid_t <= 0) | (grid_t > 1)):
    raise ValueError("Grid times must lie in (0, 1]; pass an int for the midpoint grid.")
  graphdef, state = nnx.split(model)
  fn = _compiled_elbo(graphdef, block_size, mask_token_id, schedule, chunk)
  n = data.ids.shape[0]
  out = []
  for start in range(0, n, batch_size):
    rows = slice(start, start + batch_size)
    fill = batch_size - data.ids[rows].shape[0]
    # A short last batch is filled with empty rows (no valid token, zero contribution)
    # so that every batch has the same shape and one compiled program.
    pad = lambda x: np.concatenate([x, np.zeros((fill,) + x.shape[1:], x.dtype)])
    nats = fn(
        state,
        pad(data.ids[rows]),
        pad(data.valid[rows]),
        pad(data.uniforms[rows]),
        jnp.asarray(grid_t),
    )
    out.append(np.asarray(nats, np.float64)[: batch_size - fill])
  return np.concatenate(out)


def bits_per_byte_from_data(
    model: nnx.Module,
    data: BpbData,
    *,
    block_size: int,
    mask_token_id: int,
    grid: int | Sequence[float] = 8,
    schedule: str = "linear",
    batch_size: int = 8,
    chunk: int | None = None,
) -> BpbResult:
  """Bits per byte of pre-tokenized text (use in a training loop: tokenize once)."""
  nats = window_nats(
      model,
      data,
      block_size=block_size,
      mask_token_id=mask_token_id,
      grid=grid,
      schedule=schedule,
      batch_size=batch_size,
      chunk=chunk,
  )
  bits = float(nats.sum() / math.log(2.0))
  return BpbResult(
      bits_per_byte=bits / data.num_bytes,
      bits_per_token=bits / data.num_tokens,
      total_bits=bits,
      num_bytes=data.num_bytes,
      num_tokens=data.num_tokens,
      num_windows=int(data.ids.shape[0]),
      num_texts=data.num_texts,
  )


def bits_per_byte(
    model: nnx.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    block_size: int,
    max_len: int,
    mask_token_id: int,
    grid: int | Sequence[float] = 8,
    schedule: str = "linear",
    batch_size: int = 8,
    seed: int = 0,
    pad_id: int | None = None,
) -> BpbResult:
  """Bits per UTF-8 byte of ``texts`` under the student's diffusion bound.

  Args:
    model: the student decoder.
    tokenizer: its tokenizer.
    texts: held-out texts.
    block_size: the student's block size B.
    max_len: window length in tokens (a multiple of B).
    mask_token_id: the student's mask token.
    grid: number of midpoint times, or explicit times in (0, 1].
    schedule: the student's alpha(t) schedule.
    batch_size: windows per forward pass.
    seed: seed of the fixed mask thresholds.
  """
  data = prepare_texts(
      tokenizer, texts, max_len=max_len, block_size=block_size, pad_id=pad_id, seed=seed
  )
  return bits_per_byte_from_data(
      model,
      data,
      block_size=block_size,
      mask_token_id=mask_token_id,
      grid=grid,
      schedule=schedule,
      batch_size=batch_size,
  )
