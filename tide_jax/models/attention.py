"""Attention implementations behind ``model.attention_impl`` (and ``teacher.attention_impl``).

Every implementation takes queries ``q [b, L, H, D]``, keys and values ``k, v [b, S, K, D]``
(H a multiple of K: grouped-query attention), a boolean mask broadcastable to
``[b, H, L, S]`` (True = may attend) and the score scale, and returns ``[b, L, H, D]`` in
q's dtype. Scores and softmax statistics are float32, and a query row with no visible key
returns zeros, as in the reference.

* ``xla``: :func:`tide_jax.models.layers.masked_gqa_attention`, dense ``[b, H, L, S]``
  scores with the mask applied to them (the reference).
* ``blocked``: block-sparse attention in plain XLA, for every backend. When the mask is
  static (a NumPy array, as the BD3LM training step passes), the ``[L, S]`` plane is cut
  into ``T x T`` tiles and tiles without a visible entry are never computed: for the
  BD3LM ``[x_t ; x_0]`` mask with block 32 at L = 512 that is 27% of the tiles. Query
  tiles with similar numbers of visible key tiles form a group, and each group is one
  batched matmul over its gathered key tiles. A traced (data-dependent) mask, such as a
  teacher's key padding, has no known empty tile: then the reference runs
  ``QUERY_CHUNK`` query rows at a time (:func:`query_chunked_attention`), so that no
  ``[b, H, L, S]`` scores exist, only one chunk's.
* ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's fused
  flash attention on NVIDIA GPUs (bfloat16 or float16 inputs). The boolean mask enters as
  an additive bias: masked tiles are computed inside the fused kernel (scores never reach
  HBM) but not skipped.
* ``splash``: Pallas splash attention on TPUs. The kernel's block mask skips fully masked
  ``128 x 128``-or-larger blocks and applies partial ones in the kernel; it needs a static
  mask shared by the whole batch. With a traced mask (the sampler's cache masks, padding
  masks) it falls back to :func:`query_chunked_attention` and logs that once.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tide_jax.models import layers
from tide_jax.models.config import check_attention_impl

# Tile sides the blocked implementation tries, largest first.
TILE_CANDIDATES = (128, 64, 32, 16, 8)
# Cost model of a tile side T: computed area x (1 + TILE_OVERHEAD_ROWS / T). Small tiles
# waste less area but run as many small matmuls; on CPU, 64 x 64 tiles beat 32 x 32 ones
# for the BD3LM mask with block 32 although they compute 15% more (benchmarks/bench_attention.py).
TILE_OVERHEAD_ROWS = 16.0
# Extra cost of one more group of query tiles, in tiles of work (a gather, two matmuls and
# a softmax more); small, since measured times hardly changed with the number of groups.
GROUP_OVERHEAD_TILES = 0.5
# Above this fraction of computed tiles the dense reference is used (no gathers to pay).
DENSE_FRACTION = 0.9
# Block sides splash attention may use (its kernel needs multiples of 128).
SPLASH_BLOCKS = (512, 256, 128)
# Query rows per chunk of the dense reference under a traced mask ('blocked', 'splash').
QUERY_CHUNK = 256


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float, impl: str = "xla"
) -> jax.Array:
  """Attention with the implementation ``impl`` (see the module docstring for each).

  Args:
    q: ``[b, L, H, D]``; k, v: ``[b, S, K, D]``.
    mask: bool ``[L, S]``, ``[b, L, S]`` or ``[b, 1|H, L, S]``; a NumPy array is static and
      lets ``blocked`` and ``splash`` skip fully masked tiles.
    scale: score multiplier (1/sqrt(D)).
    impl: one of ``tide_jax.models.config.ATTENTION_IMPLS``.

  Returns:
    ``[b, L, H, D]`` in q's dtype.
  """
  check_attention_impl(impl)
  if impl == "xla":
    return layers.masked_gqa_attention(q, k, v, mask, scale)
  if impl == "blocked":
    return blocked_attention(q, k, v, mask, scale)
  if impl == "cudnn":
    _require_backend("cudnn", "gpu", "an NVIDIA GPU")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(
          f"attention_impl='cudnn' runs in bfloat16 or float16 but the model computes in "
          f"{q.dtype}; set the model's dtype to bfloat16 or use 'blocked' or 'xla'."
      )
    return fused_attention(q, k, v, mask, scale, implementation="cudnn")
  _require_backend("splash", "tpu", "a TPU")
  static = static_mask(mask)
  if static is None or static.shape[0] != 1 or static.shape[1] != 1:
    _log_once(
        "attention_impl='splash' needs a static mask shared by the batch and the heads; "
        "this call has a data-dependent mask, so it uses the 'xla' reference, "
        f"{QUERY_CHUNK} query rows at a time."
    )
    return query_chunked_attention(q, k, v, mask, scale)
  return splash_attention(q, k, v, static, scale)


def _require_backend(impl: str, backend: str, device: str) -> None:
  if jax.default_backend() != backend:
    raise ValueError(
        f"attention_impl={impl!r} runs only on {device}, but this process's JAX backend is "
        f"{jax.default_backend()!r}; set attention_impl to 'blocked' or 'xla'."
    )


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.warning(message)


def static_mask(mask) -> np.ndarray | None:
  """The mask as a NumPy ``[b|1, 1|H, L, S]`` array when it is known at trace time, else None."""
  if isinstance(mask, jax.core.Tracer):
    return None
  return np.asarray(layers.as_4d_mask(np.asarray(mask, dtype=bool)))


# --------------------------------------------------------------------------- blocked


@dataclasses.dataclass(frozen=True)
class RowGroup:
  """Query tiles computed together against the same number of gathered key tiles.

  Attributes:
    q_tiles: int ``[r]`` query tile indices.
    k_tiles: int ``[r, n]`` key tile indices per query tile; slots beyond a row's own
      count repeat one of its tiles and are fully masked.
    mask: bool ``[mb, r, mK, mG, T, n, T]`` (mK x mG = 1 or the heads) or None when every
      entry of the gathered tiles is visible.
  """

  q_tiles: np.ndarray
  k_tiles: np.ndarray
  mask: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Which tiles the blocked implementation computes for one static mask.

  Attributes:
    tile: T, the side of a tile.
    groups: the row groups.
    empty_q_tiles: query tiles with no visible key at all (their output is zero).
    restore: positions of the original query tiles in the concatenation of the groups'
      outputs and the empty tiles (a permutation of ``range(L // T)``).
    computed_fraction: computed tile area / ``L * S`` (gathered padding slots included).
  """

  tile: int
  groups: tuple[RowGroup, ...]
  empty_q_tiles: np.ndarray
  restore: np.ndarray
  computed_fraction: float


