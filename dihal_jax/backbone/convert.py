"""Hugging Face safetensors <-> dihal_jax parameters, tensor by tensor, onto the mesh.

Loading never holds a checkpoint twice: each parameter is created with
`jax.make_array_from_callback`, whose callback reads only the slice a device
owns straight out of the memory-mapped safetensors file (a `safe_open` slice;
bf16 arrives as `ml_dtypes.bfloat16`, no torch involved). Stacked layer
parameters read the per-layer HF tensors of the layers in the device's slice.

The mapping is declarative (MaxText `param_mapping.py` style): `param_map(cfg)`
gives, for every dihal parameter path, the HF key template ("{}" = layer
index) and a `Layout` that says how the two shapes relate. Export inverts it.

Usage:
  model = load_model("path/to/hf_dir", mesh=mesh, rules=rules)
  save_hf_checkpoint(model, "out_dir", max_shard_bytes=2**30)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.model import Decoder
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import Rules, param_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# HF keys that carry no parameter of ours and may be present in a checkpoint.
IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)


# --- layouts: how one HF tensor relates to one of our (per-layer) arrays --------

@dataclasses.dataclass(frozen=True)
class Layout:
  """Shape relation between our array and the HF tensor.

  Attributes:
    hf_shape: our per-layer shape -> HF shape.
    read: (safetensors slice, our index as concrete slices, our shape) -> our array slice.
    to_hf: our full per-layer array -> HF tensor.
  """

  name: str
  hf_shape: Callable[[tuple], tuple]
  read: Callable[[Any, tuple, tuple], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _head_rows(heads: slice, head_dim: int) -> slice:
  return slice(heads.start * head_dim, heads.stop * head_dim)


SAME = Layout("same", lambda s: tuple(s), lambda sl, i, s: sl[i], lambda a: a)
# torch Linear stores [out, in]; we store [in, out].
TRANSPOSE = Layout("transpose", lambda s: tuple(s[::-1]), lambda sl, i, s: sl[i[1], i[0]].T,
                   lambda a: a.T)
# q/k/v: HF [N*H, D] -> ours [D, N, H]; only whole heads are read (head_dim is never sharded).
IN_HEADS = Layout(
    "in_heads", lambda s: (s[1] * s[2], s[0]),
    lambda sl, i, s: sl[_head_rows(i[1], s[2]), i[0]].reshape(
        i[1].stop - i[1].start, s[2], -1)[:, i[2], :].transpose(2, 0, 1),
    lambda a: a.reshape(a.shape[0], -1).T)
# o: HF [D, N*H] -> ours [N, H, D].
OUT_HEADS = Layout(
    "out_heads", lambda s: (s[2], s[0] * s[1]),
    lambda sl, i, s: sl[i[2], _head_rows(i[0], s[1])].reshape(
        -1, i[0].stop - i[0].start, s[1])[:, :, i[1]].transpose(1, 2, 0),
    lambda a: a.reshape(-1, a.shape[-1]).T)
# q/k/v bias: HF [N*H] -> ours [N, H].
BIAS_HEADS = Layout(
    "bias_heads", lambda s: (s[0] * s[1],),
    lambda sl, i, s: sl[_head_rows(i[0], s[1])].reshape(-1, s[1])[:, i[1]],
    lambda a: a.reshape(-1))


def param_map(cfg: BackboneConfig) -> dict[str, tuple[str, Layout]]:
  """dihal parameter path -> (HF key, layout); "{}" in a key is the layer index."""
  layer = "model.layers.{}."
  m = {
      "embed": ("model.embed_tokens.weight", SAME),
      "final_norm/scale": ("model.norm.weight", SAME),
      "layers/input_norm/scale": (layer + "input_layernorm.weight", SAME),
      "layers/post_attn_norm/scale": (layer + "post_attention_layernorm.weight", SAME),
      "layers/attn/q_proj": (layer + "self_attn.q_proj.weight", IN_HEADS),
      "layers/attn/k_proj": (layer + "self_attn.k_proj.weight", IN_HEADS),
      "layers/attn/v_proj": (layer + "self_attn.v_proj.weight", IN_HEADS),
      "layers/attn/o_proj": (layer + "self_attn.o_proj.weight", OUT_HEADS),
      "layers/mlp/gate_proj": (layer + "mlp.gate_proj.weight", TRANSPOSE),
      "layers/mlp/up_proj": (layer + "mlp.up_proj.weight", TRANSPOSE),
      "layers/mlp/down_proj": (layer + "mlp.down_proj.weight", TRANSPOSE),
  }
  if cfg.attention_bias:
    for p in "qkv":
      m[f"layers/attn/{p}_bias"] = (layer + f"self_attn.{p}_proj.bias", BIAS_HEADS)
    m["layers/attn/o_bias"] = (layer + "self_attn.o_proj.bias", SAME)
  if cfg.mlp_bias:
    for p in ("gate", "up", "down"):
      m[f"layers/mlp/{p}_bias"] = (layer + f"mlp.{p}_proj.bias", SAME)
  if cfg.qk_norm:
    m["layers/attn/q_norm/scale"] = (layer + "self_attn.q_norm.weight", SAME)
    m["layers/attn/k_norm/scale"] = (layer + "self_attn.k_norm.weight", SAME)
  if not cfg.tie_word_embeddings:
    m["lm_head"] = ("lm_head.weight", TRANSPOSE)
  return m


def hf_keys(cfg: BackboneConfig) -> list[str]:
  """Every HF tensor name the checkpoint must contain, in export order."""
  keys = []
  for key, _ in param_map(cfg).values():
    keys += [key.format(l) for l in range(cfg.num_layers)] if "{}" in key else [key]
  return keys


# --- reading ------------------------------------------------------------------

class SafetensorsCheckpoint:
  """A local HF checkpoint directory: config.json + one or more safetensors files.

  All files are opened (headers validated, data memory-mapped) up front, so a
  missing shard or a truncated file fails before any array is built.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    config_path = self.directory / "config.json"
    if not config_path.is_file():
      raise UserInputError(f"{config_path}: no config.json in the checkpoint directory")
    try:
      self.hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise UserInputError(f"{config_path}: not valid JSON ({e})") from None
    index_path = self.directory / INDEX_FILE
    if index_path.is_file():
      try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise UserInputError(f"{index_path}: not a safetensors index ({e!r})") from None
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).is_file():
      files, weight_map = [SINGLE_FILE], None
    else:
      raise UserInputError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    self._handles = {}
    for name in files:
      path = self.directory / name
      if not path.is_file():
        raise UserInputError(f"{path}: shard named in {INDEX_FILE} is missing")
      try:
        self._handles[name] = safe_open(str(path), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for bad headers
        raise UserInputError(f"{path}: not a readable safetensors file ({e})") from None
    if weight_map is None:
      weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
    for key, name in weight_map.items():
      if key not in self._handles[name].keys():
        raise UserInputError(f"{self.directory / name}: tensor {key} listed in the index is absent")
    self.weight_map = weight_map

  def slice(self, key: str):
    """The lazy safetensors slice for tensor `key` (index it to read)."""
    return self._handles[self.weight_map[key]].get_slice(key)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.slice(key).get_shape())


