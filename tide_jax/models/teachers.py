"""Teacher registry: architectures, teacher families, conversion and sharded loading.

An *architecture* says how to read a ``config.json`` and which module and name map serve
it (``ARCHITECTURES``, keyed by ``model_type``). A *teacher family* (``TEACHERS``) is
(architecture, tokenizer spec, chat template, mask token id, input builder); its checkpoint
path comes from the configuration. Adding a third family is one module + one name map +
one entry in each table.

Training code::

  section = teacher_config("llada2", checkpoint="gs://bucket/llada2_orbax")
  teacher = load_teacher(section, mesh)              # sharded, frozen, bf16
  inputs = teacher.build_inputs(x0, masked, valid, block_size)
  logits = teacher.apply(teacher.params, inputs.input_ids, inputs.position_ids,
                         inputs.attention_mask)       # [b, L', V] float32
  predictions = logits[:, inputs.prediction_offset:inputs.prediction_offset + L]

``apply`` is a pure function of ``params`` (jit it, or call it inside the jitted step with
the params as an argument under ``jax.lax.stop_gradient``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from tide_jax.convert import llada2 as llada2_map
from tide_jax.convert import qwen as qwen_map
from tide_jax.convert import streaming
from tide_jax.convert.safetensors_io import SafetensorsCheckpoint
from tide_jax.distill import teacher_inputs
from tide_jax.models import config as mcfg
from tide_jax.models import dense, llada2
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


def teacher_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A teacher configuration section with every field present.

  Fields: ``name`` (a key of TEACHERS), ``checkpoint`` (converted orbax directory, local
  or gs://), ``hf_dir`` (HF directory converted into ``checkpoint`` when that has no
  manifest yet; also the tokenizer source of "hf_dir" families), ``tokenizer`` /
  ``chat_template`` / ``mask_token_id`` (overrides; empty or -1 = the family's),
  ``param_dtype`` (storage dtype when converting), ``dtype`` (compute dtype),
  ``moe_dispatch`` ("auto", "ragged", "tiled" or "dense"; MoE teachers only), ``remat``
  (a remat policy name as for ``model.remat``) and ``attention_impl`` (as for
  ``model.attention_impl``).
  """
  section = ml_collections.ConfigDict(
      {
          "name": name,
          "checkpoint": "",
          "hf_dir": "",
          "tokenizer": "",
          "chat_template": "",
          "mask_token_id": -1,
          "param_dtype": "bfloat16",
          "dtype": "bfloat16",
          "moe_dispatch": "auto",
          # Typed `object`: the old booleans (True / False = "full" / "none") still load.
          "remat": ml_collections.FieldReference("none", field_type=object),
          "attention_impl": "xla",
      }
  )
  section.update(overrides)
  return section


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded, frozen teacher. ``params`` are sharded; the methods are pure in ``params``."""

  name: str
  family: TeacherFamily
  config: Any
  graphdef: Any
  params: nnx.State
  mask_token_id: int
  tokenizer_spec: str
  chat_template: str | None

  def model(self, params: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def apply(
      self, params: nnx.State, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array
  ) -> jax.Array:
    """Logits ``[b, L', V]`` float32."""
    return self.model(params)(input_ids, positions, attention_mask)

  def hidden_states(self, params, input_ids, positions, attention_mask) -> jax.Array:
    """Final hidden states ``[b, L', E]`` (for chunked logit computations)."""
    return self.model(params).hidden_states(input_ids, positions, attention_mask)

  def logits(self, params, hidden: jax.Array) -> jax.Array:
    """Output projection of (a slice of) hidden states ``[..., E] -> [..., V]``."""
    return self.model(params).logits(hidden)

  def build_inputs(self, clean_ids, masked, valid, block_size: int) -> teacher_inputs.TeacherInputs:
    """This family's input: ``clean_ids`` with ``masked`` positions set to the mask token
    (see ``tide_jax.distill.teacher_inputs``); predictions start at ``prediction_offset``."""
    return teacher_inputs.build(
        self.family.input_builder,
        clean_ids,
        masked,
        valid,
        block_size=block_size,
        mask_token_id=self.mask_token_id,
    )

  def tokenizer(self):
    from tide_jax.data import tokenizers  # imported lazily: heavy and not needed for logits

    return tokenizers.get_tokenizer(self.tokenizer_spec, self.chat_template)


def _family(name: str) -> TeacherFamily:
  if name not in TEACHERS:
    raise ValueError(f"Unknown teacher {name!r}; registered teachers: {', '.join(TEACHERS)}.")
  family = TEACHERS[name]
  if family.input_builder not in teacher_inputs.BUILDERS:
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
) -> Teacher:
  """Loads (converting first when needed) the teacher a config section describes."""
  family = _family(section.name)
  if not section.checkpoint:
    raise ValueError(
        f"teacher.checkpoint is empty; set it to the converted orbax directory "
        f"of the {section.name!r} teacher."
    )
  if not (epath.Path(section.checkpoint) / streaming.MANIFEST).exists():
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
  arch = architecture_for(manifest["hf_config"])
  cfg = arch.config_from_hf(
      manifest["hf_config"], param_dtype=manifest["param_dtype"], dtype=section.dtype
  )
  cfg = cfg.replace(remat=section.remat, attention_impl=section.attention_impl)
  if hasattr(cfg, "moe_dispatch"):
    cfg = cfg.replace(moe_dispatch=section.moe_dispatch, expert_mesh=mesh)
  abstract = arch.abstract_model(cfg)
  model = streaming.load_converted(section.checkpoint, abstract, _shardings(abstract, mesh, rules))
  graphdef, params = nnx.split(model)
  mask_id = family.mask_token_id if section.mask_token_id < 0 else int(section.mask_token_id)
  if mask_id >= cfg.vocab_size:
    raise ValueError(
        f"mask token id {mask_id} is outside the teacher's vocabulary "
        f"({cfg.vocab_size}); set teacher.mask_token_id."
    )
  spec = section.tokenizer or (section.hf_dir if family.tokenizer == "hf_dir" else family.tokenizer)
  return Teacher(
      section.name,
      family,
      cfg,
      graphdef,
      params,
      mask_id,
      spec,
      section.chat_template or family.chat_template,
  )
