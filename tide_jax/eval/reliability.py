"""How reliable a bidirectional masked-diffusion teacher is as a function of masking ratio.

TIDAL (docs/method.md) trusts the teacher less at high masking ratios, because with most
of the sequence masked it sees little context. This module measures that directly on
held-out text: for each masking ratio t of a grid, a fixed subset of the tokens (token i
is masked when its seeded uniform ``u_i < t``, so the masked sets are nested as t grows)
is replaced by the mask token, the teacher predicts them with bidirectional attention
over the whole window, and the top-1 accuracy and mean negative log-likelihood of the
masked tokens are reported. The same measurement of a BD3LM student (``kind="bd3lm"``:
its own ``[x_t ; x_0]`` forward, where each block also sees the clean earlier blocks) is
the contrast: where the student's own predictions beat the teacher's, distilling toward
the teacher cannot help.

Windows come from :func:`tide_jax.eval.bpb.prepare_texts` (no special tokens, padding
neither scored nor attended to). Logits are computed a slice of positions at a time, so
the full ``[b, L, V]`` array never exists.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tide_jax.diffusion import forward
from tide_jax.eval import bpb


@dataclasses.dataclass(frozen=True)
class ReliabilityCurve:
  """Teacher quality on masked tokens per masking ratio.

  Attributes:
    t: float32 ``[n]`` masking ratios.
    accuracy: float64 ``[n]`` fraction of masked tokens whose argmax is the true token.
    nll: float64 ``[n]`` mean negative log-likelihood of the masked tokens, nats.
    num_masked: int64 ``[n]`` masked tokens scored at each ratio.
  """

  t: np.ndarray
  accuracy: np.ndarray
  nll: np.ndarray
  num_masked: np.ndarray


def masked_token_stats(
    model,
    ids: jax.Array,
    valid: jax.Array,
    masked: jax.Array,
    mask_token_id: int,
    chunk: int,
    kind: str = "mdlm",
    block_size: int = 32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Correct predictions, summed NLL and count over the masked tokens (jittable).

  Args:
    model: decoder with ``hidden_states`` / ``logits``.
    ids, valid, masked: ``[b, L]`` clean tokens, text flags, positions to mask.
    mask_token_id: the model's mask token.
    chunk: positions per logits slice (divides L).
    kind: the model's forward, ``mdlm`` (bidirectional) or ``bd3lm`` (a student).
    block_size: B for ``bd3lm`` (divides L).

  Returns:
    float32 scalars ``(correct, nll_sum, count)``.
  """
  b, length = ids.shape
  x_t = jnp.where(masked, jnp.asarray(mask_token_id, ids.dtype), ids)
  hidden = forward.denoiser_hidden(model, ids, x_t, kind=kind, block_size=block_size, valid=valid)
  n = length // chunk
  h = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
  y = ids.reshape(b, n, chunk).swapaxes(0, 1)

  def one(args):
    h_c, y_c = args
    logits = model.logits(h_c).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return nll, jnp.argmax(logits, axis=-1) == y_c

  nll, correct = jax.lax.map(one, (h, y))
  nll = nll.swapaxes(0, 1).reshape(b, length)
  correct = correct.swapaxes(0, 1).reshape(b, length)
  return (
      jnp.sum(jnp.where(masked, correct, False).astype(jnp.float32)),
      jnp.sum(jnp.where(masked, nll, 0.0)),
      jnp.sum(masked.astype(jnp.float32)),
  )


@functools.lru_cache(maxsize=8)
def _compiled_stats(graphdef, mask_token_id: int, chunk: int, kind: str, block_size: int):
  def run(state, ids, valid, uniforms, t):
    masked = (uniforms < t) & valid
    return masked_token_stats(
        nnx.merge(graphdef, state), ids, valid, masked, mask_token_id, chunk, kind, block_size
    )

  return jax.jit(run)


def teacher_reliability(
    model: nnx.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    mask_token_id: int,
    max_len: int,
    ratios: Sequence[float] = tuple(np.linspace(0.05, 0.95, 10)),
    batch_size: int = 4,
    chunk: int = 32,
    seed: int = 0,
    kind: str = "mdlm",
    block_size: int = 32,
) -> ReliabilityCurve:
  """Accuracy and NLL of a bidirectional teacher on masked held-out tokens for each ratio.

  Args:
    model: the teacher decoder (bidirectional attention: every valid token sees all
      others), or a BD3LM student with ``kind="bd3lm"``.
    tokenizer: its tokenizer.
    texts: held-out texts, cut into windows of ``max_len`` tokens.
    mask_token_id: the teacher's mask token.
    max_len: window length in tokens (a multiple of ``chunk``).
    ratios: masking ratios in (0, 1].
    batch_size: windows per forward pass.
    chunk: positions per logits slice.
    seed: seed of the fixed per-token thresholds.
    kind: ``mdlm`` (bidirectional, the default) or ``bd3lm`` (a student's own forward).
    block_size: the student's block size B (``bd3lm``; divides ``max_len``).
  """
  forward.check_objective(kind)
  t = np.asarray(ratios, np.float32)
  if t.size == 0 or np.any((t <= 0) | (t > 1)):
    raise ValueError("Masking ratios must lie in (0, 1]; for example (0.1, 0.5, 0.9).")
  if max_len % chunk:
    raise ValueError(f"max_len={max_len} must be a multiple of chunk={chunk}.")
  if kind == "bd3lm" and max_len % block_size:
    raise ValueError(f"max_len={max_len} must be a multiple of block_size={block_size}.")
  data = bpb.prepare_texts(tokenizer, texts, max_len=max_len, block_size=chunk, seed=seed)
  graphdef, state = nnx.split(model)
  fn = _compiled_stats(graphdef, int(mask_token_id), int(chunk), kind, int(block_size))
  n = data.ids.shape[0]
  totals = np.zeros((t.size, 3), np.float64)
  for start in range(0, n, batch_size):
    rows = slice(start, start + batch_size)
    fill = batch_size - data.ids[rows].shape[0]
    # Empty rows (no valid token) fill the last batch: one compiled shape, no contribution.
    pad = lambda x: np.concatenate([x[rows], np.zeros((fill,) + x.shape[1:], x.dtype)])
    ids, valid, uniforms = pad(data.ids), pad(data.valid), pad(data.uniforms)
    for i, ratio in enumerate(t):
      totals[i] += [float(v) for v in fn(state, ids, valid, uniforms, jnp.float32(ratio))]
  count = np.maximum(totals[:, 2], 1.0)
  return ReliabilityCurve(
      t=t,
      accuracy=totals[:, 0] / count,
      nll=totals[:, 1] / count,
      num_masked=totals[:, 2].astype(np.int64),
  )