def _group_rows(counts: np.ndarray) -> list[np.ndarray]:
  """Splits the query tiles with a visible key into groups (minimum padded work).

  Rows sorted by descending count are cut into contiguous runs; a run costs
  ``len(run) * max count + GROUP_OVERHEAD_TILES``, minimised by dynamic programming.
  """
  order = np.argsort(-counts, kind="stable")
  order = order[counts[order] > 0]
  n = len(order)
  best = np.full(n + 1, np.inf)
  best[0] = 0.0
  cut = np.zeros(n + 1, np.int64)
  for end in range(1, n + 1):
    for start in range(end):
      cost = best[start] + (end - start) * counts[order[start]] + GROUP_OVERHEAD_TILES
      if cost < best[end]:
        best[end], cut[end] = cost, start
  runs, end = [], n
  while end > 0:
    runs.append(order[cut[end] : end])
    end = cut[end]
  return runs[::-1]


def _tile_layout(visible: np.ndarray, tile: int):
  """(active tiles ``[nq, nk]`` bool, row groups, padded area in tiles) for one tile side."""
  length, keys = visible.shape
  active = visible.reshape(length // tile, tile, keys // tile, tile).any(axis=(1, 3))
  counts = active.sum(axis=1)
  runs = _group_rows(counts)
  area = sum(len(run) * int(counts[run].max()) for run in runs)
  return active, runs, area


_PLANS: dict[tuple, BlockPlan | None] = {}


def block_plan(mask4: np.ndarray, num_kv_heads: int) -> BlockPlan | None:
  """The tiles to compute for a static mask ``[mb, mh, L, S]``; None when dense is as cheap.

  The tile side is the one of ``TILE_CANDIDATES`` dividing L and S with the lowest
  modelled cost (see ``TILE_OVERHEAD_ROWS``); None also when no candidate divides both.
  """
  key = (mask4.shape, num_kv_heads, hashlib.sha1(np.packbits(mask4).tobytes()).hexdigest())
  if key not in _PLANS:
    _PLANS[key] = _build_plan(mask4, num_kv_heads)
  return _PLANS[key]


def _build_plan(mask4: np.ndarray, num_kv_heads: int) -> BlockPlan | None:
  mb, mh, length, keys = mask4.shape
  visible = mask4.any(axis=(0, 1))
  layouts = {
      t: _tile_layout(visible, t) for t in TILE_CANDIDATES if length % t == 0 and keys % t == 0
  }
  if not layouts:
    return None
  tile = min(layouts, key=lambda t: layouts[t][2] * t * t * (1.0 + TILE_OVERHEAD_ROWS / t))
  active, runs, area = layouts[tile]
  fraction = area * tile * tile / (length * keys)
  if fraction > DENSE_FRACTION:
    return None
  nq, nk = active.shape
  tiles = mask4.reshape(mb, mh, nq, tile, nk, tile)
  head_shape = (1, 1) if mh == 1 else (num_kv_heads, mh // num_kv_heads)
  groups = []
  for run in runs:
    lists = [np.flatnonzero(active[row]) for row in run]
    width = max(len(cols) for cols in lists)
    k_tiles = np.stack([np.pad(cols, (0, width - len(cols)), mode="edge") for cols in lists])
    # Advanced indices on axes 2 and 4 move to the front: [r, n, mb, mh, T, T].
    sub = tiles[:, :, run[:, None], :, k_tiles, :]
    slot_used = np.arange(width)[None, :] < np.array([len(c) for c in lists])[:, None]
    sub = sub & slot_used[:, :, None, None, None, None]
    sub = sub.transpose(2, 0, 3, 4, 1, 5)  # [mb, r, mh, T, n, T]
    sub = sub.reshape(mb, len(run), *head_shape, tile, width, tile)
    groups.append(RowGroup(run, k_tiles, None if sub.all() else sub))
  empty = np.flatnonzero(~active.any(axis=1))
  placed = np.concatenate([run for run in runs] + [empty])
  restore = np.argsort(placed, kind="stable")
  return BlockPlan(tile, tuple(groups), empty, restore, fraction)


def _take_tiles(x: jax.Array, index: np.ndarray) -> jax.Array:
  """``x[:, index]`` along the tile axis; a contiguous ascending run is a plain slice."""
  index = np.asarray(index).reshape(-1)
  if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
    return jax.lax.slice_in_dim(x, int(index[0]), int(index[0]) + index.size, axis=1)
  return jnp.take(x, jnp.asarray(index, jnp.int32), axis=1, mode="clip")


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float) -> jax.Array:
  """Block-sparse attention: only the tiles of a static mask with a visible entry.

  Shapes as in :func:`attend`. Falls back to the dense reference when the mask is traced,
  when no tile side divides L and S, or when almost every tile is visible.
  """
  static = static_mask(mask)
  if static is None:
    return query_chunked_attention(q, k, v, mask, scale)
  plan = block_plan(static, k.shape[2])
  if plan is None:
    return layers.masked_gqa_attention(q, k, v, mask, scale)
  b, length, heads, dim = q.shape
  kv_heads, keys, t = k.shape[2], k.shape[1], plan.tile
  groups = heads // kv_heads
  q_tiles = q.reshape(b, length // t, t, kv_heads, groups, dim)
  k_tiles = k.reshape(b, keys // t, t, kv_heads, dim)
  v_tiles = v.reshape(b, keys // t, t, kv_heads, dim)
  outputs = []
  for group in plan.groups:
    rows, width = group.k_tiles.shape
    qg = _take_tiles(q_tiles, group.q_tiles)  # [b, r, T, K, G, D]
    kg = _take_tiles(k_tiles, group.k_tiles).reshape(b, rows, width, t, kv_heads, dim)
    vg = _take_tiles(v_tiles, group.k_tiles).reshape(b, rows, width, t, kv_heads, dim)
    scores = jnp.einsum("brtkgd,brnskd->brkgtns", qg, kg, preferred_element_type=jnp.float32)
    scores = scores * scale
    if group.mask is not None:
      scores = jnp.where(group.mask, scores, layers.NEG_INF)
    probs = jax.nn.softmax(scores.reshape(*scores.shape[:-2], width * t), axis=-1)
    probs = probs.reshape(scores.shape)
    if group.mask is not None:
      probs = jnp.where(group.mask, probs, 0.0)
    outputs.append(
        jnp.einsum(
            "brkgtns,brnskd->brtkgd", probs.astype(v.dtype), vg, preferred_element_type=jnp.float32
        )
    )
  if plan.empty_q_tiles.size:
    outputs.append(jnp.zeros((b, plan.empty_q_tiles.size, t, kv_heads, groups, dim), jnp.float32))
  out = _take_tiles(jnp.concatenate(outputs, axis=1), plan.restore)
  return out.reshape(b, length, heads, dim).astype(q.dtype)


def query_chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float, chunk: int = QUERY_CHUNK
) -> jax.Array:
  """The dense reference, ``chunk`` query rows at a time.

  Each chunk's scores and probabilities (float32 ``[b, H, chunk, S]``) are all that exist
  at once, in the forward pass and, the chunk being rematerialised, in the backward pass:
  the memory of a traced mask's attention (a teacher's key padding) no longer grows as
  ``L x S``. The result is the reference's (same operations, row by row). Shapes as in
  :func:`attend`; sequences of at most ``chunk`` rows, or not a multiple of it, run whole.
  """
  b, length, heads, dim = q.shape
  if length <= chunk or length % chunk:
    return layers.masked_gqa_attention(q, k, v, mask, scale)
  count = length // chunk
  mask4 = jnp.asarray(layers.as_4d_mask(mask))
  mask4 = jnp.broadcast_to(mask4, mask4.shape[:2] + (length, k.shape[1]))
  q_chunks = jnp.moveaxis(q.reshape(b, count, chunk, heads, dim), 1, 0)
  mask_chunks = jnp.moveaxis(mask4.reshape(*mask4.shape[:2], count, chunk, -1), 2, 0)

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, mask_chunk = args
    return layers.masked_gqa_attention(q_chunk, k, v, mask_chunk, scale)

  out = jax.lax.map(one_chunk, (q_chunks, mask_chunks))  # [count, b, chunk, H, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, length, heads, dim)


# --------------------------------------------------------------------------- fused kernels


def _zero_invisible_rows(out: jax.Array, mask4) -> jax.Array:
  """Zeros the query rows of ``out [b, L, H, D]`` that see no key, as the reference does."""
  seen = jnp.any(jnp.asarray(mask4), axis=-1)  # [mb, mh, L]
  return jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], out, jnp.zeros((), out.dtype))


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    scale: float,
    implementation: str = "cudnn",
) -> jax.Array:
  """``jax.nn.dot_product_attention`` with a boolean mask (grouped kv heads handled by it).

  ``implementation="cudnn"`` is the fused GPU kernel; ``"xla"`` runs the same call on any
  backend (the tests use it to check this wrapper's layout and mask handling on CPU).
  """
  mask4 = layers.as_4d_mask(jnp.asarray(mask, bool))
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask4, scale=scale, implementation=implementation
  )
  return _zero_invisible_rows(out, mask4).astype(q.dtype)


