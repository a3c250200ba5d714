"""Bits per UTF-8 byte of held-out text under a masked-diffusion likelihood bound.

A model's negative log-likelihood of a token sequence x is bounded by the masked-diffusion
ELBO of its objective (``objective.kind``):

    bd3lm:  -log p(x) <= int_0^1 w(t) E_{x_t ~ q(.|x, t)} [ sum_{i masked} -log p(x_i | x_t, x_<blk) ] dt
    mdlm:   -log p(x) <= int_0^1 w(t) E_{x_t ~ q(.|x, t)} [ sum_{i masked} -log p(x_i | x_t) ] dt

with ``w(t) = -alpha'(t) / (1 - alpha(t))``, evaluated exactly as in training through the
one denoiser forward (``diffusion.forward.denoiser_hidden``): for the BD3LM student the
input is ``[x_t ; x_0]`` with the BD3LM mask, so each block is predicted from its noised
self and the clean earlier blocks; for a bidirectional (MDLM) model, such as a teacher
trained here, ``x_t`` alone with attention over the whole window. For a low-variance, reproducible number the integral is
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

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tide_jax.data import records, tokenizers
from tide_jax.diffusion import forward, masks, noising, schedules
from tide_jax.distill import fused, terms
from tide_jax.parallel import batch_map, sharding


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


def _masked_nll_per_row(rows, shared, split, *, block_rows: int) -> jax.Array:
  """``sum over masked positions of -log p(target)`` per row of this device: ``[b]``."""
  hidden = rows["hidden"]
  b, length, width = hidden.shape

  def stats(r, whole):
    return fused.row_statistics(
        terms.TargetRows(),
        fused.Projection(r["hidden"], whole["kernel"]),
        extra=r["targets"],
        block_rows=block_rows,
    )

  values, _ = split.rowwise(
      stats,
      {"hidden": hidden.reshape(-1, width), "targets": rows["targets"].reshape(-1)},
      {"kernel": split.varying(shared["kernel"])},
  )
  logp = values[:, 0].reshape(b, length)
  return -jnp.sum(jnp.where(rows["masked"], logp, 0.0), axis=1)


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
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    kind: str = "bd3lm",
) -> jax.Array:
  """The diffusion bound on ``-log p`` of each row, in nats: float32 ``[b]`` (jittable).

  Under a mesh set with ``jax.set_mesh`` each device scores its own rows.

  Args:
    model: decoder with ``hidden_states`` / ``output_kernel``.
    ids, valid, uniforms: ``[b, L]`` tokens, text flags and fixed mask thresholds.
    grid_t: float32 ``[n]`` times; the bound is the mean over them (midpoint rule).
    block_size: B (L must be a multiple).
    mask_token_id: the model's mask token.
    schedule: the alpha(t) schedule the model was trained with.
    block_rows: rows per block of the fused vocabulary statistics.
    kind: the model's objective, ``bd3lm`` (block diffusion) or ``mdlm`` (bidirectional).
  """
  kernel = model.output_kernel()
  targets = ids.astype(jnp.int32)

  def at_time(total, t):
    masked = (uniforms < 1.0 - schedules.alpha(t, schedule)) & valid
    x_t = noising.apply_mask(ids, masked, mask_token_id)
    hidden = forward.denoiser_hidden(model, ids, x_t, kind=kind, block_size=block_size, valid=valid)
    nll = batch_map.batch_outputs(
        functools.partial(_masked_nll_per_row, block_rows=block_rows),
        {"hidden": hidden, "targets": targets, "masked": masked},
        {"kernel": kernel},
    )
    return total + schedules.loss_weight(t, schedule) * nll, None

  total, _ = jax.lax.scan(at_time, jnp.zeros(ids.shape[:1], jnp.float32), grid_t)
  return total / grid_t.shape[0]


@functools.lru_cache(maxsize=16)
def _compiled_elbo(
    graphdef, block_size: int, mask_token_id: int, schedule: str, block_rows: int, kind: str
):
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
        block_rows=block_rows,
        kind=kind,
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
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    mesh: Mesh | None = None,
    kind: str = "bd3lm",
) -> np.ndarray:
  """The bound for every window, float64 ``[n_windows]`` nats, in fixed-size batches.

  With ``mesh``, every batch is split over the mesh's batch axes and each device scores
  its own windows (``batch_size`` is rounded up to a multiple of the batch shards).
  ``kind`` is the model's objective (``bd3lm`` or ``mdlm``).
  """
  schedules.check_schedule(schedule)
  forward.check_objective(kind)
  grid_t = midpoint_grid(grid) if isinstance(grid, int) else np.asarray(grid, np.float32)
  if grid_t.size == 0 or np.any((grid_t <= 0) | (grid_t > 1)):
    raise ValueError("Grid times must lie in (0, 1]; pass an int for the midpoint grid.")
  graphdef, state = nnx.split(model)
  fn = _compiled_elbo(graphdef, block_size, mask_token_id, schedule, int(block_rows), kind)
  place = lambda x: x
  if mesh is not None:
    shards = sharding.batch_shard_count(mesh, sharding.STUDENT_RULES)
    batch_size = -(-batch_size // shards) * shards
    row_sharding = sharding.batch_sharding(mesh, sharding.STUDENT_RULES, 2, batch_size)
    place = lambda x: jax.device_put(x, row_sharding)
  n = data.ids.shape[0]
  out = []
  for start in range(0, n, batch_size):
    rows = slice(start, start + batch_size)
    fill = batch_size - data.ids[rows].shape[0]
    # A short last batch is filled with empty rows (no valid token, zero contribution)
    # so that every batch has the same shape and one compiled program.
    pad = lambda x: place(np.concatenate([x, np.zeros((fill,) + x.shape[1:], x.dtype)]))
    with contextlib.ExitStack() as stack:
      if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
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
    block_rows: int = fused.DEFAULT_BLOCK_ROWS,
    mesh: Mesh | None = None,
    kind: str = "bd3lm",
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
      block_rows=block_rows,
      mesh=mesh,
      kind=kind,
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
    kind: str = "bd3lm",
) -> BpbResult:
  """Bits per UTF-8 byte of ``texts`` under a model's diffusion bound.

  Args:
    model: the decoder (the BD3LM student, or a bidirectional model with ``kind="mdlm"``).
    tokenizer: its tokenizer.
    texts: held-out texts.
    block_size: the student's block size B.
    max_len: window length in tokens (a multiple of B).
    mask_token_id: the student's mask token.
    grid: number of midpoint times, or explicit times in (0, 1].
    schedule: the student's alpha(t) schedule.
    batch_size: windows per forward pass.
    seed: seed of the fixed mask thresholds.
    kind: the model's objective, ``bd3lm`` or ``mdlm``.
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
      kind=kind,
  )