def _concrete(index: tuple, shape: tuple) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _check_keys(ckpt: SafetensorsCheckpoint, cfg: BackboneConfig):
  expected = set(hf_keys(cfg))
  present = set(ckpt.weight_map)
  missing = sorted(expected - present)
  if missing:
    raise UserInputError(f"{ckpt.directory}: tensor {missing[0]} is missing "
                         f"({len(missing)} missing in all)")
  extra = sorted(k for k in present - expected
                 if not k.endswith(IGNORED_HF_KEYS) and not (cfg.tie_word_embeddings
                                                             and k == "lm_head.weight"))
  if extra:
    raise UserInputError(f"{ckpt.directory}: unexpected tensor {extra[0]} for a "
                         f"{cfg.model_type} config ({len(extra)} unexpected in all)")


def load_model(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh, rules: Rules,
               dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto") -> Decoder:
  """Builds a `Decoder` from an HF checkpoint directory, each param born sharded on `mesh`;
  `attention` is its kernel (a `model.attention` value)."""
  ckpt = SafetensorsCheckpoint(directory)
  try:
    cfg = BackboneConfig.from_hf_config(ckpt.hf_config)
  except UserInputError as e:
    raise UserInputError(f"{ckpt.directory / 'config.json'}: {e}") from None
  _check_keys(ckpt, cfg)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                            attention=attention, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = param_shardings(state, mesh, rules)
  mapping = param_map(cfg)
  flat = dict(nnx.to_flat_state(state))
  flat_shardings = dict(nnx.to_flat_state(shardings))
  for path, var in flat.items():
    name = "/".join(str(p) for p in path)
    hf_key, layout = mapping[name]
    stacked = name.startswith("layers/")
    shape = tuple(var.shape)
    layer_shape = shape[1:] if stacked else shape
    for key in ([hf_key.format(l) for l in range(cfg.num_layers)] if stacked else [hf_key]):
      want, got = layout.hf_shape(layer_shape), ckpt.shape(key)
      if got != want:
        raise UserInputError(f"{ckpt.directory}: tensor {key} has shape {list(got)}, "
                             f"the config implies {list(want)}")

    def read(index, hf_key=hf_key, layout=layout, stacked=stacked, shape=shape,
             layer_shape=layer_shape):
      index = _concrete(index, shape)
      if not stacked:
        return np.asarray(layout.read(ckpt.slice(hf_key), index, layer_shape), param_dtype)
      layers = range(index[0].start, index[0].stop)
      return np.stack([np.asarray(layout.read(ckpt.slice(hf_key.format(l)), index[1:],
                                              layer_shape), param_dtype) for l in layers])

    var.set_value(jax.make_array_from_callback(shape, flat_shardings[path].get_value(), read))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --- writing ------------------------------------------------------------------

def _host_array(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: Decoder, dtype: str | None = None):
  """Yields (HF key, numpy tensor) one at a time, in `hf_keys` order."""
  cfg = model.cfg
  np_dtype = jnp.dtype(dtype or cfg.dtype)
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for name, (hf_key, layout) in param_map(cfg).items():
    array = state[tuple(name.split("/"))].get_value()
    if "{}" in hf_key:
      for l in range(cfg.num_layers):
        yield hf_key.format(l), np.ascontiguousarray(layout.to_hf(_host_array(array[l]))).astype(np_dtype)
    else:
      yield hf_key, np.ascontiguousarray(layout.to_hf(_host_array(array))).astype(np_dtype)


def save_hf_checkpoint(model: Decoder, directory: str | os.PathLike, *,
                       max_shard_bytes: int = 2 * 2**30, dtype: str | None = None,
                       extra_files: tuple[str | os.PathLike, ...] = ()) -> Path:
  """Writes config.json + safetensors (sharded with an index past `max_shard_bytes`).

  Tensors are gathered one at a time and at most one shard is held in host
  memory. The directory appears atomically (written under a temporary name,
  then renamed). Only process 0 writes. `extra_files` (e.g. tokenizer files)
  are copied alongside.
  """
  directory = Path(directory)
  writer = jax.process_index() == 0
  tmp = None
  if writer:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  shard: dict[str, np.ndarray] = {}
  shard_bytes, total = 0, 0
  parts: list[list[str]] = []

  def flush():
    if writer:
      save_file(shard, str(tmp / f"part-{len(parts)}"), metadata={"format": "pt"})
    parts.append(list(shard))
    shard.clear()

  for key, tensor in iter_hf_tensors(model, dtype):
    if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
      flush()
      shard_bytes = 0
    shard[key] = tensor
    shard_bytes += tensor.nbytes
    total += tensor.nbytes
  flush()
  if not writer:
    return directory
  n = len(parts)
  names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                        for i in range(n)]
  for i, name in enumerate(names):
    os.rename(tmp / f"part-{i}", tmp / name)
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[i] for i, keys in enumerate(parts) for k in keys}}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
  (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf_config(), indent=2))
  for extra in extra_files:
    shutil.copy(extra, tmp / Path(extra).name)
  if directory.exists():
    shutil.rmtree(directory)
  os.rename(tmp, directory)
  return directory


def compare_checkpoints(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict:
  """Tensor-by-tensor bitwise comparison of two HF checkpoints (dtype, shape, bytes)."""
  a, b = SafetensorsCheckpoint(dir_a), SafetensorsCheckpoint(dir_b)
  cfg = BackboneConfig.from_hf_config(a.hf_config)
  differ = []
  for key in hf_keys(cfg):
    x, y = a.slice(key)[:], b.slice(key)[:]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      differ.append(key)
  return {"tensors": len(hf_keys(cfg)), "differing": differ, "bit_identical": not differ}
