"""A trained bridge, ready to sample hidden states h_l (EMA params, inference only).

What: `load_bridge(workdir)` restores the newest checkpoint of `dihal train`
(the denoiser it describes, UNet or transformer, its EMA params, the normalizer, the layer, the
diffusion settings); `TrainedBridge.sample` draws h_l [B, n, d] in the
backbone's own units, with optional known positions (prompt, infill, the
blockwise prefix) and an optional partly-noised start (refine).

Why this way: known positions get their *clean* normalized values both in
x_t and as the UNet's conditioning input, exactly as in training
(bridge/train_step.py); the sampler's own noised re-imposition is replaced
inside the denoiser, since diffusion.py showed it is biased. The jitted
sampler takes the params as arguments (not constants), so one compile serves
every call of a shape.

Usage:
  bridge = load_bridge(workdir)
  h = bridge.sample(key, known_h, known_mask)            # [B, n, d] float32
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.bridge import denoiser, diffusion
from dihal_jax.bridge.checkpoint import read_latest
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
from dihal_jax.errors import UserInputError


@dataclasses.dataclass
class TrainedBridge:
  """The EMA denoiser of a bridge and everything needed to use it."""

  graphdef: nnx.GraphDef
  params: tuple  # (EMA params, the rest of the module state): nnx.merge(graphdef, *params)
  norm: Normalizer
  layer: int
  dim: int
  diffusion: diffusion.DiffusionConfig
  self_condition: bool
  step: int
  train_cache: str | None  # the hidden-state cache it was trained on (identity head)
  factor: int  # window lengths must be multiples of this (the UNet's downsampling)
  kind: str  # "unet" | "transformer"
  params_count: int  # trained parameters of the denoiser
  labels: jax.Array | None = None  # [B] class ids every `sample` is conditioned on (None: none)
  guidance: float = 0.0  # classifier-free guidance weight w with `labels`

  def conditioned(self, labels, guidance: float) -> "TrainedBridge":
    """This bridge sampling toward class `labels` [B] with guidance w: each step's output is
    (1 + w)·out(labels) - w·out(null) (a bridge trained with labels, bridge.unet.num_classes)."""
    return dataclasses.replace(self, labels=jnp.asarray(labels, jnp.int32),
                               guidance=float(guidance))

  def sample(self, key: jax.Array, known_h: jax.Array, known_mask: jax.Array, *,
             steps: int | None = None, x_start: jax.Array | None = None,
             t_start: float = 1.0) -> jax.Array:
    """h_l [B, n, d] float32 (backbone units) with `known_h` kept where known_mask [B, n].

    x_start: a normalized state at t_start (SDEdit / refine), default pure noise.
    """
    cfg = dataclasses.replace(self.diffusion, steps=steps or self.diffusion.steps,
                              guidance=self.guidance)
    return _sample(self.graphdef, self.params, key, jnp.asarray(known_h, jnp.float32),
                   jnp.asarray(known_mask, bool), x_start, self.norm, self.labels, cfg=cfg,
                   self_condition=self.self_condition, t_start=float(t_start))

  def denoise_x0(self, z_t: jax.Array, t: jax.Array, known_mask: jax.Array,
                 z_known: jax.Array) -> jax.Array:
    """The bridge's x0 estimate (normalized units) of z_t at times t [B] (one call)."""
    return _denoise_x0(self.graphdef, self.params, z_t, t, known_mask, z_known,
                       cfg=self.diffusion)


def _model_fn(graphdef, params, cfg, z_known, known_mask):
  model = nnx.merge(graphdef, *params)
  mask = known_mask[..., None]
  known = jnp.where(mask, z_known, 0.0)

  def fn(x_t, t, known_mask_, labels, x0_prev=None):
    del known_mask_
    return model(jnp.where(mask, z_known, x_t), t, known_mask, known, labels, x0_prev)

  return fn


@functools.partial(jax.jit, static_argnames=("cfg", "self_condition", "t_start"))
def _sample(graphdef, params, key, known_h, known_mask, x_start, norm, labels, *,
            cfg, self_condition, t_start):
  z_known = norm.forward(known_h)
  fn = _model_fn(graphdef, params, cfg, z_known, known_mask)
  z = diffusion.sample(fn, key, known_h.shape, cfg, known=z_known, known_mask=known_mask,
                       labels=labels, self_condition=self_condition, x_start=x_start,
                       t_start=t_start)
  return norm.inverse(z)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _denoise_x0(graphdef, params, z_t, t, known_mask, z_known, *, cfg):
  out = _model_fn(graphdef, params, cfg, z_known, known_mask)(z_t, t, known_mask, None)
  x0, _ = diffusion.predict_x0_eps(out, jnp.where(known_mask[..., None], z_known, z_t), t, cfg)
  return x0


def load_bridge(workdir: str | Path, mesh: jax.sharding.Mesh | None = None, *,
                kind: str | None = None) -> TrainedBridge:
  """The newest checkpoint of `dihal train --workdir=workdir` (its EMA params), replicated
  over `mesh` (the backbone's) when given. `kind` (the config's bridge.denoiser): a
  checkpoint of another kind is a UserInputError."""
  built = {}

  def abstract(config: dict, extra: dict):
    stored = (extra.get("denoiser") or {}).get("kind", "unet")
    if kind is not None and stored != kind:
      raise UserInputError(f"{workdir}: its bridge is a {stored} denoiser but "
                           f"bridge.denoiser={kind!r}; use that workdir's setting or retrain")
    t = config["train"]
    model = built["model"] = denoiser.from_description(
        extra.get("denoiser"), config, len(extra["normalizer"]["mean"]),
        Normalizer.from_dict(extra["normalizer"]))
    optim = OptimConfig(lr=t["lr"], warmup_steps=t["warmup_steps"], total_steps=t["steps"],
                        weight_decay=t["weight_decay"], clip_norm=t["clip_norm"],
                        ema_decay=t["ema_decay"])
    state = built["state"] = init_train_state(model, make_optimizer(optim))
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())

  step, restored, extra, config = read_latest(Path(workdir) / "checkpoints", abstract)
  params = (restored["ema"], restored["rest"])
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  model = built["model"]
  return TrainedBridge(graphdef=built["state"].graphdef, params=params,
                       norm=Normalizer.from_dict(extra["normalizer"]), layer=int(extra["layer"]),
                       dim=len(extra["normalizer"]["mean"]),
                       diffusion=denoiser.diffusion_config(config["bridge"]),
                       self_condition=model.cfg.self_condition, step=int(step),
                       train_cache=extra.get("train_cache"), factor=denoiser.factor(model),
                       kind=denoiser.describe(model)["kind"],
                       params_count=denoiser.num_params(model))