def student_tokenizer(config):
  """The student's tokenizer (``data.tokenizer`` with ``data.chat_template``)."""
  return tokenizers.get_tokenizer(config.data.tokenizer, config.data.chat_template or None)


def held_out_texts(config, limit: int) -> list[str]:
  """Texts for bits per byte: ``eval.bpb_files`` or the data's eval files (plain text)."""
  patterns = list(config.eval.bpb_files or config.data.eval_files or [])
  if not patterns:
    raise ValueError("No held-out texts: set eval.bpb_files or data.eval_files.")
  texts = []
  for path in records.expand_files(patterns):
    for item in records.read_text_file(path):
      if isinstance(item, records.TextRecord):
        texts.append(item.text)
    if len(texts) >= limit:
      break
  return texts[:limit]


def make_periodic_bpb(config, mesh: Mesh | None = None):
  """A ``model -> bits per byte`` callable for the periodic eval, or None when disabled.

  The held-out texts are tokenized once; each call evaluates the fixed t grid and the
  fixed masks, so successive values are comparable (``eval.bpb_during_training``). The
  bound is the one of the model's ``objective.kind``.
  """
  ev = config.eval
  if not ev.bpb_during_training:
    return None
  texts = held_out_texts(config, int(ev.bpb_max_texts))
  data = prepare_texts(
      student_tokenizer(config),
      texts,
      max_len=int(config.data.max_len),
      block_size=int(config.block_size),
  )

  def evaluate(model) -> float:
    return bits_per_byte_from_data(
        model,
        data,
        block_size=int(config.block_size),
        mask_token_id=int(config.objective.mask_token_id),
        grid=int(ev.bpb_grid),
        schedule=config.objective.schedule,
        block_rows=int(config.objective.row_block),
        mesh=mesh,
        kind=config.objective.kind,
    ).bits_per_byte

  return evaluate
