"""Mixture-of-experts block: sigmoid router with group-limited top-k, sorted expert dispatch.

Routing (the DeepSeek-V3 / LLaDA2 rule, computed in float32):
  scores  = sigmoid(x @ router)                                   [T, E]
  biased  = scores + expert_bias        (the bias only chooses, never weights)
  group score = sum of the two best biased scores in each of n_group groups
  keep the topk_group best groups; choose the top_k best biased scores among their experts
  weights = chosen *unbiased* scores, normalised to sum 1 (norm_topk_prob and top_k > 1),
            times routed_scaling_factor.

Ties: ``jax.lax.top_k`` prefers the lowest index among bitwise-equal values, for groups and
for experts. PyTorch's ``topk`` documents no tie order; on CPU (torch 2.13) it was observed
to take the higher index, so on an exact tie the two can choose different (tied) experts.
Exact float32 ties need identical router rows and biases, which trained weights do not have;
tests/test_teachers_moe.py pins down both behaviours with duplicated experts.

Dispatch: the ``T * top_k`` (token, expert) pairs are sorted by expert and each row is
multiplied only by its chosen experts' stacked weights ``[E, ...]``, with no Python loop over
experts and no capacity limit (nothing is dropped). Two implementations of that:
:func:`sparse_experts` ("ragged": three ``jax.lax.ragged_dot`` calls, a native grouped
matmul on TPU) and :func:`tiled_experts` ("tiled": a loop over expert-pure row tiles, fast
where XLA expands ``ragged_dot`` into all-expert work, i.e. CPU and GPU); "auto" picks by
backend. :func:`dense_experts` runs every expert on every token and is the reference the
tests and the benchmark compare against.

On a mesh (:func:`expert_parallel`, a ``shard_map``) every device routes only the tokens it
holds and dispatches them itself. With an ``expert`` axis of size n > 1 each device holds
E / n experts, and the (token, expert) pairs travel to the expert's shard by ``all_to_all``
(:func:`exchange_experts`) in rounds of a static capacity per (device, shard), 1.25x an even
share, repeated until every pair is sent: a skewed load costs rounds, never tokens. The
buffers are 1.25x the device's own ``T_local * k`` rows, so they fall as 1/devices at a
fixed global batch. The alternative, all-gathering the tokens of the expert group
(:func:`expert_parallel_all_gather`, this module's former scheme, kept as the baseline),
sizes its buffers for every pair of the group (the global batch on a mesh of ``expert``
alone) and picks the top-k over the global router logits. At LLaDA2.0-mini's shapes with
pipeline A's 131,072 teacher tokens per step, one MoE layer per device (CPU compiler,
docs/benchmarks/teachers.md): temporaries 26 GiB (all-gather) vs 14 GiB at expert=4 and
26 vs 6.8 GiB at expert=8; collective bytes at bf16 size (the CPU compiler carries bf16
collectives in float32; see there) 1.8 vs 2.5 GiB at expert=4 and 1.8 vs 1.25 GiB at
expert=8. Each token travels k = 8 times (once per chosen expert) where the
all-gather sends it to all n - 1 peers, hence more traffic on small expert axes and less on
large ones, for memory that no longer grows with the expert axis; the memory is what bounds
pipeline A's batch. Sending a token once per destination shard instead of once per expert
would cut the traffic to at most ``topk_group`` rows per token, at the price of a second
capacity (received pairs); not done.

Shapes: T tokens, H hidden, E experts, I expert width, k experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from tide_jax.models import layers


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Routing hyper-parameters (all read from the checkpoint's config.json)."""

  num_experts: int
  top_k: int
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  norm_topk_prob: bool = True

  def __post_init__(self):
    if self.num_experts % self.n_group:
      raise ValueError(
          f"num_experts {self.num_experts} is not divisible by n_group "
          f"{self.n_group}; fix n_group in config.json."
      )
    if not 1 <= self.topk_group <= self.n_group:
      raise ValueError(f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}].")
    per_group = self.num_experts // self.n_group
    if not 1 <= self.top_k <= self.topk_group * per_group:
      raise ValueError(
          f"num_experts_per_tok {self.top_k} must be in [1, "
          f"{self.topk_group * per_group}] (experts in the kept groups)."
      )


