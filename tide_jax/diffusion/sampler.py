"""Block-diffusion (BD3LM) sampler with a key/value cache, jitted with static shapes.

Protocol (docs/method.md §2): every prompt is left-padded to a common length P that is a
multiple of the block size B, so generation starts on a block boundary. Padding gets no
attention (its key columns are masked out) and RoPE positions are *logical*: a prompt of
length n has positions 0..n-1 whatever its padding, and its first new token position n.
Generation then runs one block of B mask tokens at a time:

  * at most ``steps_per_block`` denoising steps; each runs the model on the block,
    projects the hidden states of the still-masked positions only onto the vocabulary
    (committed positions need no prediction; the projection is most of a step's work with
    a 152k vocabulary), chooses a token per position (greedy, or Gumbel-max sampling at a
    temperature), and commits the k most confident still-masked positions, k taken from
    the noise schedule (:func:`tokens_per_step`); committed tokens are never re-masked;
  * threshold mode (``threshold > 0``, after Fast-dLLM's parallel decoding) also commits
    every still-masked position whose confidence exceeds the threshold, so a step commits
    at least the schedule's k (one token with the paper's setting) and a block can finish
    in fewer steps;
  * confidence is the model's probability of the chosen token ("low_confidence": the
    least confident positions stay masked) or a uniform random number ("random");
  * the finished block is run once more, clean, and its keys/values are written into a
    preallocated cache ``[b, P + G, K, D]`` (G = new-token budget) at its offset: earlier
    blocks are never recomputed. Attention is block-causal: a block sees the valid
    cached columns and itself (bidirectionally);
  * a sequence stops after a block that contains EOS (the rest of its budget is filled
    with EOS); the loop over blocks ends when every sequence has stopped.

All loops are ``lax`` loops inside one ``jax.jit`` program per (model graph, batch size,
P, config), so a new prompt batch of the same padded shape reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tide_jax.diffusion import schedules

ORDERS = ("low_confidence", "random")
# The masked-only projection runs at one of a few static widths (multiples of
# ceil(B / PROJECTION_WIDTHS)), so a step projects at most that many extra positions.
PROJECTION_WIDTHS = 8


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to generate.

  Attributes:
    block_size: B, tokens per block (the student's training block size; 32 in the paper).
    steps_per_block: denoising steps per block (B steps = one token per step, the paper).
    max_new_tokens: generation budget; rounded up to whole blocks.
    mask_token_id: id of the mask token the student was trained with.
    eos_token_id: a sequence stops after the block in which it emits this id.
    temperature: 0 for greedy decoding, > 0 for Gumbel-max sampling of logits / T.
    order: "low_confidence" (commit the most probable choices first) or "random".
    schedule: alpha(t) schedule that sets how many tokens each step commits.
    context_len: longest padded prompt + budget the sampler accepts (the model's context).
    threshold: 0 = the schedule alone; in (0, 1): each step also commits every still-masked
      position whose confidence (probability of its chosen token) exceeds it.
    project_masked_only: project only the still-masked positions onto the vocabulary
      (False: the whole block at every step, as earlier versions did; same tokens).
  """

  block_size: int = 32
  steps_per_block: int = 32
  max_new_tokens: int = 256
  mask_token_id: int = 151669
  eos_token_id: int = 151645
  temperature: float = 0.0
  order: str = "low_confidence"
  schedule: str = "linear"
  context_len: int = 4096
  threshold: float = 0.0
  project_masked_only: bool = True

  @property
  def num_blocks(self) -> int:
    return -(-self.max_new_tokens // self.block_size)

  @property
  def projection_widths(self) -> tuple[int, ...]:
    """Static widths of the masked-only projection (just B for the whole block)."""
    if not self.project_masked_only:
      return (self.block_size,)
    step = -(-self.block_size // PROJECTION_WIDTHS)
    return tuple(range(step, self.block_size, step)) + (self.block_size,)

  def validate(self) -> None:
    """Raises ValueError with one sentence for each kind of bad setting."""
    if self.block_size < 1:
      raise ValueError(f"block_size must be at least 1, got {self.block_size}.")
    if not 1 <= self.steps_per_block <= self.block_size:
      raise ValueError(
          f"steps_per_block must be between 1 and block_size={self.block_size}, "
          f"got {self.steps_per_block}; a step has to commit at least one token."
      )
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
    if self.order not in ORDERS:
      raise ValueError(f"Unknown commit order {self.order!r}; choose one of {', '.join(ORDERS)}.")
    if not 0.0 <= self.threshold < 1.0:
      raise ValueError(
          f"threshold must lie in [0, 1) (0 = off), got {self.threshold}; it is compared "
          "with the probability of each position's chosen token."
      )
    if self.threshold > 0 and self.order != "low_confidence":
      raise ValueError(
          f"threshold mode compares the model's confidence, but order={self.order!r} ranks "
          "positions randomly; use order='low_confidence' or threshold=0."
      )
    schedules.check_schedule(self.schedule)


def tokens_per_step(block_size: int, steps: int, schedule: str = "linear") -> np.ndarray:
  """How many positions each denoising step commits: int ``[steps]`` summing to B.

  Step s moves the diffusion time from ``t_s = 1 - s/steps`` to ``t_{s+1}``; the number
  of still-masked tokens follows the schedule, ``round(B (1 - alpha(t)))``, so step s
  commits the difference. The linear schedule spreads B as evenly as rounding allows.
  """
  t = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps
  with jax.ensure_compile_time_eval():  # also called while tracing the jitted sampler
    alpha = np.asarray(schedules.alpha(jnp.asarray(t, jnp.float32), schedule), np.float64)
  still_masked = np.round(block_size * (1.0 - alpha)).astype(np.int64)
  still_masked[0], still_masked[-1] = block_size, 0
  still_masked = np.minimum.accumulate(still_masked)  # guard float noise: never increases
  return (still_masked[:-1] - still_masked[1:]).astype(np.int32)


def choose_tokens(
    logits: jax.Array,
    key: jax.Array,
    temperature: float,
    mask_token_id: int,
    slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Token choice and its probability at each position.

  Args:
    logits: float32 ``[b, W, V]``.
    key: PRNG key (used only when ``temperature > 0``).
    temperature: 0 = argmax; otherwise argmax of ``logits / T + Gumbel noise``.
    mask_token_id: never chosen (it is not a word).
    slots: int ``[b, W]``, the identity of each position for its noise: the noise of a
      position is drawn from ``fold_in(key, slot)``, so it does not depend on which other
      positions are projected with it (default: the flat index ``row * W + column``).

  Returns:
    ``(tokens int32 [b, W], probability float32 [b, W])`` where probability is the softmax
    of the (untempered) logits at the chosen token.
  """
  b, width, vocab = logits.shape
  # Elementwise edits and reductions only, so XLA fuses them into passes over the logits
  # instead of materialising more [b, W, V] arrays (V is ~152k for Qwen).
  logits = jnp.where(jnp.arange(vocab) == mask_token_id, -jnp.inf, logits)
  if temperature > 0:
    if slots is None:
      slots = jnp.arange(b * width, dtype=jnp.int32).reshape(b, width)
    noise = lambda slot: jax.random.gumbel(jax.random.fold_in(key, slot), (vocab,), jnp.float32)
    gumbel = jax.vmap(jax.vmap(noise))(slots)
    tokens = jnp.argmax(logits / temperature + gumbel, axis=-1)
  else:
    tokens = jnp.argmax(logits, axis=-1)
  chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  probability = jnp.exp(chosen - jax.nn.logsumexp(logits, axis=-1))
  return tokens.astype(jnp.int32), probability


def commit_mask(confidence: jax.Array, still_masked: jax.Array, k: jax.Array) -> jax.Array:
  """The k most confident still-masked positions of each row: bool ``[b, B]``.

  Ties go to the lower position (stable sort), so the choice is deterministic.
  """
  score = jnp.where(still_masked, confidence, -jnp.inf)
  order = jnp.argsort(-score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return (rank < k) & still_masked


def project_choices(
    model, hidden: jax.Array, still_masked: jax.Array, key: jax.Array, cfg: SamplerConfig
) -> tuple[jax.Array, jax.Array]:
  """Token choices at the still-masked positions of a block, projecting only those.

  The positions are gathered to the smallest of ``cfg.projection_widths`` that holds the
  most still-masked positions of any row (one ``lax.switch`` branch per width, so every
  shape is static).

  Args:
    model: has ``logits(hidden [..., E]) -> [..., V]``.
    hidden: ``[b, B, E]`` hidden states of the block.
    still_masked: bool ``[b, B]``, the positions to predict (none in the rows of finished
      sequences).
    key: PRNG key of this step's token choice.
    cfg: sampler settings.

  Returns:
    ``tokens int32 [b, B]`` and ``probability float32 [b, B]``; where
    ``still_masked`` is False the probability is -inf and the token means nothing.
  """
  b, bsz = still_masked.shape
  widths = cfg.projection_widths
  rows = jnp.arange(b)[:, None]

  def at_width(width):
    def branch(hidden, still_masked):
      if width == bsz:
        picked = jnp.broadcast_to(jnp.arange(bsz), (b, bsz))
      else:
        # Masked positions first, in block order: the first `width` hold every masked one.
        picked = jnp.argsort(~still_masked, axis=1, stable=True)[:, :width]
      chosen_hidden = jnp.take_along_axis(hidden, picked[..., None], axis=1)
      logits = model.logits(chosen_hidden)
      tokens, probability = choose_tokens(
          logits, key, cfg.temperature, cfg.mask_token_id, slots=rows * bsz + picked
      )
      predicted = jnp.take_along_axis(still_masked, picked, axis=1)
      probability = jnp.where(predicted, probability, -jnp.inf)
      tokens_out = jnp.zeros((b, bsz), jnp.int32).at[rows, picked].set(tokens)
      probability_out = jnp.full((b, bsz), -jnp.inf, jnp.float32).at[rows, picked].set(probability)
      return tokens_out, probability_out

    return branch

  if len(widths) == 1:
    return at_width(widths[0])(hidden, still_masked)
  most = jnp.max(jnp.sum(still_masked, axis=1))
  branch = jnp.searchsorted(jnp.asarray(widths), most)  # first width >= most
  branches = [at_width(w) for w in widths]
  return jax.lax.switch(branch, branches, hidden, still_masked)


def denoise_step(
    model,
    hidden: jax.Array,
    block: jax.Array,
    live: jax.Array,
    key: jax.Array,
    k: jax.Array,
    cfg: SamplerConfig,
) -> tuple[jax.Array, jax.Array]:
  """One denoising step on a block: ``(new block [b, B], committed bool [b, B])``.

  Commits the ``k`` most confident still-masked positions of each live row (``live``
  bool ``[b]``; rows of finished sequences commit nothing) and, in threshold mode, every
  other one whose confidence exceeds ``cfg.threshold``.
  """
  choice_key, order_key = jax.random.split(key)
  still_masked = (block == cfg.mask_token_id) & live[:, None]
  tokens, probability = project_choices(model, hidden, still_masked, choice_key, cfg)
  predicted = still_masked & (probability > -jnp.inf)
  if cfg.order == "random":
    confidence = jax.random.uniform(order_key, probability.shape, jnp.float32)
  else:
    confidence = probability
  commit = commit_mask(confidence, predicted, k)
  if cfg.threshold > 0:
    commit = commit | (predicted & (probability > cfg.threshold))
  return jnp.where(commit, tokens, block), commit


def pad_prompts(
    prompts: Sequence[Sequence[int]], cfg: SamplerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-pads prompts to one block multiple.

  Returns:
    ``ids int32 [b, P]`` (padding holds the EOS id; it is never attended to),
    ``valid bool [b, P]`` and ``lengths int32 [b]``.
  """
  if len(prompts) == 0:
    raise ValueError("The prompt list is empty; pass at least one tokenized prompt.")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() == 0:
    raise ValueError(
        f"Prompt {int(np.argmin(lengths))} is empty; every prompt needs at least "
        "one token (for example the chat template's assistant header)."
    )
  padded = -(-int(lengths.max()) // cfg.block_size) * cfg.block_size
  budget = cfg.num_blocks * cfg.block_size
  if padded + budget > cfg.context_len:
    longest = int(np.argmax(lengths))
    raise ValueError(
        f"Prompt {longest} has {lengths[longest]} tokens; padded to {padded} plus "
        f"{budget} new tokens it exceeds the context of {cfg.context_len} tokens; shorten "
        "the prompt or lower max_new_tokens."
    )
  ids = np.full((len(prompts), padded), cfg.eos_token_id, np.int32)
  valid = np.zeros((len(prompts), padded), bool)
  for i, prompt in enumerate(prompts):
    ids[i, padded - len(prompt) :] = np.asarray(prompt, np.int32)
    valid[i, padded - len(prompt) :] = True
  return ids, valid, lengths


def _logical_positions(valid: jax.Array) -> jax.Array:
  """Positions of the padded prompt: 0.. at the first real token, 0 on padding."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def _prefill(model, ids, valid, cache_len: int, block_size: int):
  """Runs the prompt once and returns the cache ``[b, cache_len, K, D]`` per layer."""
  b, plen = ids.shape
  blk = np.arange(plen) // block_size
  block_causal = jnp.asarray(blk[None, :] <= blk[:, None])
  mask = block_causal[None] & valid[:, None, :]
  _, kvs = model.hidden_states(ids, _logical_positions(valid), mask, return_kv=True)
  pad = ((0, 0), (0, cache_len - plen), (0, 0), (0, 0))
  return tuple((jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in kvs)


def _generate(graphdef, state, ids, valid, lengths, key, cfg: SamplerConfig):
  """Jitted body of :func:`generate`; see there for shapes."""
  model = nnx.merge(graphdef, state)
  b, plen = ids.shape
  bsz = cfg.block_size
  cache_len = plen + cfg.num_blocks * bsz
  ks = jnp.asarray(tokens_per_step(bsz, cfg.steps_per_block, cfg.schedule))
  cache = _prefill(model, ids, valid, cache_len, bsz)
  key_valid = jnp.concatenate([valid, jnp.zeros((b, cache_len - plen), bool)], axis=1)
  out = jnp.full((b, cfg.num_blocks * bsz), cfg.eos_token_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  self_cols = jnp.ones((b, bsz, bsz), bool)

  def block_call(tokens, j, cache, key_valid, return_kv):
    positions = lengths[:, None] + j * bsz + jnp.arange(bsz)[None, :]
    mask = jnp.concatenate(
        [jnp.broadcast_to(key_valid[:, None, :], (b, bsz, cache_len)), self_cols], axis=2
    )
    return model.hidden_states(tokens, positions, mask, prefix_kv=cache, return_kv=return_kv)

  def run_block(carry):
    j, cache, key_valid, out, done, key, steps_run = carry
    key, block_key = jax.random.split(key)

    def unfinished(step_carry):
      s, block = step_carry
      return (s < cfg.steps_per_block) & jnp.any((block == cfg.mask_token_id) & ~done[:, None])

    def step(step_carry):
      s, block = step_carry
      hidden = block_call(block, j, cache, key_valid, False)
      step_key = jax.random.fold_in(block_key, s)
      new_block, _ = denoise_step(model, hidden, block, ~done, step_key, ks[s], cfg)
      return s + 1, new_block

    block = jnp.full((b, bsz), cfg.mask_token_id, jnp.int32)
    steps, block = jax.lax.while_loop(unfinished, step, (jnp.int32(0), block))
    block = jnp.where(done[:, None], cfg.eos_token_id, block)
    # The clean block's keys/values, as the x0 half of training computes them.
    _, kvs = block_call(block, j, cache, key_valid, True)
    offset = plen + j * bsz
    cache = tuple(
        (
            jax.lax.dynamic_update_slice_in_dim(ck, nk.astype(ck.dtype), offset, 1),
            jax.lax.dynamic_update_slice_in_dim(cv, nv.astype(cv.dtype), offset, 1),
        )
        for (ck, cv), (nk, nv) in zip(cache, kvs)
    )
    key_valid = jax.lax.dynamic_update_slice_in_dim(key_valid, jnp.ones((b, bsz), bool), offset, 1)
    out = jax.lax.dynamic_update_slice_in_dim(out, block, j * bsz, 1)
    done = done | jnp.any(block == cfg.eos_token_id, axis=1)
    return j + 1, cache, key_valid, out, done, key, steps_run + steps

  def keep_going(carry):
    j, *_, done, _, _ = carry
    return (j < cfg.num_blocks) & ~jnp.all(done)

  carry = (jnp.int32(0), cache, key_valid, out, done, key, jnp.int32(0))
  j, _, _, out, _, _, steps_run = jax.lax.while_loop(keep_going, run_block, carry)
  return out, j, steps_run


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, cfg: SamplerConfig):
  return jax.jit(functools.partial(_generate, graphdef, cfg=cfg))


def generate_padded(
    model: nnx.Module,
    ids: np.ndarray,
    valid: np.ndarray,
    lengths: np.ndarray,
    key: jax.Array,
    cfg: SamplerConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Generation for already padded prompts (the jitted program); see :func:`generate`.

  Returns:
    ``tokens int32 [b, num_blocks * B]``, the number of blocks actually run and the number
    of denoising steps (model calls on a block, clean cache passes not counted) they took
    (scalars).
  """
  graphdef, state = nnx.split(model)
  return _compiled(graphdef, cfg)(
      state, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(lengths), key
  )


def compile_generate(
    model: nnx.Module,
    ids: np.ndarray,
    valid: np.ndarray,
    lengths: np.ndarray,
    key: jax.Array,
    cfg: SamplerConfig,
):
  """Ahead-of-time compiled :func:`generate_padded` for these input shapes.

  Lets a caller time compilation and generation separately (tokens/s without compile
  time). Returns ``run(ids, valid, lengths, key) -> (tokens, blocks_run, steps_run)``.
  """
  graphdef, state = nnx.split(model)
  args = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(lengths), key)
  compiled = _compiled(graphdef, cfg).lower(state, *args).compile()
  return lambda *a: compiled(state, *(jnp.asarray(x) for x in a))


def truncate_at_eos(tokens: np.ndarray, eos_token_id: int) -> list[list[int]]:
  """Each row up to (not including) its first EOS."""
  rows = []
  for row in np.asarray(tokens):
    hits = np.flatnonzero(row == eos_token_id)
    rows.append(row[: hits[0] if hits.size else row.size].tolist())
  return rows


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    cfg: SamplerConfig,
    key: jax.Array | None = None,
) -> tuple[np.ndarray, list[list[int]]]:
  """Generates continuations of a batch of tokenized prompts.

  Args:
    model: a decoder with ``hidden_states(ids, positions, mask, prefix_kv, return_kv)`` and
      ``logits(hidden)`` (:class:`tide_jax.models.dense.DenseDecoder`).
    prompts: b token-id lists of any lengths (>= 1).
    cfg: the sampler settings.
    key: PRNG key for sampling / random order (default: ``PRNGKey(0)``).

  Returns:
    ``(tokens int32 [b, num_blocks * B], per-sequence tokens up to the first EOS)``.
  """
  cfg.validate()
  ids, valid, lengths = pad_prompts(prompts, cfg)
  key = jax.random.PRNGKey(0) if key is None else key
  tokens, _, _ = generate_padded(model, ids, valid, lengths, key, cfg)
  tokens = np.asarray(tokens)
  return tokens, truncate_at_eos(tokens, cfg.eos_token_id)
