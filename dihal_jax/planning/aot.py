"""`dihal plan --compile`: compile the plan's programs ahead of time on simulated CPU devices.

What: the sharded backbone forward (logits, at locate.batch_size x window)
and the bridge train step (`train_step` with the shardings and donation of
`make_train_step`, at train.batch_size x window) are lowered from
ShapeDtypeStructs carrying their shardings and compiled for an 8-device CPU
mesh (nothing is allocated), and XLA's per-device memory analysis is set
beside the plan's estimate for the same mesh.

Why: the plan is a closed form; compiling proves the 8B programs partition
under the config's rules on the topology's mesh layout, and XLA's buffer
assignment is an independent count of argument, output and temporary bytes.
What it cannot show: XLA:CPU fuses, lays out (TPU pads to tiles) and
schedules (TPU/GPU prefetch FSDP all-gathers) differently from the real
backends, so "temp" is indicative; and a topology with more than 8 devices
compiles on a scaled-down mesh (`compile_mesh`).

The process needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8
before JAX starts (`dihal plan --compile` sets it itself).
"""

from __future__ import annotations

import math
import time
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.bridge.train_step import OptimConfig, jit_train_step
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import MESH_AXES, batch_sharding, make_mesh, param_shardings

DEVICES = 8
XLA_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"


def compile_mesh(mesh: Mapping[str, int]) -> dict[str, int]:
  """The mesh itself when it has at most 8 devices, else halved along its largest axis
  (fsdp first on ties) until it has 8: the same layout, scaled down."""
  mesh = dict(mesh)
  while math.prod(mesh.values()) > DEVICES:
    axis = max(("fsdp", "data", "tensor"), key=lambda a: (mesh[a] % 2 == 0, mesh[a]))
    if mesh[axis] % 2:
      raise UserInputError(f"--compile: cannot scale mesh {mesh} down to {DEVICES} devices")
    mesh[axis] //= 2
  return mesh


def cpu_devices(count: int) -> list[jax.Device]:
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise UserInputError(f"--compile needs {count} CPU devices, this process has "
                         f"{len(devices)}: start it with XLA_FLAGS={XLA_FLAG}")
  return devices[:count]


def _with_shardings(abstract, shardings):
  """Variables of ShapeDtypeStructs -> the same, each carrying its NamedSharding."""
  def place(var, sharding):
    value = var.get_value()
    return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                            sharding=sharding.get_value()))
  return jax.tree.map(place, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes,
         "generated_code_bytes": stats.generated_code_size_in_bytes}
  # Donated (aliased) outputs reuse their argument's buffer.
  out["compiled_total_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                                 - out["alias_bytes"] + out["temp_bytes"])
  return out


def _timed_compile(jitted, *args) -> tuple[dict, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return _memory(compiled), time.perf_counter() - start


def compile_programs(models, mesh: Mapping[str, int]) -> dict:
  """Compiles the forward and the train step on the 8-device CPU form of `mesh`.

  `models`: a `planning.plan.Models` (the abstract backbone and bridge); the plan sets
  its own estimate beside each program (`plan.compiled_programs`).
  """
  config, cfg, rules = models.config, models.cfg, models.rules
  shape = compile_mesh(mesh)
  devices = cpu_devices(math.prod(shape.values()))
  mesh_obj = make_mesh(shape, devices=devices)
  window = config.data.window
  programs = {}

  # The backbone forward (logits), params placed as `init_model` / `load_model` place them.
  batch = config.locate.batch_size
  graphdef = models.backbone_graphdef
  state = _with_shardings(models.backbone, param_shardings(models.backbone, mesh_obj, rules))
  tokens = jax.ShapeDtypeStruct((batch, window), jnp.int32,
                                sharding=batch_sharding(mesh_obj, rules, 2))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens),
                    out_shardings=batch_sharding(mesh_obj, rules, 3))
  memory, seconds = _timed_compile(forward, state, tokens)
  programs["forward"] = {"batch": f"{batch} x {window}", **memory, "compile_s": seconds}

  # The bridge train step, jitted as `make_train_step` jits it (state donated).
  batch = config.train.batch_size
  step, _ = jit_train_step(models.train_state, mesh_obj, rules, models.diffusion_cfg,
                           models.optimizer, OptimConfig(),
                           self_condition_prob=config.train.self_condition_prob)
  x0 = jax.ShapeDtypeStruct((batch, window, cfg.hidden_size), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  memory, seconds = _timed_compile(step, models.train_state, x0, key, None, None, None, None)
  programs["train_step"] = {"batch": f"{batch} x {window}", **memory, "compile_s": seconds}

  same = shape == dict(mesh)
  note = ("the topology's own mesh" if same else
          f"the topology's {math.prod(mesh.values())}-device mesh scaled down to "
          f"{len(devices)} devices with the same layout")
  return {"devices": len(devices), "mesh": {a: shape[a] for a in MESH_AXES}, "same_mesh": same,
          "note": note + "; XLA:CPU buffer assignment, indicative for TPU/GPU",
          "programs": programs}