def route(
    router_logits: jax.Array, expert_bias: jax.Array | None, cfg: RouterConfig
) -> tuple[jax.Array, jax.Array]:
  """Chooses experts and their weights.

  Args:
    router_logits: float32 ``[T, E]``.
    expert_bias: float32 ``[E]`` added for choosing only, or None.
    cfg: routing settings.

  Returns:
    ``(weights [T, k] float32, experts [T, k] int32)``; experts in decreasing biased score.
  """
  t, e = router_logits.shape
  scores = jax.nn.sigmoid(router_logits.astype(jnp.float32))
  biased = scores if expert_bias is None else scores + expert_bias.astype(jnp.float32)
  per_group = e // cfg.n_group
  grouped = biased.reshape(t, cfg.n_group, per_group)
  best_two = jax.lax.top_k(grouped, min(2, per_group))[0]
  group_scores = jnp.sum(best_two, axis=-1)  # [T, G]
  _, kept_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
  group_kept = jnp.any(kept_groups[..., None] == jnp.arange(cfg.n_group), axis=-2)
  expert_kept = jnp.repeat(group_kept, per_group, axis=-1)  # [T, E]
  candidates = jnp.where(expert_kept, biased, -jnp.inf)
  _, experts = jax.lax.top_k(candidates, cfg.top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if cfg.norm_topk_prob and cfg.top_k > 1:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


def sparse_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
) -> jax.Array:
  """Weighted sum of the chosen experts' SwiGLU outputs by sorted ragged matmuls.

  Args:
    x: ``[T, H]`` in the compute dtype.
    weights, experts: ``[T, k]`` from :func:`route`. An id equal to E (one past the last
      expert) is skipped; its weight must be 0 (expert parallelism marks the experts held
      by other devices this way).
    gate, up: ``[E, H, I]``; down: ``[E, I, H]``.

  Returns:
    ``[T, H]`` in x's dtype (the k contributions are summed in float32).
  """
  t, k = experts.shape
  num_experts = gate.shape[0]
  flat_experts = experts.reshape(-1)
  order = jnp.argsort(flat_experts, stable=True)  # [T*k] sorted by expert
  token_of = order // k
  rows = jnp.take(x, token_of, axis=0)
  # Ids equal to num_experts (experts held elsewhere) sort last and fall outside every group.
  group_sizes = jnp.bincount(flat_experts, length=num_experts + 1)[:num_experts]
  group_sizes = group_sizes.astype(jnp.int32)
  dtype = x.dtype
  g = jax.lax.ragged_dot(rows, gate.astype(dtype), group_sizes)
  u = jax.lax.ragged_dot(rows, up.astype(dtype), group_sizes)
  h = (jax.nn.silu(g) * u).astype(dtype)
  y = jax.lax.ragged_dot(
      h, down.astype(dtype), group_sizes, preferred_element_type=jnp.float32
  )  # [T*k, H]
  y = y * jnp.take(weights.reshape(-1), order)[:, None]
  # Undo the sort with the inverse permutation, then sum each token's k rows in a fixed order.
  unsorted = jnp.take(y, jnp.argsort(order), axis=0).reshape(t, k, -1)
  return jnp.sum(unsorted, axis=1).astype(dtype)


def dense_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
) -> jax.Array:
  """Reference: runs all E experts on every token and weights them by the routing.

  The routing weights scale the ``[T, E, I]`` activations before the down projection, so
  the largest intermediate is ``[T, E, I]`` (never ``[T, E, H]``).
  """
  t = x.shape[0]
  combine = jnp.zeros((t, gate.shape[0]), jnp.float32)
  combine = combine.at[jnp.arange(t)[:, None], experts].add(weights)  # [T, E]
  dtype = x.dtype
  g = jnp.einsum("th,ehi->tei", x, gate.astype(dtype))
  u = jnp.einsum("th,ehi->tei", x, up.astype(dtype))
  h = (jax.nn.silu(g) * u * combine[:, :, None]).astype(dtype)
  return jnp.einsum(
      "tei,eih->th", h, down.astype(dtype), preferred_element_type=jnp.float32
  ).astype(dtype)


