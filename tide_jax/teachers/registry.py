"""Teacher registry: architectures, teacher families, conversion and sharded loading.

An *architecture* says how to read a ``config.json`` and which module and name map serve
it (``ARCHITECTURES``, keyed by ``model_type``). A *teacher family* (``TEACHERS``) is
(architecture, tokenizer spec, chat template, mask token id, input builder); its checkpoint
path comes from the configuration. Adding a teacher is one model file, one conversion
rule table and one entry here (docs/teachers.md walks through it).

Training code::

  section = config.teacher       # configs/common.py: teacher_config("llada2", ...)
  teacher, params = load_teacher(section, mesh, block_size=32)     # sharded, frozen
  hidden = teacher.prediction_hidden(params, clean_ids, masked, valid)   # [b, Lt, E]
  kernel = teacher.output_kernel(params)                                  # [E, V]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from tide_jax.convert import llada2 as llada2_map
from tide_jax.convert import qwen as qwen_map
from tide_jax.convert import streaming
from tide_jax.convert.safetensors_io import SafetensorsCheckpoint
from tide_jax.models import config as mcfg
from tide_jax.models import dense, llada2
from tide_jax.teachers import inputs as inputs_lib
from tide_jax.teachers.teacher import Teacher
from tide_jax.parallel import sharding

# --------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build and convert one model family from its HF config."""

  config_from_hf: Callable[..., Any]  # (hf_dict, param_dtype=, dtype=) -> config
  abstract_model: Callable[[Any], nnx.Module]  # config -> model under eval_shape
  rules: Callable[[Any], list]  # config -> name-map rules
  ranges: Callable[[Any], dict]  # config -> placeholder ranges


ARCHITECTURES: dict[str, Architecture] = {
    "llada2_moe": Architecture(
        llada2.llada2_config_from_hf,
        llada2.abstract_llada2,
        llada2_map.llada2_rules,
        llada2_map.llada2_ranges,
    ),
    "qwen3": Architecture(
        mcfg.decoder_config_from_hf,
        dense.abstract_decoder,
        qwen_map.qwen_rules,
        qwen_map.qwen_ranges,
    ),
    "qwen2": Architecture(
        mcfg.decoder_config_from_hf,
        dense.abstract_decoder,
        qwen_map.qwen_rules,
        qwen_map.qwen_ranges,
    ),
}


def architecture_for(hf_config: Mapping[str, Any]) -> Architecture:
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"No teacher architecture for model_type={model_type!r}; supported: "
        f"{', '.join(ARCHITECTURES)}."
    )
  return ARCHITECTURES[model_type]


# --------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class TeacherFamily:
  """A registered teacher. ``tokenizer`` is a spec for ``tide_jax.data.tokenizers``;
  ``"hf_dir"`` means the tokenizer files next to the HF weights."""

  model_types: tuple[str, ...]
  tokenizer: str
  mask_token_id: int
  input_builder: str
  chat_template: str | None = None


TEACHERS: dict[str, TeacherFamily] = {
    # LLaDA2.0-mini: own ~157k tokenizer shipped with the weights; the noised sequence alone.
    "llada2": TeacherFamily(("llada2_moe",), "hf_dir", 156895, "bidirectional"),
    # WeDLM-8B-Instruct: Qwen3-8B architecture, Qwen3 tokenizer with its ChatML template.
    "wedlm": TeacherFamily(("qwen3",), "qwen3", 151665, "bd3lm_x0_first"),
    # A Qwen-family masked-diffusion model trained bidirectionally (the smoke teacher); set
    # teacher.tokenizer and teacher.mask_token_id for the vocabulary it was trained with.
    "qwen_bidirectional": TeacherFamily(("qwen3", "qwen2"), "qwen3", 151669, "bidirectional"),
}


def _family(name: str) -> TeacherFamily:
  if name not in TEACHERS:
    raise ValueError(f"Unknown teacher {name!r}; registered teachers: {', '.join(TEACHERS)}.")
  family = TEACHERS[name]
  if family.input_builder not in inputs_lib.BUILDERS:
    raise ValueError(f"Teacher {name!r} names an unknown input builder {family.input_builder!r}.")
  return family


def _shardings(abstract_model: nnx.Module, mesh: Mesh | None, rules) -> nnx.State | None:
  if mesh is None:
    return None
  return sharding.state_shardings(nnx.state(abstract_model), mesh, rules)


def convert_teacher(
    hf_dir: str,
    out_dir: str,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] = sharding.TEACHER_RULES,
    param_dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: streaming.Progress | None = None,
) -> dict[str, Any]:
  """Streams an HF checkpoint of any registered architecture into ``out_dir`` (orbax)."""
  if param_dtype not in ("bfloat16", "float32"):
    raise ValueError(f"param_dtype must be bfloat16 or float32, got {param_dtype!r}.")
  hf_config = mcfg.read_hf_config(hf_dir)
  arch = architecture_for(hf_config)
  cfg = arch.config_from_hf(hf_config, param_dtype=param_dtype)
  abstract = arch.abstract_model(cfg)
  ckpt = SafetensorsCheckpoint(hf_dir)
  metadata = {
      "model_type": hf_config["model_type"],
      "param_dtype": param_dtype,
      "hf_config": hf_config,
  }
  return streaming.stream_convert(
      abstract,
      ckpt,
      arch.rules(cfg),
      arch.ranges(cfg),
      out_dir,
      shardings=_shardings(abstract, mesh, rules),
      metadata=metadata,
      overwrite=overwrite,
      progress=progress,
  )


