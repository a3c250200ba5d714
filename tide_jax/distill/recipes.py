"""Recipes: which distillation term the one train step adds, chosen by configuration.

A recipe is an objective plus two options (docs/method.md §3.4):

| preset        | alignment ``positions`` (pipeline B) | alignment ``chunks`` (pipeline A)  |
|---------------|--------------------------------------|------------------------------------|
| ``bd3lm``     | none                                 | none                               |
| ``kl``        | forward_kl                           | (refused)                          |
| ``reverse_kl``| reverse_kl                           | (refused)                          |
| ``tide_shared``| forward_kl + TIDAL + CompDemo token | calm + TIDAL (chunk form) + CompDemo chunk |
| ``calm``      | (refused)                            | calm                               |
| ``tide_cross``| reverse_kl                           | reverse_calm                       |

``recipe = 'custom'`` takes ``custom.objective``, ``custom.tidal`` and ``custom.compdemo``.
Validation (:func:`validate_distill_config`) refuses unsupported combinations with one
sentence, once per run; the distillation plan (``plan.py``) evaluates the result.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from tide_jax.distill import chunks as chunks_lib
from tide_jax.distill import terms as terms_lib

# Every token term of terms.py except TIDAL (a switch on top of forward_kl), and every
# chunk objective of chunks.py except its TIDAL form.
TOKEN_OBJECTIVES = tuple(name for name in terms_lib.TOKEN_TERMS if name != "tidal")
CHUNK_OBJECTIVES = tuple(name for name in chunks_lib.CHUNK_OBJECTIVES if name != "chunk_tidal")
REVERSE_OBJECTIVES = ("reverse_kl", "reverse_calm", "reverse_binary_kl")
TIDAL_OBJECTIVES = ("forward_kl", "calm")  # TIDAL's token form and its chunk form
ALIGNMENTS = ("positions", "chunks")
# preset -> alignment -> (objective, tidal, compdemo)
PRESETS = {
    "bd3lm": {"positions": (None, False, False), "chunks": (None, False, False)},
    "kl": {"positions": ("forward_kl", False, False)},
    "reverse_kl": {"positions": ("reverse_kl", False, False)},
    "jsd": {"positions": ("jensen_shannon", False, False)},
    "tide_shared": {"positions": ("forward_kl", True, True), "chunks": ("calm", True, True)},
    "calm": {"chunks": ("calm", False, False)},
    "tide_cross": {
        "positions": ("reverse_kl", False, False),
        "chunks": ("reverse_calm", False, False),
    },
}
METRIC_NAMES = (*terms_lib.TOKEN_TERMS, *chunks_lib.CHUNK_OBJECTIVES)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A validated recipe (hashable; every field static for jit)."""

  name: str
  alignment: str
  objective: str | None
  tidal: bool
  compdemo_ratio: float  # 0 = one ordinary teacher pass
  compdemo_granularity: str  # "token" or "chunk"
  weight: float
  temperature: float
  chunk_temperature: float
  shared_vocab: int | None
  max_chunks: int
  tidal_options: terms_lib.TidalOptions

  @property
  def term(self) -> str | None:
    """The name of the term evaluated (and logged)."""
    if self.objective is None:
      return None
    if self.tidal:
      return "tidal" if self.objective == "forward_kl" else "chunk_tidal"
    return self.objective

  @property
  def uses_teacher(self) -> bool:
    return self.objective is not None

  @property
  def uses_compdemo(self) -> bool:
    return self.uses_teacher and self.compdemo_ratio > 0


def _fail(message: str):
  raise ValueError(message)


def _choose(name: str, value, allowed) -> None:
  if value not in allowed:
    _fail(f"Unknown distill.{name} {value!r}; use one of {', '.join(map(str, allowed))}.")


