"""Recipes: presets and configuration validation (docs/method.md §3.4)."""

import pytest

from configs import common
from tide_jax.distill import recipes


def config(**overrides):
  cfg = common.distill_config()
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name,alignment,term,compdemo_ratio",
    [
        ("bd3lm", "positions", None, 0.0),
        ("kl", "positions", "forward_kl", 0.0),
        ("reverse_kl", "positions", "reverse_kl", 0.0),
        ("tide_shared", "positions", "tidal", 0.5),
        ("tide_shared", "chunks", "chunk_tidal", 0.5),
        ("calm", "chunks", "calm", 0.0),
        ("tide_cross", "chunks", "reverse_calm", 0.0),
        ("tide_cross", "positions", "reverse_kl", 0.0),
    ],
)
def test_presets(name, alignment, term, compdemo_ratio):
  recipe = recipes.validate_distill_config(
      config(recipe=name, alignment=alignment), student_vocab=100, teacher_vocab=100
  )
  assert recipe.term == term and recipe.compdemo_ratio == compdemo_ratio
  assert recipe.compdemo_granularity == ("token" if alignment == "positions" else "chunk")
  hash(recipe)  # static argument of the jitted step


@pytest.mark.parametrize(
    "overrides,vocabs,message",
    [
        (
            dict(recipe="custom", **{"custom.objective": "reverse_kl", "custom.tidal": True}),
            (100, 100),
            "TIDAL cannot be combined with the reverse objective",
        ),
        (
            dict(
                recipe="custom",
                alignment="chunks",
                **{"custom.objective": "reverse_calm", "custom.tidal": True},
            ),
            (100, 120),
            "TIDAL cannot be combined",
        ),
        (dict(recipe="calm"), (100, 100), "chunk terms need a chunk alignment"),
        (
            dict(recipe="custom", **{"custom.objective": "jensen_shannon", "custom.tidal": True}),
            (100, 100),
            "TIDAL interpolates the target of forward_kl or calm",
        ),
        (
            dict(recipe="custom", **{"custom.objective": "reverse_calm"}),
            (100, 100),
            "needs distill.alignment='chunks'",
        ),
        (dict(recipe="kl", shared_vocab=101), (100, 120), "larger than the student vocabulary"),
        (dict(recipe="kl", shared_vocab=130), (140, 120), "larger than"),
        (dict(recipe="kl"), (100, 120), "set distill.shared_vocab"),
        (dict(recipe="tide-shared"), (100, 100), "Unknown distill.recipe 'tide-shared'"),
        (dict(alignment="bytes"), (100, 100), "Unknown distill.alignment"),
        (dict(recipe="tide_shared", **{"tidal.growth": "exp"}), (100, 100), "Unknown TIDAL growth"),
        (dict(recipe="tide_shared", **{"compdemo.ratio": 1.5}), (100, 100), "ratio must lie"),
        (
            dict(recipe="tide_shared", **{"compdemo.granularity": "chunk"}),
            (100, 100),
            "does not fit",
        ),
        (dict(recipe="kl", temperature=0.0), (100, 100), "temperature must be positive"),
        (dict(recipe="kl"), (100, None), "needs a teacher"),
    ],
)
def test_validation_refuses_with_one_sentence(overrides, vocabs, message):
  with pytest.raises(ValueError, match=message):
    recipes.validate_distill_config(
        config(**overrides), student_vocab=vocabs[0], teacher_vocab=vocabs[1]
    )


def test_renamed_block_field_is_named():
  cfg = config(recipe="kl")
  cfg.chunk_size = 128
  with pytest.raises(ValueError, match="renamed objective.row_block"):
    recipes.validate_distill_config(cfg, student_vocab=100, teacher_vocab=100)