def tiled_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    tile: int = 128,
) -> jax.Array:
  """Same result (and arguments) as :func:`sparse_experts`, as a loop over row tiles of
  one expert each.

  The (token, expert) pairs are sorted by expert and every expert's run is padded to a
  multiple of ``tile`` rows, so each tile belongs to one expert; a ``fori_loop`` over the
  tiles actually used (a traced count: at most ``T*k/tile + E``) multiplies each tile by
  its expert's weights. Work is the routed work plus at most ``tile - 1`` padding rows
  per expert, and memory is one ``[rows, H]`` buffer. Backends without a native grouped
  matmul (XLA on CPU and GPU expand ``ragged_dot`` into work over every expert) run this
  many times faster; see docs/benchmarks/teachers.md.
  """
  t, k = experts.shape
  num_experts, hidden = gate.shape[0], x.shape[1]
  pairs = t * k
  flat_experts = experts.reshape(-1)
  order = jnp.argsort(flat_experts, stable=True)
  sorted_experts = flat_experts[order]
  sizes = jnp.bincount(flat_experts, length=num_experts + 1)[:num_experts]
  padded = (sizes + tile - 1) // tile * tile
  padded_end = jnp.cumsum(padded)
  # Static bound on the padded rows, plus one spare tile that is never computed: skipped
  # pairs (id == E) point into it and read back zeros.
  num_rows = -(-(pairs + num_experts * (tile - 1)) // tile) * tile + tile
  # Row of each sorted pair in the padded layout: its expert's padded start + rank inside.
  owned = sorted_experts < num_experts
  safe = jnp.minimum(sorted_experts, num_experts - 1)
  rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[safe]
  dest = jnp.where(owned, (padded_end - padded)[safe] + rank, num_rows - 1)
  rows = jnp.zeros((num_rows, hidden), x.dtype).at[dest].set(jnp.take(x, order // k, axis=0))
  tile_starts = jnp.arange(num_rows // tile) * tile
  tile_expert = jnp.minimum(
      jnp.searchsorted(padded_end, tile_starts, side="right"), num_experts - 1
  )
  dtype = x.dtype

  def one_tile(i, out):
    e = tile_expert[i]
    r = jax.lax.dynamic_slice_in_dim(rows, i * tile, tile)
    h = (jax.nn.silu(r @ gate[e].astype(dtype)) * (r @ up[e].astype(dtype))).astype(dtype)
    y = jnp.dot(h, down[e].astype(dtype), preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(out, y, i * tile, 0)

  used_tiles = padded_end[-1] // tile
  out = jax.lax.fori_loop(0, used_tiles, one_tile, jnp.zeros((num_rows, hidden), jnp.float32))
  y = jnp.take(out, dest, axis=0) * jnp.take(weights.reshape(-1), order)[:, None]
  unsorted = jnp.take(y, jnp.argsort(order), axis=0).reshape(t, k, -1)
  return jnp.sum(unsorted, axis=1).astype(dtype)


DISPATCH = {"ragged": sparse_experts, "tiled": tiled_experts, "dense": dense_experts}


# Per-round capacity of the token exchange, as a multiple of an even spread of a device's
# (token, expert) pairs over the expert shards. Pairs past it wait for another round; none
# is dropped. 1.25 keeps the buffers small; a load skewed further costs extra rounds.
DEFAULT_CAPACITY_FACTOR = 1.25


def exchange_capacity(
    tokens: int, top_k: int, shards: int, experts_per_shard: int, capacity_factor: float
) -> int:
  """Rows one device sends to one expert shard per exchange round.

  ``capacity_factor`` times the even share ``tokens * top_k / shards``, never more than the
  most a shard can be sent (each token sends at most ``min(top_k, experts_per_shard)``
  rows to one shard, which then always fits in a single round).
  """
  if capacity_factor <= 0:
    raise ValueError(f"MoE capacity_factor must be positive, got {capacity_factor}.")
  even = math.ceil(capacity_factor * tokens * top_k / shards)
  return max(1, min(even, tokens * min(top_k, experts_per_shard)))


def route_tokens(
    x: jax.Array, router: jax.Array, expert_bias: jax.Array | None, cfg: RouterConfig
) -> tuple[jax.Array, jax.Array]:
  """:func:`route` on the float32 router logits of tokens ``x [T, H]`` (router ``[H, E]``)."""
  logits = jnp.dot(x.astype(jnp.float32), router, precision=jax.lax.Precision.HIGHEST)
  return route(logits, expert_bias, cfg)


def exchange_experts(
    dispatch: str,
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    shards: int,
    capacity: int,
    sync_axes: tuple[str, ...],
) -> jax.Array:
  """One device's share of expert parallelism; call inside ``shard_map``.

  The device's ``T * k`` (token, expert) pairs are sorted by destination shard (expert
  ``e`` lives on shard ``e // (E / shards)`` of the mesh axis ``expert``). Each round sends
  up to ``capacity`` pairs to every shard (``all_to_all`` of ``[shards, capacity, H]`` rows
  and their local expert ids), every shard runs its experts on what it received with
  ``dispatch`` (empty slots carry the skip id), and a second ``all_to_all`` returns the
  outputs to their pairs. Rounds repeat until the fullest (device, shard) run is sent:
  ``ceil(max load / capacity)``, agreed over ``sync_axes`` with ``pmax`` so every device
  runs the same loop; one round when the load is within the capacity.

  Args:
    dispatch: "ragged" or "tiled" (the computation on the received rows).
    x: this device's tokens ``[T, H]``.
    weights, experts: their routing ``[T, k]`` (global expert ids).
    gate, up: this shard's experts ``[E / shards, H, I]``; down ``[E / shards, I, H]``.
    shards: size of the mesh axis ``expert``.
    capacity: rows per (device, shard) per round (:func:`exchange_capacity`).
    sync_axes: every mesh axis of the enclosing ``shard_map``.

  Returns:
    ``[T, H]`` in x's dtype: each token's k expert outputs (rounded to x's dtype) weighted
    and summed in float32, in the order of its k choices.
  """
  t, k = experts.shape
  hidden = x.shape[1]
  local_experts = gate.shape[0]
  pairs = t * k
  flat_experts = experts.reshape(-1)
  dest = flat_experts // local_experts
  order = jnp.argsort(dest, stable=True)  # pairs grouped by destination shard
  load = jnp.bincount(dest, length=shards)  # [shards]
  run_start = jnp.cumsum(load) - load
  rounds = (jax.lax.pmax(jnp.max(load), sync_axes) + capacity - 1) // capacity
  rank = jnp.arange(capacity)[None, :]  # slot within a destination's send block
  shard_first_expert = (jnp.arange(shards) * local_experts)[:, None]

  def one_round(r, pair_out):
    taken = r * capacity + rank  # [shards, capacity]: rank within the destination's run
    sent = taken < load[:, None]
    pair = jnp.take(order, jnp.minimum(run_start[:, None] + taken, pairs - 1))
    rows = jnp.take(x, pair // k, axis=0)  # [shards, capacity, H]
    ids = jnp.where(sent, jnp.take(flat_experts, pair) - shard_first_expert, local_experts)
    rows = jax.lax.all_to_all(rows, "expert", 0, 0, tiled=True)
    ids = jax.lax.all_to_all(ids, "expert", 0, 0, tiled=True).reshape(-1, 1)
    y = DISPATCH[dispatch](
        rows.reshape(-1, hidden), (ids < local_experts).astype(jnp.float32), ids, gate, up, down
    )
    y = jax.lax.all_to_all(y.reshape(shards, capacity, hidden), "expert", 0, 0, tiled=True)
    # Empty slots point past the end and are dropped; each pair is written exactly once.
    target = jnp.where(sent, pair, pairs).reshape(-1)
    return pair_out.at[target].set(y.reshape(-1, hidden), mode="drop")

  pair_out = jax.lax.fori_loop(0, rounds, one_round, jnp.zeros((pairs, hidden), x.dtype))
  weighted = pair_out.reshape(t, k, hidden).astype(jnp.float32) * weights[..., None]
  return jnp.sum(weighted, axis=1).astype(x.dtype)


def expert_parallel(
    dispatch: str,
    mesh: Mesh,
    token_axes: tuple[str, ...],
    x: jax.Array,
    router: jax.Array,
    expert_bias: jax.Array | None,
    router_cfg: RouterConfig,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
) -> jax.Array:
  """Routed experts with every device working on its own tokens (``shard_map``).

  Each device routes the tokens it holds (``x`` split over ``token_axes``) with a
  replicated router, so no ``[global tokens, E]`` array exists. On an ``expert`` axis of
  size ``n > 1`` each device holds ``E / n`` experts and :func:`exchange_experts` moves
  (token, expert) rows to the shard owning the expert and back; with ``n = 1`` each device
  runs every expert on its own tokens. Weight dimensions sharded over other axes (``fsdp``,
  ``tensor``) are gathered for the device's experts only; devices along axes that do not
  split the tokens (``tensor``) repeat the same work.

  Args:
    dispatch: "ragged" or "tiled" (the per-device computation).
    mesh: the device mesh; ``mesh.shape["expert"]`` divides E.
    token_axes: mesh axes the token dimension is split over (from
      :func:`expert_parallel_axes`); includes "expert" when that axis is larger than 1.
    x: ``[T, H]``; router ``[H, E]`` and expert_bias ``[E]`` (or None) float32.
    router_cfg: routing settings.
    gate, up: ``[E, H, I]``; down ``[E, I, H]``.
    capacity_factor: per-round exchange capacity (:func:`exchange_capacity`).

  Returns:
    ``[T, H]`` in x's dtype.
  """
  shards = mesh.shape["expert"]
  num_experts = gate.shape[0]
  local_tokens = x.shape[0] // math.prod(mesh.shape[a] for a in token_axes)
  capacity = exchange_capacity(
      local_tokens, router_cfg.top_k, shards, num_experts // shards, capacity_factor
  )
  # A zero bias chooses exactly as no bias (scores + 0.0 == scores) and keeps the
  # shard_map arguments arrays.
  bias = jnp.zeros((num_experts,), jnp.float32) if expert_bias is None else expert_bias
  tokens, stacked = P(token_axes), P("expert")

  def local(x, router, bias, gate, up, down):
    weights, experts = route_tokens(x, router, bias, router_cfg)
    if shards == 1:
      return DISPATCH[dispatch](x, weights, experts, gate, up, down)
    return exchange_experts(
        dispatch,
        x,
        weights,
        experts,
        gate,
        up,
        down,
        shards=shards,
        capacity=capacity,
        sync_axes=tuple(mesh.axis_names),
    )

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(tokens, P(), P(), stacked, stacked, stacked),
      out_specs=tokens,
      check_vma=False,
  )(x, router, bias, gate, up, down)


def expert_parallel_all_gather(
    dispatch: str,
    mesh: Mesh,
    token_axes: tuple[str, ...],
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
) -> jax.Array:
  """The all-gather scheme, kept as the baseline of the tests and of
  benchmarks/bench_moe_dispatch.py (the module docstring compares the two).

  Routing ``[T, k]`` is computed outside, on all tokens. Inside ``shard_map`` the devices
  of one expert group all-gather their tokens and routing, run only their own ``E / n``
  experts on every gathered token (other experts' pairs are skipped), and
  ``psum_scatter`` the partial sums back to the tokens' owners. The per-device buffers
  hold the tokens of the whole expert group: the global batch on a mesh of ``expert``
  alone.

  Args:
    dispatch: "ragged" or "tiled" (the local computation).
    mesh: the device mesh; ``mesh.shape["expert"]`` divides E.
    token_axes: mesh axes the token dimension is split over; must include "expert".
    x ``[T, H]``, weights/experts ``[T, k]``, gate/up ``[E, H, I]``, down ``[E, I, H]``.

  Returns:
    ``[T, H]`` in x's dtype.
  """
  groups = mesh.shape["expert"]
  local_experts = gate.shape[0] // groups
  tokens, stacked = P(token_axes), P("expert")

  def local(x, weights, experts, gate, up, down):
    xs = jax.lax.all_gather(x, "expert", tiled=True)
    ws = jax.lax.all_gather(weights, "expert", tiled=True)
    es = jax.lax.all_gather(experts, "expert", tiled=True)
    first = jax.lax.axis_index("expert") * local_experts
    mine = (es >= first) & (es < first + local_experts)
    ids = jnp.where(mine, es - first, local_experts)
    y = DISPATCH[dispatch](xs, jnp.where(mine, ws, 0.0), ids, gate, up, down)
    out = jax.lax.psum_scatter(y.astype(jnp.float32), "expert", scatter_dimension=0, tiled=True)
    return out.astype(x.dtype)

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(tokens, tokens, tokens, stacked, stacked, stacked),
      out_specs=tokens,
      check_vma=False,
  )(x, weights, experts, gate, up, down)


def expert_parallel_axes(
    mesh: Mesh | None, num_tokens: int, num_experts: int, batch_axes: tuple[str, ...]
) -> tuple[str, ...] | None:
  """The token axes for :func:`expert_parallel`, or None when it does not apply: no mesh,
  no axis of size > 1 to split tokens over, an expert axis that does not divide the
  experts, or a token count the axes do not divide (then XLA partitions the layer)."""
  if mesh is None:
    return None
  shards = mesh.shape.get("expert", 1)
  if num_experts % shards:
    return None
  axes = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)
  if shards > 1 and "expert" not in axes:
    axes += ("expert",)
  if not axes or num_tokens % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes


def resolve_dispatch(name: str) -> str:
  """``"auto"`` -> ``"ragged"`` on TPU (native grouped matmul), ``"tiled"`` elsewhere."""
  if name == "auto":
    return "ragged" if jax.default_backend() == "tpu" else "tiled"
  if name not in DISPATCH:
    raise ValueError(f"Unknown MoE dispatch {name!r}; use auto, {', '.join(DISPATCH)}.")
  return name


class MoEBlock(nnx.Module):
  """Router + stacked routed experts + shared-expert SwiGLU.

  Parameters: ``router [H, E]`` and ``expert_bias [E]`` are kept in float32 whatever the
  parameter dtype (routing is computed in float32 and a rounded router could choose
  different experts); ``gate/up [E, H, I]``, ``down [E, I, H]`` with logical axes
  ``("expert", "embed", "expert_mlp")``; ``shared`` a SwiGLU of width ``I * num_shared``.

  With a ``mesh`` whose ``batch_axes`` split the tokens, "ragged" and "tiled" run per device
  (:func:`expert_parallel`; ``capacity_factor`` sizes the expert exchange's rounds);
  "dense", the reference, is left to XLA's partitioner.
  """

  def __init__(
      self,
      hidden: int,
      expert_width: int,
      num_shared: int,
      router_cfg: RouterConfig,
      *,
      use_expert_bias: bool,
      param_dtype: Any,
      rngs: nnx.Rngs,
      dispatch: str = "auto",
      mesh: Mesh | None = None,
      batch_axes: tuple[str, ...] = ("data", "fsdp", "expert"),
      capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
  ):
    e, i = router_cfg.num_experts, expert_width
    self.router_cfg = router_cfg
    self.dispatch = resolve_dispatch(dispatch)
    # With a mesh, ragged/tiled route and dispatch each device's own tokens (expert-parallel
    # when the expert axis is > 1).
    self.mesh = mesh
    self.batch_axes = tuple(batch_axes)
    exchange_capacity(1, 1, 1, 1, capacity_factor)  # a clear error now, not at trace time
    self.capacity_factor = capacity_factor
    self.router = layers.make_param(rngs, (hidden, e), ("embed", None), jnp.float32)
    self.expert_bias = (
        layers.make_param(rngs, (e,), (None,), jnp.float32, init="zeros")
        if use_expert_bias
        else None
    )
    axes_in, axes_out = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
    self.gate = layers.make_param(rngs, (e, hidden, i), axes_in, param_dtype)
    self.up = layers.make_param(rngs, (e, hidden, i), axes_in, param_dtype)
    self.down = layers.make_param(rngs, (e, i, hidden), axes_out, param_dtype)
    self.shared = (
        layers.SwiGLU(hidden, i * num_shared, param_dtype=param_dtype, rngs=rngs)
        if num_shared
        else None
    )

  def routing(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)`` ``[T, k]`` for tokens ``x [T, H]``."""
    bias = None if self.expert_bias is None else self.expert_bias[...]
    return route_tokens(x, self.router[...], bias, self.router_cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., H] -> [..., H]``."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    stacked = (self.gate[...], self.up[...], self.down[...])
    axes = (
        None
        if self.dispatch == "dense"
        else expert_parallel_axes(self.mesh, flat.shape[0], stacked[0].shape[0], self.batch_axes)
    )
    if axes is None:
      out = DISPATCH[self.dispatch](flat, *self.routing(flat), *stacked)
    else:
      bias = None if self.expert_bias is None else self.expert_bias[...]
      out = expert_parallel(
          self.dispatch,
          self.mesh,
          axes,
          flat,
          self.router[...],
          bias,
          self.router_cfg,
          *stacked,
          capacity_factor=self.capacity_factor,
      )
    if self.shared is not None:
      out = out + self.shared(flat)
    return out.reshape(shape)
