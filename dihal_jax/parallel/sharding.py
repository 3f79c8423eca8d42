"""One device mesh with axes (data, fsdp, tensor) and MaxText-style logical-axis rules.

Parameters and activations are annotated with *logical* axis names ("embed",
"mlp", "vocab", ...). The rules (a config field, never hard-coded in models)
map each logical name to a mesh axis, a tuple of mesh axes, or None
(replicated). The same model code therefore runs on 1 CPU, 8 simulated CPU
devices, a TPU slice or a GPU node by changing only the config.

Usage:
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  sharding = named_sharding(mesh, ("embed", "mlp"), rules, shape=(576, 1536))
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dihal_jax.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: FSDP shards the model dimension of every weight, tensor
# parallelism splits heads / MLP / vocab, batches go over data x fsdp.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # The bridge UNet (~15M params) is replicated: data parallelism only.
    ("channels", None),
    ("channels_out", None),
    ("conv_taps", None),
    ("time_embed", None),
    ("time_embed_out", None),
    ("classes", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one axis may be -1 (all remaining devices).

  A mesh with no -1 axis that needs fewer devices than exist uses the first
  ones (with a warning), e.g. {"data": 1} for a single-device run.
  """
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserInputError(f"mesh axes {sorted(unknown)}: expected only {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if any(s < 1 and s != -1 for s in sizes):
    raise UserInputError(f"mesh {dict(shape)}: axis sizes must be positive (or one -1)")
  if sizes.count(-1) > 1:
    raise UserInputError(f"mesh {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserInputError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) < len(devices):
    logging.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, sizes)),
                    math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  if math.prod(sizes) != len(devices):
    raise UserInputError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"found {len(devices)}")
  # Topology-aware device order on TPU/GPU (ICI rings), plain order on CPU.
  return Mesh(mesh_utils.create_device_mesh(sizes, devices), MESH_AXES)


def mesh_and_rules(config) -> tuple[Mesh, Rules]:
  """The mesh of `config.mesh` and the rules of `config.logical_axis_rules` (an ml_collections
  config built on `defaults.base()`)."""
  return make_mesh(config.mesh.to_dict()), tuple(config.logical_axis_rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (first dimension wins), and a
  dimension not divisible by its mesh axes' size is replicated instead (e.g.
  3 KV heads on a tensor axis of 2), so every rule set yields a valid sharding.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and shape is not None and shape[dim] % size:
      logging.debug("replicating dim %d (%s, size %d) not divisible by %s", dim, name,
                    shape[dim], axes)
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for an array with the given logical axis names."""
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Batch dimension over the `batch` logical axis (data x fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedSharding per parameter from its `logical_axes` (stacked ones get "layers" first)."""

  def sharding(path, var):
    names = tuple(var.get_metadata()["logical_axes"])
    if getattr(path[0], "key", None) == "layers":
      names = ("layers",) + names
    if len(names) != var.ndim:
      raise ValueError(f"{jax.tree_util.keystr(path)}: logical axes {names} vs shape {var.shape}")
    return var.replace(named_sharding(mesh, names, rules, var.shape))

  return jax.tree_util.tree_map_with_path(sharding, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_global(tree, shardings):
  """`jax.device_put(tree, shardings)` that also works when the shardings span processes.

  Every process must hold the same values (a seeded init, a restored checkpoint, a
  broadcast constant). With one process this is a plain device_put; with several,
  each leaf goes through the host so every process places its addressable shards
  (device_put refuses a device-resident array for non-addressable devices).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)

  return jax.tree.map(put, tree, shardings)
