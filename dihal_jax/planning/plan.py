"""`dihal plan`: per-device memory and paper step times of a config on a topology.

What: for each phase of DiHAL -- `locate` (backbone forward emitting every
candidate layer's states), `train` (lower layers to cache h_l*, then the
bridge train step) and `sample` (bridge sampler + a backbone forward per
readout pass) -- the bytes one device holds: backbone params, bridge params,
optimizer state (AdamW moments + EMA), activations; whether that fits the
device's memory with HEADROOM; a mesh that fits when the config's does not;
and FLOPs per token and tokens/s at an assumed MFU (estimates, not
measurements).

How, without allocating anything:
- Parameters and optimizer state are `jax.eval_shape` trees (the real
  `Decoder`, `UNet`, `init_train_state`) placed by the real rules
  (`param_shardings`, `state_shardings`) on a `jax.sharding.AbstractMesh` of
  the topology's shape; per-device bytes take the ceiling of every sharded
  dimension.
- Backbone activations are a closed form of one scanned block at a time
  (`forward_activations`: residual stream, q/k/v, float32 scores, MLP,
  float32 logits, emitted states) under the FSDP plan XLA picks for it
  (`weights_in_place`: gather the weights, or move the activations).
- Bridge activations are the bytes JAX's autodiff saves for the backward pass
  of the real UNet + loss (`residual_bytes`, from the jaxpr of `jax.vjp`),
  plus gradients and updates; the sampler's working set is bounded by the
  residuals of one forward.
`planning/aot.py` checks these numbers against XLA's own buffer assignment.

Usage:
  report = make_plan(config, get_topology("v5e-8"), config_name="configs/x.py")
  print(summary(report, config))
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Mapping

import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh

from dihal_jax import reports
from dihal_jax.backbone.checkpoint import backbone_config
from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import denoiser
from dihal_jax.bridge.train_step import (OptimConfig, init_train_state, make_optimizer,
                                         objective, state_shardings)
from dihal_jax.bridge.unet import UNet, UNetConfig
from dihal_jax.errors import UserInputError
from dihal_jax.geometry.locate import candidate_layers
from dihal_jax.hybrid.readout import MODES
from dihal_jax.parallel.sharding import MESH_AXES, Rules, logical_to_spec, param_shardings
from dihal_jax.parallel.topology import GIB, Topology, default_mesh
from dihal_jax.planning import aot

HEADROOM = 0.9  # usable share of a device's nominal memory (runtime, fragmentation, GB vs GiB)
MFU = 0.4       # model FLOPs utilization assumed by the paper estimates
PHASES = ("locate", "train", "sample")
PARTS = ("params", "bridge_params", "optimizer", "activations")
F32 = 4


def mesh_for(config: ml_collections.ConfigDict, topology: Topology) -> dict[str, int]:
  """config.mesh_presets[<topology name, '-' -> '_'>], else the topology's default mesh."""
  key = topology.name.replace("-", "_")
  presets = config.get("mesh_presets") or {}
  mesh = dict(presets[key]) if key in presets else default_mesh(topology)
  unknown = set(mesh) - set(MESH_AXES)
  if unknown:
    raise UserInputError(f"config mesh_presets.{key}: axes {sorted(unknown)}, expected only "
                         f"{MESH_AXES}")
  mesh = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
  if math.prod(mesh.values()) != topology.devices or min(mesh.values()) < 1:
    raise UserInputError(f"config mesh_presets.{key}={mesh}: needs {math.prod(mesh.values())} "
                         f"devices, {topology.name} has {topology.devices}")
  return mesh