def load_teacher(
    section: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] = sharding.TEACHER_RULES,
    progress: streaming.Progress | None = None,
    *,
    block_size: int = 32,
) -> tuple[Teacher, nnx.State]:
  """Loads the teacher a config section describes.

  A checkpoint without a manifest is an error unless ``section.convert_if_missing`` and this
  is the only process: several hosts converting into one directory would race (each
  removes and rewrites it), so multi-host runs need the explicit conversion step first.

  Returns:
    ``(teacher, params)``: the static :class:`Teacher` and its parameters, sharded by
    ``rules`` on ``mesh`` (on one device without a mesh).
  """
  family = _family(section.name)
  if not section.checkpoint:
    raise ValueError(
        f"teacher.checkpoint is empty; set it to the converted orbax directory "
        f"of the {section.name!r} teacher."
    )
  if not (epath.Path(section.checkpoint) / streaming.MANIFEST).exists():
    if not section.convert_if_missing:
      raise ValueError(
          f"{section.checkpoint} holds no converted teacher; convert it once before "
          "training with `launch/prepare.sh CONFIG` (or `python -m tide_jax.convert "
          "--config=CONFIG`), or set teacher.convert_if_missing=True in a single-process run."
      )
    if jax.process_count() > 1:
      raise ValueError(
          f"{section.checkpoint} holds no converted teacher and this run has "
          f"{jax.process_count()} processes, which would all convert into it at once; "
          "convert it first with `launch/prepare.sh CONFIG` on one host."
      )
    if not section.hf_dir:
      raise ValueError(
          f"{section.checkpoint} holds no converted teacher and teacher.hf_dir "
          "is empty; convert with `python -m tide_jax.convert` or set hf_dir."
      )
    convert_teacher(
        section.hf_dir,
        section.checkpoint,
        mesh=mesh,
        rules=rules,
        param_dtype=section.param_dtype,
        overwrite=True,
        progress=progress,
    )
  manifest = streaming.read_manifest(section.checkpoint)
  if manifest["model_type"] not in family.model_types:
    raise ValueError(
        f"{section.checkpoint} holds a {manifest['model_type']!r} model but the "
        f"{section.name!r} teacher expects {', '.join(family.model_types)}."
    )
  teacher, abstract = _describe(
      section, family, manifest["hf_config"], manifest["param_dtype"], mesh, block_size
  )
  model = streaming.load_converted(section.checkpoint, abstract, _shardings(abstract, mesh, rules))
  _, params = nnx.split(model)
  return teacher, params


def _describe(section, family, hf_config, param_dtype, mesh, block_size):
  """The :class:`Teacher` of a section and its abstract module (nothing allocated)."""
  arch = architecture_for(hf_config)
  cfg = arch.config_from_hf(hf_config, param_dtype=param_dtype, dtype=section.dtype)
  cfg = cfg.replace(remat=section.remat, attention_impl=section.attention_impl)
  if hasattr(cfg, "moe_dispatch"):
    cfg = cfg.replace(moe_dispatch=section.moe_dispatch, expert_mesh=mesh)
  abstract = arch.abstract_model(cfg)
  mask_id = family.mask_token_id if section.mask_token_id < 0 else int(section.mask_token_id)
  if mask_id >= cfg.vocab_size:
    raise ValueError(
        f"mask token id {mask_id} is outside the teacher's vocabulary "
        f"({cfg.vocab_size}); set teacher.mask_token_id."
    )
  teacher = Teacher(
      name=section.name,
      config=cfg,
      graphdef=nnx.graphdef(abstract),
      mask_token_id=mask_id,
      input_builder=family.input_builder,
      block_size=int(block_size),
  )
  return teacher, abstract


def abstract_teacher(
    section: ml_collections.ConfigDict,
    hf_config: Mapping[str, Any],
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] = sharding.TEACHER_RULES,
    *,
    block_size: int = 32,
) -> tuple[Teacher, nnx.State]:
  """Like :func:`load_teacher` from an HF ``config.json`` alone, with no weights: the
  teacher and its parameters as ``ShapeDtypeStruct`` leaves carrying their shardings (for
  compiling a step and reading its memory before any checkpoint exists)."""
  teacher, abstract = _describe(
      section, _family(section.name), hf_config, section.param_dtype, mesh, block_size
  )
  state = nnx.state(abstract)
  if mesh is None:
    return teacher, state
  shardings = sharding.state_shardings(state, mesh, rules)
  return teacher, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )
