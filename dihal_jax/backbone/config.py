"""Backbone hyperparameters, read from and written to a Hugging Face `config.json`.

Usage:
  cfg = BackboneConfig.from_hf_config(json.load(open("config.json")))
  hf_dict = cfg.to_hf_config()

Supported: `model_type` "llama" (Llama 2/3/3.1/3.2, SmolLM2) and "qwen3".
Anything the model code does not implement raises `UserInputError` naming the
field, so an unsupported checkpoint fails before any weight is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dihal_jax.errors import UserInputError

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """RoPE frequency scaling of Llama 3.1 (HF `rope_type: llama3`)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Architecture of a decoder-only transformer; field names follow HF where they exist."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  rope_scaling: Llama3RopeScaling | None = None
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  dtype: str = "float32"  # dtype the checkpoint was saved in
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UserInputError(
          f"config field model_type={self.model_type!r}: expected one of {SUPPORTED_MODEL_TYPES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise UserInputError(f"config field {name}={getattr(self, name)}: expected > 0")
    if self.num_heads % self.num_kv_heads:
      raise UserInputError(
          f"config fields num_attention_heads={self.num_heads}, num_key_value_heads="
          f"{self.num_kv_heads}: heads must be a multiple of kv heads")

  @property
  def num_params(self) -> int:
    """Parameter count (tied head counted once)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += h * (2 * self.num_kv_heads + self.num_heads) + d
    mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
    norms = 2 * d + (2 * h if self.qk_norm else 0)
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * (attn + mlp + norms) + d + head

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> "BackboneConfig":
    """Builds the config from a parsed HF `config.json` (transformers 4.x or 5.x form)."""
    if not isinstance(hf, Mapping):
      raise UserInputError(f"config: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UserInputError(
          f"config field model_type={model_type!r}: expected one of {SUPPORTED_MODEL_TYPES}")
    _expect(hf, "hidden_act", ("silu",))
    if hf.get("pretraining_tp", 1) != 1:
      raise UserInputError(f"config field pretraining_tp={hf['pretraining_tp']}: expected 1")
    if model_type == "qwen3":
      if hf.get("use_sliding_window", False):
        raise UserInputError("config field use_sliding_window=true: sliding-window attention "
                             "is not supported (expected false)")
      kinds = set(hf.get("layer_types") or ["full_attention"])
      if kinds != {"full_attention"}:
        raise UserInputError(f"config field layer_types={sorted(kinds)}: expected only "
                             "'full_attention'")
    num_heads = _positive_int(hf, "num_attention_heads")
    hidden = _positive_int(hf, "hidden_size")
    num_kv_heads = (num_heads if hf.get("num_key_value_heads") is None
                    else _positive_int(hf, "num_key_value_heads"))
    head_dim = (hidden // num_heads if hf.get("head_dim") is None
                else _positive_int(hf, "head_dim"))
    rope_theta, scaling = _rope_from_hf(hf)
    return cls(
        model_type=model_type,
        vocab_size=_positive_int(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive_int(hf, "intermediate_size"),
        num_layers=_positive_int(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(_required(hf, "rms_norm_eps"), "rms_norm_eps"),
        rope_theta=rope_theta,
        max_position_embeddings=_positive_int(hf, "max_position_embeddings"),
        rope_scaling=scaling,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        dtype=_dtype_from_hf(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The transformers-5 `config.json` dict for this architecture."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
              **dataclasses.asdict(self.rope_scaling)}
    hf = {
        "architectures": ["Qwen3ForCausalLM" if self.model_type == "qwen3" else "LlamaForCausalLM"],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias,
        "dtype": self.dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type == "llama":
      hf["mlp_bias"] = self.mlp_bias
    return hf


def _required(hf: Mapping[str, Any], key: str):
  if hf.get(key) is None:
    raise UserInputError(f"config field {key} is missing")
  return hf[key]


def _positive_int(hf: Mapping[str, Any], key: str, field: str | None = None) -> int:
  value = _required(hf, key)
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
      or not float(value).is_integer()):
    raise UserInputError(f"config field {field or key}={value!r}: expected a positive integer")
  return int(value)


def _number(value, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise UserInputError(f"config field {field}={value!r}: expected a number")
  return float(value)


def _expect(hf: Mapping[str, Any], key: str, allowed: tuple):
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise UserInputError(f"config field {key}={value!r}: expected one of {allowed}")


def _first(value):
  if isinstance(value, (list, tuple)):
    return value[0] if value else None
  return value


def _dtype_from_hf(hf: Mapping[str, Any]) -> str:
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserInputError(f"config field dtype={dtype!r}: expected float32, bfloat16 or float16")
  return dtype


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  """Reads RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
  field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  if not isinstance(hf.get(field) or {}, Mapping):
    raise UserInputError(f"config field {field}={hf[field]!r}: expected an object")
  params = dict(hf.get(field) or {})
  theta = params.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise UserInputError("config field rope_theta is missing (neither in rope_parameters nor "
                         "at top level)")
  theta = _number(theta, "rope_theta")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UserInputError(
        f"config field {field}.rope_type={rope_type!r}: expected one of {SUPPORTED_ROPE_TYPES}")
  if rope_type == "default":
    return theta, None
  missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings") if k not in params]
  if missing:
    raise UserInputError(f"config field {field} (rope_type llama3) lacks {', '.join(missing)}")
  return theta, Llama3RopeScaling(
      factor=_number(params["factor"], f"{field}.factor"),
      low_freq_factor=_number(params["low_freq_factor"], f"{field}.low_freq_factor"),
      high_freq_factor=_number(params["high_freq_factor"], f"{field}.high_freq_factor"),
      original_max_position_embeddings=_positive_int(
          params, "original_max_position_embeddings", f"{field}.original_max_position_embeddings"))