def abstract_mesh(mesh: Mapping[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(mesh[a] for a in MESH_AXES), MESH_AXES)


def sharded_bytes(shape, dtype, spec, mesh_shape: Mapping[str, int]) -> int:
  """Bytes of one device's shard: every sharded dimension divided, rounded up."""
  size = 1
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size *= -(-dim // math.prod(mesh_shape[a] for a in axes))
  return size * jnp.dtype(dtype).itemsize


def tree_bytes(values, shardings) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs placed by a matching tree of shardings."""
  values, shardings = jax.tree.leaves(values), jax.tree.leaves(shardings)
  assert len(values) == len(shardings), (len(values), len(shardings))
  return sum(sharded_bytes(v.shape, v.dtype, s.spec, s.mesh.shape)
             for v, s in zip(values, shardings))


def _unvar(tree):
  """A State of Variables -> the same tree of their values (shardings / ShapeDtypeStructs)."""
  return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shards(mesh: Mapping[str, int], rules: Rules) -> int:
  """How many ways the `batch` logical axis splits a batch on this mesh."""
  spec = logical_to_spec(("batch",), rules, abstract_mesh(mesh))
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
  return math.prod(mesh[a] for a in axes)


# --- the models, abstract --------------------------------------------------------

class Models:
  """The abstract backbone and bridge of a config (built once, placed on many meshes)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg: BackboneConfig = backbone_config(config)
    self.rules: Rules = tuple(config.logical_axis_rules)
    self.dtype = jnp.dtype(config.model.dtype)
    self.param_dtype = jnp.dtype(config.model.param_dtype)
    cfg = self.cfg
    self.backbone_graphdef, self.backbone = nnx.split(nnx.eval_shape(
        lambda: Decoder(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                        attention=config.model.attention, rngs=nnx.Rngs(0))))
    self.unet_cfg = UNetConfig(**config.bridge.unet.to_dict())
    self.diffusion_cfg = denoiser.diffusion_config(dict(config.bridge.to_dict(), denoiser="unet"))
    self.optimizer = make_optimizer(OptimConfig())  # the state's shapes do not depend on values
    unet_cfg, seed = self.unet_cfg, config.seed
    try:
      self.train_state = jax.eval_shape(lambda: init_train_state(
          UNet(cfg.hidden_size, unet_cfg, rngs=nnx.Rngs(seed)), self.optimizer))
    except ValueError as e:  # the UNet's own checks name the field
      raise UserInputError(f"config bridge.unet: {e}") from None
    self.num_params = sum(x.size for x in jax.tree.leaves(self.backbone))
    self.bridge_params = sum(x.size for x in jax.tree.leaves(self.train_state.params))

  def backbone_shardings(self, mesh: AbstractMesh):
    return _unvar(param_shardings(self.backbone, mesh, self.rules))

  def state_shardings(self, mesh: AbstractMesh):
    return state_shardings(self.train_state, mesh, self.rules, self.optimizer)

  def layer_params(self) -> int:
    """Parameters of one block (all but embedding, head and final norm, over L)."""
    cfg = self.cfg
    outside = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_params - outside - cfg.hidden_size) // cfg.num_layers

  @functools.lru_cache(maxsize=None)
  def bridge_residuals(self, batch: int, length: int, train: bool) -> int:
    """Bytes the UNet's autodiff keeps at this (per-device) batch: the train step's loss
    w.r.t. the params (self-conditioning as in `train_step`), or one forward w.r.t. x_t."""
    state, d, cfg = self.train_state, self.cfg.hidden_size, self.diffusion_cfg
    graphdef, params, rest = state.graphdef, state.params, state.rest
    x = jax.ShapeDtypeStruct((batch, length, d), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

    def loss(p, x_t, t, mask):  # the train step's objective (every example self-conditioned)
      model = nnx.merge(graphdef, p, rest, copy=True)
      return objective(model, x_t, x_t, t, mask, cfg, self_condition=True, x_t=x_t)[0]

    def forward(x_t, p, t, mask):
      return nnx.merge(graphdef, p, rest, copy=True)(x_t, t, mask, x_t)

    try:
      if train:
        return residual_bytes(loss, params, x, t, mask)
      return residual_bytes(forward, x, params, t, mask)
    except ValueError as e:  # e.g. a window the UNet's levels do not divide
      raise UserInputError(f"config data.window / sample.length: {e}") from None


def residual_bytes(fn, primal, *args) -> int:
  """Bytes that `jax.vjp(fn)` saves from fn(primal, *args) for the backward pass.

  Read off the jaxpr of the vjp closure: its outputs are the residuals;
  inputs passed through (params, data) are not counted.
  """
  jaxpr = jax.make_jaxpr(lambda p, *a: jax.vjp(lambda q: fn(q, *a), p)[1])(primal, *args).jaxpr
  inputs = set(jaxpr.invars)
  saved = {v for v in jaxpr.outvars if isinstance(v, jex.core.Var) and v not in inputs}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in saved)


# --- activations -----------------------------------------------------------------

def _dims(models: Models, mesh: Mapping[str, int]) -> dict[str, int]:
  """Per-device widths: heads, KV heads, MLP and vocab divided by `tensor` when it divides
  them (else replicated, as `logical_to_spec` does)."""
  cfg, tp = models.cfg, mesh["tensor"]
  split = lambda n: n // tp if n % tp == 0 else n
  return {"n": split(cfg.num_heads), "k": split(cfg.num_kv_heads),
          "f": split(cfg.intermediate_size), "v": split(cfg.vocab_size)}


def _rows(models: Models, mesh: Mapping[str, int], batch: int) -> tuple[int, int]:
  """(rows per device when the batch is split over the batch shards, rows when every fsdp
  device holds its data shard's whole batch)."""
  shards = batch_shards(mesh, models.rules)
  return -(-batch // shards), -(-batch // max(1, shards // mesh["fsdp"]))


def weights_in_place(models: Models, mesh: Mapping[str, int], batch: int, length: int) -> bool:
  """Whether the blocks keep their FSDP weight shards in place (modelled XLA choice).

  XLA's SPMD partitioner picks per matmul between gathering the weights
  (activations stay split over the batch shards) and keeping them in place:
  then the activations move (all-gathered inputs, float32 partial sums
  all-reduced) and every fsdp device holds its data shard's whole batch. It
  picks the smaller traffic; so does this model, per block: at DiHAL's small
  batches the activations win (the HLO compiled by `planning/aot.py` keeps
  the weights in place), from a few thousand tokens per data shard the weights.
  """
  if mesh["fsdp"] == 1:
    return False
  dims, cfg = _dims(models, mesh), models.cfg
  _, whole = _rows(models, mesh, batch)
  moved = whole * length * (cfg.hidden_size * models.dtype.itemsize + F32 * (
      (dims["n"] + 2 * dims["k"]) * cfg.head_dim + 2 * dims["f"]))
  return moved < models.layer_params() // mesh["tensor"] * models.param_dtype.itemsize


def activation_rows(models: Models, mesh: Mapping[str, int], batch: int, length: int) -> int:
  """Batch rows a device holds in the blocks (see `weights_in_place`)."""
  local, whole = _rows(models, mesh, batch)
  return whole if weights_in_place(models, mesh, batch, length) else local


def forward_activations(models: Models, mesh: Mapping[str, int], *, batch: int, length: int,
                        layers: int, emit: int, head: bool) -> dict[str, int]:
  """Per-device activation bytes of a backbone forward (inference) of a global `batch`.

  The blocks run one at a time in a scan, so the peak is the emitted states +
  the mask/RoPE context + the largest of three stages: embedding; one block
  (residual stream in/out, norm output, and the larger of attention -- q/k/v,
  float32 scores, probabilities, output -- and MLP -- gate/up/hidden/out;
  with FSDP either the current and the prefetched layer's gathered weights,
  or the whole batch's float32 partial sums, per `weights_in_place`); head
  (float32 logits, and either the gathered LM head or the whole batch's
  partial logits plus their all-reduced sum, whichever moves fewer bytes).
  """
  cfg, a, p = models.cfg, models.dtype.itemsize, models.param_dtype.itemsize
  dims, fsdp = _dims(models, mesh), mesh["fsdp"] > 1
  local, whole = _rows(models, mesh, batch)
  t, d, hd, n, k, f, v = (length, cfg.hidden_size, cfg.head_dim, dims["n"], dims["k"],
                          dims["f"], dims["v"])

  def block(b, width):
    resid = b * t * d * width
    attention = b * t * (2 * n + 2 * k) * hd * width + b * n * t * t * (F32 + width)
    mlp = 3 * b * t * f * width + resid
    return 3 * resid + max(attention, mlp)

  in_place = weights_in_place(models, mesh, batch, length)
  rows = whole if in_place else local
  if not fsdp:
    stages = {"block": block(local, a), "embedding": local * t * d * a,
              "head": local * t * (d * a + v * F32)}
  else:
    # The embedding and the head choose like the blocks: move whichever is smaller.
    table = v * d * p
    embed_in_place = whole * t * d * F32 < table
    head_in_place = whole * t * (d * a + v * F32) < table
    stages = {
        "block": block(whole, F32) if in_place else (
            block(local, a) + 2 * models.layer_params() // mesh["tensor"] * p),
        "embedding": whole * t * d * F32 if embed_in_place else local * t * d * a + table,
        "head": (whole * t * (d * a + 2 * v * F32) if head_in_place
                 else local * t * (d * a + v * F32) + table)}
  terms = {"emitted_states": emit * rows * t * d * a,
           "context": rows * t * t + 2 * rows * t * hd * F32,  # key mask (bool), RoPE cos/sin
           "embedding_stage": stages["embedding"],
           "block_stage": stages["block"] if layers else 0,
           "head_stage": stages["head"] if head else 0}
  terms["peak"] = terms["emitted_states"] + terms["context"] + max(
      terms["embedding_stage"], terms["block_stage"], terms["head_stage"])
  return terms


def phase_activations(models: Models, mesh: Mapping[str, int], layer: int) -> dict[str, dict]:
  """Activation terms (per device) of each phase; each has a "peak"."""
  c = models.config
  window, cfg = c.data.window, models.cfg
  per_device = lambda b: -(-b // batch_shards(mesh, models.rules))
  candidates = [0] + candidate_layers(c.locate.layers, cfg.num_layers)

  # locate: the scan emits every state up to the deepest candidate, the candidates are
  # stacked again, cast to float32 and centred, and their d x d scatter is replicated.
  locate = forward_activations(models, mesh, batch=c.locate.batch_size, length=window,
                               layers=max(candidates), emit=max(candidates) + len(candidates),
                               head=False)
  kept = window - (1 if c.locate.exclude_first else 0)
  rows = activation_rows(models, mesh, c.locate.batch_size, window)
  locate["moments"] = (2 * len(candidates) * rows * kept * cfg.hidden_size * F32
                       + len(candidates) * cfg.hidden_size ** 2 * F32)
  locate["peak"] += locate["moments"]

  caching = forward_activations(models, mesh, batch=c.train.batch_size, length=window,
                                layers=layer, emit=layer, head=False)
  b = per_device(c.train.batch_size)
  state_bytes = tree_bytes(models.train_state.params,
                           models.state_shardings(abstract_mesh(mesh)).params)
  step = {"step_residuals": models.bridge_residuals(b, window, True),
          "step_inputs": 4 * b * window * cfg.hidden_size * F32,  # x0, noise, x_t, known
          "step_grads_and_updates": 2 * state_bytes}
  train = {"caching_peak": caching["peak"], **step}
  train["peak"] = max(caching["peak"], sum(step.values()))

  length = c.sample.length or window
  backbone = forward_activations(models, mesh, batch=c.sample.batch, length=length,
                                 layers=cfg.num_layers, emit=0, head=True)
  b = per_device(c.sample.batch)
  sampler = {"sampler_residuals_bound": models.bridge_residuals(b, length, False),
             "sampler_state": 4 * b * length * cfg.hidden_size * F32}  # z, known, x0, h
  sample = {"backbone_peak": backbone["peak"], **sampler}
  sample["peak"] = max(backbone["peak"], sum(sampler.values()))
  return {"locate": locate, "train": train, "sample": sample}


# --- the plan --------------------------------------------------------------------

def planned_layer(config: ml_collections.ConfigDict, num_layers: int) -> int:
  """bridge.layer, or for "auto" the deepest locate candidate (the costliest l*)."""
  spec = str(config.bridge.layer)
  if spec == "auto":
    return max(candidate_layers(config.locate.layers, num_layers))
  try:
    return int(spec)
  except ValueError:
    raise UserInputError(f"bridge.layer={spec!r}: expected 'auto' or a layer number") from None


def memory(models: Models, mesh: Mapping[str, int], layer: int) -> dict:
  """{"per_device_bytes": {phase: {part: bytes, "total"}}, "activation_terms": {...}}."""
  abstract = abstract_mesh(mesh)
  backbone = tree_bytes(models.backbone, models.backbone_shardings(abstract))
  shardings = models.state_shardings(abstract)
  state = models.train_state
  bridge = tree_bytes(state.params, shardings.params)
  optimizer = tree_bytes((state.opt_state, state.ema, state.step),
                         (shardings.opt_state, shardings.ema, shardings.step))
  acts = phase_activations(models, mesh, layer)
  # The sampler holds the EMA params only, replicated (hybrid/bridge_sampler.py).
  ema = models.bridge_params * F32
  parts = {"locate": (backbone, 0, 0), "train": (backbone, bridge, optimizer),
           "sample": (backbone, ema, 0)}
  per_device = {}
  for phase in PHASES:
    row = dict(zip(PARTS, parts[phase] + (acts[phase]["peak"],)))
    row["total"] = sum(row.values())
    per_device[phase] = row
  return {"per_device_bytes": per_device, "activation_terms": acts}


def estimates(models: Models, topology: Topology, layer: int) -> dict:
  """Paper FLOPs per token and tokens/s at MFU (never measured; see the module docstring).

  FLOPs: 2 x N per token for a forward, 6 x N for a train step (+2 x N for the
  self-conditioning pass); N counts matmul weights only (the embedding is a
  gather), attention scores are left out (< 1% at 64-token windows).
  """
  c, cfg = models.config, models.cfg
  window, per_layer = c.data.window, models.layer_params()
  forward = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
  bridge = models.bridge_params
  rate = topology.peak_flops * topology.devices * MFU

  def row(flops_per_token, tokens, **extra):
    return {"flops_per_token": flops_per_token, "tokens": tokens,
            "tokens_per_s": rate / flops_per_token, "seconds": tokens * flops_per_token / rate,
            **extra}

  deepest = max(candidate_layers(c.locate.layers, cfg.num_layers))
  kept = window - (1 if c.locate.exclude_first else 0)
  batches = c.locate.num_tokens // (c.locate.batch_size * kept)
  out = {"mfu": MFU, "peak_flops_per_device": topology.peak_flops,
         "note": f"estimate on paper at {MFU:.0%} MFU, not measured on hardware",
         "locate": row(2 * deepest * per_layer, batches * c.locate.batch_size * window)}
  step_tokens = c.train.batch_size * window
  step_fpt = (6 + (2 if models.unet_cfg.self_condition else 0)) * bridge
  out["train_cache"] = row(2 * layer * per_layer,
                           (c.train.cache_windows + c.train.val_windows) * window)
  out["train_step"] = row(step_fpt, c.train.steps * step_tokens,
                          step_s=step_tokens * step_fpt / rate)
  s = c.sample
  length = s.length or window
  if s.readout not in MODES:
    raise UserInputError(f"sample.readout={s.readout!r}: expected one of {MODES}")
  passes = {"blockwise": -(-(length - 1) // s.block), "lm_head": 1, "refine": 1 + s.rounds,
            "identity": 1}[s.readout]
  backbone = 2 * (layer * per_layer if s.readout == "identity" else forward)
  out["sample"] = row(passes * (s.steps * 2 * bridge + backbone), s.num * length,
                      passes=passes)
  return out


def _fits(per_device: dict, usable: float) -> dict[str, bool]:
  return {phase: row["total"] <= usable for phase, row in per_device.items()}


def meshes(devices: int):
  """Every (data, fsdp, tensor) with data * fsdp * tensor == devices."""
  for data, fsdp in itertools.product(range(1, devices + 1), repeat=2):
    if devices % (data * fsdp) == 0:
      yield {"data": data, "fsdp": fsdp, "tensor": devices // (data * fsdp)}


def suggest(models: Models, topology: Topology, layer: int, usable: float):
  """(mesh or None, advice): the fitting mesh with the least tensor, then the most data
  parallelism (least communication); None when no mesh of these devices fits."""
  best, fitting = None, []
  for mesh in meshes(topology.devices):
    per_device = memory(models, mesh, layer)["per_device_bytes"]
    peak = max(row["total"] for row in per_device.values())
    if best is None or peak < best[1]:
      best = (mesh, peak)
    if all(_fits(per_device, usable).values()):
      fitting.append(mesh)
  if fitting:
    mesh = min(fitting, key=lambda m: (m["tensor"], -m["data"]))
    return mesh, f"use mesh {_mesh_text(mesh)} (fits every phase)"
  mesh, peak = best
  return None, (f"no mesh of {topology.devices} devices fits: the best ({_mesh_text(mesh)}) "
                f"needs {_gib(peak)} per device of {_gib(usable)} usable; use more or larger "
                "devices, or smaller batches (locate.batch_size, train.batch_size, sample.batch)")


def make_plan(config: ml_collections.ConfigDict, topology: Topology, *, config_name: str = "",
              mesh: Mapping[str, int] | None = None, compile: bool = False) -> dict:
  """The plan (JSON-ready): memory per phase on `mesh` (default: the config's preset for
  the topology), fits, a suggested mesh when it does not, the paper estimates, and with
  `compile` XLA's memory analysis of the compiled programs (`planning/aot.py`)."""
  models = Models(config)
  mesh = dict(mesh) if mesh is not None else mesh_for(config, topology)
  layer = planned_layer(config, models.cfg.num_layers)
  usable = HEADROOM * topology.hbm_bytes
  result = memory(models, mesh, layer)
  fits = _fits(result["per_device_bytes"], usable)
  suggested, advice = (None, "fits") if all(fits.values()) else suggest(models, topology,
                                                                       layer, usable)
  shards = batch_shards(mesh, models.rules)
  notes = [f"{name}={value} is not a multiple of the {shards} batch shards: the data loader "
           "will refuse it" for name, value in (("locate.batch_size", config.locate.batch_size),
                                                ("train.batch_size", config.train.batch_size),
                                                ("sample.batch", config.sample.batch))
           if value % shards]
  kept = config.data.window - (1 if config.locate.exclude_first else 0)
  if config.locate.num_tokens < config.locate.batch_size * kept:
    notes.append(f"locate.num_tokens={config.locate.num_tokens} is less than one batch: "
                 "`dihal locate` will refuse it")
  if str(config.bridge.layer) == "auto":
    notes.append(f"bridge.layer=auto: planned at l = {layer}, the deepest candidate")
  report = {
      "config": config_name, "topology": topology.name, "description": topology.description,
      "num_params": models.num_params, "bridge_num_params": models.bridge_params,
      "devices": topology.devices, "hosts": topology.hosts, "mesh": mesh, "interface_layer": layer,
      "hbm_bytes_per_device": topology.hbm_bytes, "headroom": HEADROOM, "usable_bytes": usable,
      **result, "fits_by_phase": fits, "fits": all(fits.values()), "suggested_mesh": suggested,
      "advice": advice,
      "estimates": estimates(models, topology, layer), "notes": notes,
  }
  if compile:
    report["compiled"] = compiled_programs(models, mesh, layer)
  return report


def compiled_programs(models: Models, mesh: Mapping[str, int], layer: int) -> dict:
  """`aot.compile_programs` on the 8-device form of `mesh`, each program beside the plan's
  estimate of its per-device bytes on that same mesh."""
  compiled = aot.compile_programs(models, mesh)
  shape = compiled["mesh"]
  estimated = memory(models, shape, layer)  # the plan on the compile mesh, to compare
  per_device, acts = estimated["per_device_bytes"], estimated["activation_terms"]
  config, cfg = models.config, models.cfg
  programs = compiled["programs"]
  programs["forward"]["estimate_total_bytes"] = per_device["locate"]["params"] + (
      forward_activations(models, shape, batch=config.locate.batch_size,
                          length=config.data.window, layers=cfg.num_layers, emit=0,
                          head=True)["peak"])
  train = per_device["train"]
  programs["train_step"]["estimate_total_bytes"] = (
      train["bridge_params"] + train["optimizer"]
      + sum(v for k, v in acts["train"].items() if k.startswith("step_")))
  return compiled


# --- printing --------------------------------------------------------------------

def _gib(n: float) -> str:
  """Bytes in GiB, or MiB / KiB below 0.1 GiB (tiny test models)."""
  if not n:
    return "0"
  for unit, size in (("GiB", GIB), ("MiB", 2 ** 20)):
    if n >= 0.1 * size:
      return f"{n / size:.2f} {unit}"
  return f"{n / 2 ** 10:.1f} KiB"


def _mesh_text(mesh: Mapping[str, int]) -> str:
  return " ".join(f"{a}={mesh[a]}" for a in MESH_AXES)


def _batches(config: ml_collections.ConfigDict) -> dict[str, str]:
  window = config.data.window
  return {"locate": f"{config.locate.batch_size} x {window}",
          "train": f"{config.train.batch_size} x {window}",
          "sample": f"{config.sample.batch} x {config.sample.length or window}"}


def summary(report: dict, config: ml_collections.ConfigDict) -> str:
  """The plan as text: header, memory table, compile table (if any), estimates."""
  mesh = report["mesh"]
  lines = [
      f"plan: {report['config'] or 'config'} on {report['topology']} ({report['description']}), "
      f"mesh {_mesh_text(mesh)}",
      f"backbone {report['num_params']:,} params ({config.model.param_dtype}), bridge "
      f"{report['bridge_num_params']:,} params (float32); l = {report['interface_layer']}; "
      f"usable {_gib(report['usable_bytes'])} per device ({report['headroom']:.0%} of "
      f"{_gib(report['hbm_bytes_per_device'])})", ""]
  batches = _batches(config)
  rows = []
  for phase in PHASES:
    row = report["per_device_bytes"][phase]
    rows.append([phase, batches[phase], *(_gib(row[p]) for p in PARTS), _gib(row["total"]),
                 "yes" if report["fits_by_phase"][phase] else "**no**"])
  lines.append(reports.markdown_table(
      ["phase", "batch", "params", "bridge params", "optimizer + EMA", "activations",
       "total / device", "fits"], rows))
  compiled = report.get("compiled")
  if compiled:
    lines += ["", f"compiled ({compiled['devices']} CPU devices, mesh "
              f"{_mesh_text(compiled['mesh'])}; {compiled['note']}):"]
    rows = [[name, r["batch"], _gib(r["argument_bytes"]), _gib(r["output_bytes"]),
             _gib(r["temp_bytes"]), _gib(r["generated_code_bytes"]),
             _gib(r["compiled_total_bytes"]), _gib(r["estimate_total_bytes"]),
             f"{r['compile_s']:.1f} s"] for name, r in compiled["programs"].items()]
    lines.append(reports.markdown_table(
        ["program", "batch", "argument", "output", "temp", "code", "compiled total",
         "estimate", "compile"], rows))
  est = report["estimates"]
  rows = [[name, f"{est[name]['flops_per_token']:.3g}", f"{est[name]['tokens']:,}",
           f"{est[name]['tokens_per_s']:,.0f}", f"{est[name]['seconds']:.3g} s"]
          for name in ("locate", "train_cache", "train_step", "sample")]
  lines += ["", f"estimates ({est['note']}; train_step: {est['train_step']['step_s'] * 1e3:.3g} "
            "ms per step):",
            reports.markdown_table(["work", "FLOPs/token", "tokens", "tokens/s", "time"], rows)]
  lines += [f"note: {note}" for note in report["notes"]]
  lines.append("fits: True" if report["fits"] else f"fits: False ({report['advice']})")
  return "\n".join(lines)
