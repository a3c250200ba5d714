"""The student's own diffusion objective: BD3LM (block diffusion) and MDLM (bidirectional).

Both noise the clean sequence with one ``t`` per sequence and score the masked positions
with the ELBO weight ``w(t)``, summed and divided by the number of maskable tokens in the
batch (SPEC section 2). BD3LM feeds ``[x_t ; x_0]`` with the BD3LM mask and projects only
the x_t half to the vocabulary; MDLM (used for the smoke teacher) feeds ``x_t`` alone with
bidirectional attention over valid tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tide_jax.diffusion import masks, noising, schedules
from tide_jax.distill import terms

OBJECTIVES = ("bd3lm", "mdlm")
MaskFn = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class NoisedBatch:
  """What a forward pass of the student saw.

  Attributes:
    x_t: int ``[b, L]`` noised tokens.
    masked: bool ``[b, L]`` positions replaced by the mask token.
    t: float32 ``[b]`` diffusion times.
    hidden: ``[b, L, E]`` final hidden states at the x_t positions.
    logits: float32 ``[b, L, V]`` when the loss materialised them (``loss_chunk = 0``), so
      a distillation term can reuse them; None when the loss ran in chunks.
  """

  x_t: jax.Array
  masked: jax.Array
  t: jax.Array
  hidden: jax.Array
  logits: jax.Array | None = None


def chunked_target_logprob(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int = 256
) -> jax.Array:
  """``log softmax(hidden @ kernel)[target]`` per row without a full ``[N, V]`` float32 copy.

  Rows are processed ``chunk`` at a time under ``jax.checkpoint``, so neither the forward
  nor the backward pass keeps more than one ``[chunk, V]`` block of logits alive.

  Args:
    hidden: ``[N, E]``; kernel: ``[E, V]``; targets: int ``[N]``.

  Returns:
    float32 ``[N]``.
  """
  n = hidden.shape[0]
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  hidden_p = jnp.pad(hidden, ((0, pad), (0, 0)))
  targets_p = jnp.pad(targets, (0, pad))

  @jax.checkpoint
  def one(args):
    h, y = args
    logits = jnp.einsum("ne,ev->nv", h, kernel, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return picked - lse

  out = jax.lax.map(
      one, (hidden_p.reshape(-1, chunk, hidden.shape[-1]), targets_p.reshape(-1, chunk))
  )
  return out.reshape(-1)[:n]


def noise_batch(
    key: jax.Array, batch: dict[str, jax.Array], obj_cfg, mask_fn: MaskFn | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws t and noises ``batch['input_ids']`` where ``batch['maskable']``.

  ``mask_fn(masked, batch) -> masked`` may adjust the drawn mask before it is applied
  (chunk-consistent masking for cross-tokenizer distillation).
  """
  key_t, key_mask = jax.random.split(key)
  ids = batch["input_ids"]
  t = schedules.sample_t(key_t, ids.shape[0], float(obj_cfg.t_eps))
  x_t, masked = noising.noise_tokens(
      key_mask, ids, batch["maskable"], t, int(obj_cfg.mask_token_id), obj_cfg.schedule
  )
  if mask_fn is not None:
    masked = mask_fn(masked, batch)
    x_t = jnp.where(masked, jnp.asarray(int(obj_cfg.mask_token_id), ids.dtype), ids)
  return x_t, masked, t


def student_hidden(model, batch: dict[str, jax.Array], x_t: jax.Array, obj_cfg) -> jax.Array:
  """Hidden states ``[b, L, E]`` at the x_t positions under the configured objective."""
  ids = batch["input_ids"]
  b, length = ids.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  if obj_cfg.kind == "bd3lm":
    mask = masks.bd3lm_attention_mask(length, int(obj_cfg.block_size))
    both = jnp.concatenate([x_t, ids], axis=1)
    pos2 = jnp.concatenate([positions, positions], axis=1)
    return model.hidden_states(both, pos2, mask)[:, :length]
  if obj_cfg.kind == "mdlm":
    return model.hidden_states(x_t, positions, masks.padding_attention_mask(batch["valid"]))
  raise ValueError(f"Unknown objective {obj_cfg.kind!r}; choose one of {', '.join(OBJECTIVES)}.")


def diffusion_loss(
    model,
    batch: dict[str, jax.Array],
    key: jax.Array,
    obj_cfg,
    mask_fn: MaskFn | None = None,
    keep_logits: bool = False,
) -> tuple[jax.Array, dict[str, Any], NoisedBatch]:
  """Weighted masked-token cross-entropy with token normalisation.

  ``keep_logits`` (set when a distillation term needs the student's logits anyway) projects
  the x_t half once and takes the cross-entropy from those logits, so the output
  projection is never computed twice.

  Returns:
    ``(loss, metrics, noised)``; ``noised`` lets distillation terms reuse the forward pass.
  """
  x_t, masked, t = noise_batch(key, batch, obj_cfg, mask_fn)
  hidden = student_hidden(model, batch, x_t, obj_cfg)
  b, length, width = hidden.shape
  loss_chunk = int(obj_cfg.get("loss_chunk", 256))
  logits = None
  if keep_logits or loss_chunk <= 0:
    # One [b, L, V] projection, shared with the distillation term; the log-softmax statistics
    # still run a block of rows at a time (one block when loss_chunk <= 0).
    logits = model.logits(hidden)
    rows = b * length
    logp = terms.target_log_probs(
        logits.reshape(rows, -1),
        batch["input_ids"].reshape(rows),
        chunk_size=loss_chunk if loss_chunk > 0 else rows,
    ).reshape(b, length)
  else:
    logp = chunked_target_logprob(
        hidden.reshape(-1, width),
        model.output_kernel().astype(hidden.dtype),
        batch["input_ids"].reshape(-1),
        loss_chunk,
    ).reshape(b, length)
  weight = schedules.loss_weight(t, obj_cfg.schedule)[:, None] * masked
  n_maskable = jnp.maximum(jnp.sum(batch["maskable"]), 1)
  loss = -jnp.sum(weight * logp) / n_maskable
  # Unweighted masked-token NLL: comparable across t draws and recipes (the eval metric).
  n_masked = jnp.sum(masked)
  masked_nll = -jnp.sum(jnp.where(masked, logp, 0.0)) / jnp.maximum(n_masked, 1)
  metrics = {
      "ce_loss": loss,
      "masked_nll": masked_nll,
      "masked_fraction": n_masked / n_maskable,
      "maskable_tokens": n_maskable,
  }
  return loss, metrics, NoisedBatch(x_t=x_t, masked=masked, t=t, hidden=hidden, logits=logits)
