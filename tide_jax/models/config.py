"""Model configuration read from a HuggingFace ``config.json``, plus the dtype policy.

Every size comes from the checkpoint's own config; nothing about a particular model is
hard-coded here. Unsupported features (sliding windows, scaled RoPE variants, unknown
architectures) are refused with one sentence instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp
from absl import logging
from etils import epath

DENSE_MODEL_TYPES = ("qwen3", "qwen2")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# How attention is computed (tide_jax.models.attention): "xla" is the dense reference,
# "blocked" skips fully masked tiles of a static mask on any backend, "cudnn" is the fused
# cuDNN kernel (NVIDIA GPUs), "splash" the Pallas block-sparse kernel (TPUs).
ATTENTION_IMPLS = ("xla", "blocked", "cudnn", "splash")
# What each layer keeps for the backward pass (tide_jax.models.layers.remat_policy): "none"
# keeps everything, "full" recomputes the whole layer, the others save some results.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_attention",
)


def remat_policy_name(value: bool | str) -> str:
  """The remat policy name for a config value; the old booleans map to "full" / "none"."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in REMAT_POLICIES:
    raise ValueError(
        f"Unknown remat policy {value!r}; use one of {', '.join(REMAT_POLICIES)} "
        "(True and False still mean full and none)."
    )
  return value


def check_attention_impl(name: str) -> str:
  """Returns ``name`` if it is a known attention implementation, else raises ValueError."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(
        f"Unknown attention implementation {name!r}; use one of {', '.join(ATTENTION_IMPLS)}."
    )
  return name


def resolve_dtype(name: str | Any) -> Any:
  """Maps a dtype name ("float32", "bfloat16") to a jnp dtype; passes dtypes through."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of a dense Qwen2/Qwen3 decoder.

  ``param_dtype`` is how parameters are stored; ``dtype`` is the computation dtype
  (activations and matmul inputs). Norms, softmax statistics and RoPE tables are float32.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float
  rms_norm_eps: float
  tie_word_embeddings: bool
  qk_norm: bool
  qkv_bias: bool
  o_bias: bool
  partial_rotary_factor: float = 1.0
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"  # a REMAT_POLICIES name; True / False are read as "full" / "none"
  attention_impl: str = "xla"  # an ATTENTION_IMPLS name

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy_name(self.remat))
    check_attention_impl(self.attention_impl)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  def with_dtypes(self, param_dtype: str, dtype: str) -> "DecoderConfig":
    resolve_dtype(param_dtype)
    resolve_dtype(dtype)
    return dataclasses.replace(self, param_dtype=param_dtype, dtype=dtype)

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def to_hf_dict(self) -> dict[str, Any]:
    """The ``config.json`` contents: every field ``transformers``' Qwen2/Qwen3 classes read.

    Written explicitly, with no reliance on transformers' defaults: in particular
    ``head_dim``, which a Qwen2 config without it would derive as hidden_size / heads.
    """
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    if self.partial_rotary_factor != 1.0:
      raise ValueError(
          f"This {self.model_type} model rotates only part of each head "
          f"(partial_rotary_factor={self.partial_rotary_factor}), which transformers' "
          f"{arch} does not support; it cannot be exported as an HF checkpoint."
      )
    bias = (self.qkv_bias, self.o_bias)
    if bias != ((True, False) if self.model_type == "qwen2" else (self.qkv_bias, self.qkv_bias)):
      raise ValueError(
          f"A {self.model_type} model with qkv_bias={self.qkv_bias} and o_bias={self.o_bias} "
          f"has no {arch} equivalent in transformers; it cannot be exported as an HF checkpoint."
      )
    out = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rope_theta": self.rope_theta,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": self.num_layers,
        "layer_types": ["full_attention"] * self.num_layers,
        "pad_token_id": None,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "dtype": self.param_dtype,
        "torch_dtype": self.param_dtype,
    }
    if self.model_type == "qwen3":
      out["attention_bias"] = self.qkv_bias
    return out


def _rope_settings(hf: Mapping[str, Any]) -> tuple[float, float]:
  """(rope_theta, partial_rotary_factor) from either the transformers-5 or the older layout."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", None):
    raise ValueError(
        f"RoPE type {rope_type!r} is not supported; only the default (unscaled) RoPE is "
        "implemented; remove rope_scaling from config.json or add the variant."
    )
  theta = rope.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise ValueError(
        "config.json has no RoPE base; expected rope_parameters.rope_theta " "or rope_theta."
    )
  factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  return float(theta), float(factor)


def decoder_config_from_hf(
    hf: Mapping[str, Any], *, param_dtype: str = "float32", dtype: str = "float32"
) -> DecoderConfig:
  """Builds a :class:`DecoderConfig` from the parsed ``config.json`` of a Qwen2/Qwen3 model."""
  model_type = hf.get("model_type")
  if model_type not in DENSE_MODEL_TYPES:
    raise ValueError(
        f"Unsupported architecture model_type={model_type!r} for the dense decoder; "
        f"supported: {', '.join(DENSE_MODEL_TYPES)}."
    )
  required = (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
  )
  missing = [k for k in required if k not in hf]
  if missing:
    raise ValueError(f"config.json lacks required keys: {', '.join(missing)}.")
  if hf.get("use_sliding_window", False):
    raise ValueError(
        "Sliding-window attention is not supported; set use_sliding_window "
        "to false in config.json."
    )
  hidden_act = hf.get("hidden_act", "silu")
  if hidden_act != "silu":
    raise ValueError(
        f"Only the SwiGLU (silu) MLP is supported, config.json has " f"hidden_act={hidden_act!r}."
    )
  num_heads = int(hf["num_attention_heads"])
  theta, partial = _rope_settings(hf)
  if partial != 1.0:
    # transformers' Qwen2/Qwen3 RoPE rotates the whole head whatever this field says; reading
    # it would make the logits differ from the reference implementation (and from exports).
    logging.warning(
        "config.json sets partial_rotary_factor=%s; transformers ignores it for model_type "
        "%r and rotates the whole head, and so does tide_jax.",
        partial,
        model_type,
    )
    partial = 1.0
  head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
  is_qwen3 = model_type == "qwen3"
  eos = hf.get("eos_token_id")
  if isinstance(eos, list):
    eos = eos[0]
  return DecoderConfig(
      model_type=model_type,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      intermediate_size=int(hf["intermediate_size"]),
      rope_theta=theta,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qk_norm=is_qwen3,
      qkv_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else True,
      o_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else False,
      partial_rotary_factor=partial,
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=eos,
      param_dtype=param_dtype,
      dtype=dtype,
  )


def read_hf_config(model_dir: str) -> dict[str, Any]:
  """Reads ``config.json`` from a local or remote (``gs://``) HF model directory."""
  path = epath.Path(model_dir)
  if not path.exists():
    raise FileNotFoundError(
        f"HF model directory {model_dir} does not exist; pass the "
        "directory that holds config.json and the safetensors files."
    )
  config_path = path / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(
        f"{model_dir} has no config.json; pass an HF model directory " "saved with save_pretrained."
    )
  try:
    config = json.loads(config_path.read_text())
  except ValueError as err:
    raise ValueError(
        f"{config_path} is not valid JSON ({err}); repair it or download the model again."
    ) from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_path} holds no JSON object; download the model again.")
  return config