def _splash_block(length: int) -> int:
  for size in SPLASH_BLOCKS:
    if length % size == 0:
      return size
  raise ValueError(
      f"attention_impl='splash' needs sequence lengths that are multiples of 128, got "
      f"{length}; pad the sequences to a multiple of 128 or use 'blocked'."
  )


_SPLASH_KERNELS: dict[tuple, object] = {}


def _splash_kernel(mask2: np.ndarray, heads: int, interpret: bool):
  """The splash kernel for a static ``[L, S]`` mask, built once per mask and head count."""
  # Imported here: Pallas TPU kernels are only needed when splash attention is chosen.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  key = (mask2.shape, heads, interpret, hashlib.sha1(np.packbits(mask2).tobytes()).hexdigest())
  if key not in _SPLASH_KERNELS:
    bq, bkv = _splash_block(mask2.shape[0]), _splash_block(mask2.shape[1])
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    heads_mask = splash.MultiHeadMask([splash.NumpyMask(mask2) for _ in range(heads)])
    # Concrete mask-info arrays (not tracers of the current trace), so the kernel can be
    # cached and reused by later traces.
    with jax.ensure_compile_time_eval():
      _SPLASH_KERNELS[key] = splash.make_splash_mha_single_device(
          heads_mask, block_sizes=sizes, interpret=interpret
      )
  return _SPLASH_KERNELS[key]


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: np.ndarray,
    scale: float,
    *,
    interpret: bool = False,
) -> jax.Array:
  """Splash attention for a static mask shared by the batch: ``[L, S]`` or ``[1, 1, L, S]``.

  The kernel works per example on ``[heads, length, D]`` (grouped kv heads natively), so
  the batch is vmapped. ``interpret=True`` runs the Pallas kernel in interpret mode on any
  backend (slow; the tests use it on CPU).
  """
  mask4 = np.asarray(layers.as_4d_mask(np.asarray(mask, bool)))
  if mask4.shape[:2] != (1, 1):
    raise ValueError(
        f"splash attention needs one [L, S] mask for the whole batch and all heads, got "
        f"a mask of shape {mask4.shape}; use 'blocked' for per-example masks."
    )
  mask2 = mask4[0, 0]
  kernel = _splash_kernel(mask2, q.shape[2], interpret)
  # The kernel does not scale the scores; scaling q first is the same product.
  q_heads = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [b, H, L, D]
  k_heads, v_heads = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, K, S, D]
  out = jax.vmap(kernel)(q_heads, k_heads, v_heads)  # [b, H, L, D]
  out = jnp.swapaxes(out, 1, 2)
  return _zero_invisible_rows(out, mask4).astype(q.dtype)