def validate_distill_config(
    cfg: ml_collections.ConfigDict, *, student_vocab: int, teacher_vocab: int | None
) -> Recipe:
  """Checks ``config.distill`` and returns its :class:`Recipe` (one clear error otherwise).

  ``teacher_vocab`` may be None for ``bd3lm`` (no teacher).
  """
  _choose("recipe", cfg.recipe, (*PRESETS, "custom"))
  _choose("alignment", cfg.alignment, ALIGNMENTS)
  if cfg.recipe == "custom":
    _choose("custom.objective", cfg.custom.objective, (*TOKEN_OBJECTIVES, *CHUNK_OBJECTIVES))
    objective, tidal, compdemo = (
        cfg.custom.objective,
        bool(cfg.custom.tidal),
        bool(cfg.custom.compdemo),
    )
  else:
    if cfg.alignment not in PRESETS[cfg.recipe]:
      needed = next(iter(PRESETS[cfg.recipe]))
      _fail(
          f"Recipe {cfg.recipe!r} needs distill.alignment={needed!r} "
          f"({'chunk terms need a chunk alignment' if needed == 'chunks' else 'token terms need position pairs'})."
      )
    objective, tidal, compdemo = PRESETS[cfg.recipe][cfg.alignment]
  if objective in CHUNK_OBJECTIVES and cfg.alignment != "chunks":
    _fail(
        f"The chunk objective {objective!r} needs distill.alignment='chunks' "
        "(a chunk alignment); set it or choose a token objective."
    )
  if objective in TOKEN_OBJECTIVES and cfg.alignment != "positions":
    _fail(
        f"The token objective {objective!r} needs distill.alignment='positions' (a shared "
        "tokenizer); with a chunk alignment use calm, reverse_calm or reverse_binary_kl."
    )
  if tidal and objective in REVERSE_OBJECTIVES:
    _fail(
        f"TIDAL cannot be combined with the reverse objective {objective!r}: its (1 - lambda) "
        "factor suppresses the reverse objective's self-selection; use a forward objective "
        "or turn TIDAL off."
    )
  if tidal and objective not in TIDAL_OBJECTIVES:
    _fail(
        f"TIDAL interpolates the target of {' or '.join(TIDAL_OBJECTIVES)}, not of "
        f"{objective!r}; use one of those or turn TIDAL off."
    )
  tidal_options = terms_lib.TidalOptions(
      **{k: cfg.tidal[k] for k in ("l0", "l1", "growth", "axis", "timestep_weight")}
  )
  if not 0.0 <= tidal_options.l0 <= 1.0 or not 0.0 <= tidal_options.l1 <= 1.0:
    _fail("distill.tidal.l0 and distill.tidal.l1 must lie in [0, 1].")
  granularity = cfg.compdemo.granularity
  _choose("compdemo.granularity", granularity, ("auto", "token", "chunk"))
  if granularity == "auto":
    granularity = "token" if cfg.alignment == "positions" else "chunk"
  if (granularity == "chunk") != (cfg.alignment == "chunks"):
    _fail(
        f"CompDemo granularity {granularity!r} does not fit distill.alignment="
        f"{cfg.alignment!r}; use 'token' with positions and 'chunk' with chunks (or 'auto')."
    )
  if not 0.0 <= cfg.compdemo.ratio <= 1.0:
    _fail(f"distill.compdemo.ratio must lie in [0, 1], got {cfg.compdemo.ratio}.")
  for field in ("temperature", "chunk_temperature"):
    if not cfg[field] > 0:
      _fail(f"distill.{field} must be positive, got {cfg[field]}.")
  if "chunk_size" in cfg:
    _fail(
        "distill.chunk_size was renamed objective.row_block (rows per block of every "
        "vocabulary statistic); set that instead."
    )
  if not int(cfg.max_chunks) > 0:
    _fail(f"distill.max_chunks must be a positive integer, got {cfg.max_chunks}.")
  if cfg.weight < 0:
    _fail(f"distill.weight must be non-negative, got {cfg.weight}.")
  shared_vocab = cfg.shared_vocab
  if (
      shared_vocab is not None
      and teacher_vocab is not None
      and not (0 < shared_vocab <= min(student_vocab, teacher_vocab))
  ):
    _fail(
        f"distill.shared_vocab={shared_vocab} is larger than the student vocabulary "
        f"({student_vocab}) or the teacher vocabulary ({teacher_vocab}); use at most "
        f"{min(student_vocab, teacher_vocab)}."
    )
  if (
      objective in TOKEN_OBJECTIVES
      and shared_vocab is None
      and teacher_vocab is not None
      and teacher_vocab != student_vocab
  ):
    _fail(
        f"The student ({student_vocab}) and teacher ({teacher_vocab}) vocabularies differ; "
        "set distill.shared_vocab to the size of their common prefix."
    )
  if objective is not None and teacher_vocab is None:
    _fail(f"Recipe {cfg.recipe!r} needs a teacher; configure one or use recipe 'bd3lm'.")
  return Recipe(
      name=cfg.recipe,
      alignment=cfg.alignment,
      objective=objective,
      tidal=tidal,
      compdemo_ratio=float(cfg.compdemo.ratio) if compdemo else 0.0,
      compdemo_granularity=granularity,
      weight=float(cfg.weight),
      temperature=float(cfg.temperature),
      chunk_temperature=float(cfg.chunk_temperature),
      shared_vocab=None if shared_vocab is None else int(shared_vocab),
      max_chunks=int(cfg.max_chunks),
      tidal_options=tidal_options,
  )
