"""The proposal side of DGLM: Gaussian diffusion over the continuation's sentence latent,
conditioned on the prefix's latent, steered by classifier-free and classifier guidance.

The latent (unit norm, d = 384) is scaled by sqrt(d) so each coordinate has unit variance,
the scale the noise schedule assumes. The denoiser is a residual MLP (input: x_t, the
prefix latent or zeros, a sinusoidal embedding of t) predicting x0; schedule, loss and the
DDIM sampler are the bridge's (bridge/diffusion.py) on [B, 1, d] arrays. The prefix is
dropped with probability `cond_dropout` in training, which gives the unconditional model
classifier-free guidance needs (guidance weight w on the prefix). Attribute control adds
s * grad log p(target | x0_hat) of the latent classifiers to each x0 estimate (x0-space
classifier guidance: the classifiers were fit on clean latents, and x0_hat is a clean
latent's estimate).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dihal_jax.bridge import diffusion
from dihal_jax.bridge.train_step import T_MIN, OptimConfig, TrainState, apply_gradients
from dihal_jax.dglm.attributes import LatentClassifier

TIME_FEATURES = 128


def time_features(t: jax.Array) -> jax.Array:
  """[B] in [0, 1] -> [B, TIME_FEATURES] sinusoids of 1000 t (periods 1..10^4)."""
  half = TIME_FEATURES // 2
  freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / half)
  angles = 1000.0 * t[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ResidualBlock(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class LatentDenoiser(nnx.Module):
  """(x_t [B, 1, d], t [B], prefix latent [B, d] scaled, use_prefix [B] bool) -> x0 [B, 1, d]."""

  def __init__(self, dim: int, *, width: int, blocks: int, rngs: nnx.Rngs):
    self.embed = nnx.Linear(2 * dim + TIME_FEATURES, width, rngs=rngs)
    self.blocks = nnx.List([ResidualBlock(width, rngs=rngs) for _ in range(blocks)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, dim, rngs=rngs)

  def __call__(self, x_t, t, prefix, use_prefix):
    cond = jnp.where(use_prefix[:, None], prefix, 0.0)
    h = self.embed(jnp.concatenate([x_t[:, 0], cond, time_features(t)], axis=-1))
    for block in self.blocks:
      h = block(h)
    return self.out(self.norm(h))[:, None]


def scaled(latent: jax.Array) -> jax.Array:
  return latent * jnp.sqrt(latent.shape[-1])


def unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "optim_cfg", "cond_dropout"),
                   donate_argnums=(0,))
def train_step(state: TrainState, continuation: jax.Array, prefix: jax.Array, key: jax.Array,
               *, cfg: diffusion.DiffusionConfig, optimizer: optax.GradientTransformation,
               optim_cfg: OptimConfig, cond_dropout: float):
  """One AdamW step on the x0 (cfg.prediction) loss; latents [B, d] unit norm."""
  k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, state.step), 3)
  b = continuation.shape[0]
  x0 = scaled(continuation)[:, None]
  t = jax.random.uniform(k_t, (b,), minval=T_MIN, maxval=1.0)
  noise = jax.random.normal(k_noise, x0.shape)
  x_t = diffusion.q_sample(x0, t, noise, cfg.schedule)
  use = ~jax.random.bernoulli(k_drop, cond_dropout, (b,))

  def loss_fn(params):
    model = nnx.merge(state.graphdef, params, state.rest)
    out = model(x_t, t, scaled(prefix), use)
    return diffusion.loss(out, x0, noise, t, jnp.ones((b, 1), bool), cfg)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (apply_gradients(state, grads, optimizer, optim_cfg),
          {"loss": loss, "grad_norm": optax.tree.norm(grads)})


@functools.partial(jax.jit, static_argnames=("cfg",))
def validation_loss(model: LatentDenoiser, continuation, prefix, key, *,
                    cfg: diffusion.DiffusionConfig):
  """The conditional loss on fixed draws (for the training curve)."""
  k_t, k_noise = jax.random.split(key)
  b = continuation.shape[0]
  x0 = scaled(continuation)[:, None]
  t = jax.random.uniform(k_t, (b,), minval=T_MIN, maxval=1.0)
  noise = jax.random.normal(k_noise, x0.shape)
  out = model(diffusion.q_sample(x0, t, noise, cfg.schedule), t, scaled(prefix),
              jnp.ones((b,), bool))
  return diffusion.loss(out, x0, noise, t, jnp.ones((b, 1), bool), cfg)


def guidance_gradient(x0: jax.Array, steer: Sequence[tuple[LatentClassifier, int]]) -> jax.Array:
  """d/dx0 of sum log p(value | unit(x0)) over (classifier, value) in `steer`; x0 [B, 1, d]."""

  def log_prob(x):
    u = unit(x[:, 0])
    return sum(jnp.sum(c.log_prob(u, v)) for c, v in steer)

  return jax.grad(log_prob)(x0)


def propose(model: LatentDenoiser, prefix: jax.Array, key: jax.Array,
            cfg: diffusion.DiffusionConfig, *,
            steer: Sequence[tuple[LatentClassifier, int]] = (), scale: float = 0.0) -> jax.Array:
  """Unit continuation latents [B, d] for prefix latents [B, d]: DDIM with prefix guidance
  cfg.guidance and, for each (classifier, value) in `steer`, classifier guidance of
  strength `scale` toward that value (several = composed attributes)."""
  b, d = prefix.shape
  cond = scaled(prefix)

  def denoise(x_t, t, _known_mask, labels):
    x0 = model(x_t, t, cond, labels != diffusion.NULL_LABEL)
    return x0 + scale * guidance_gradient(x0, steer) if steer and scale else x0

  x0 = diffusion.sample(denoise, key, (b, 1, d), cfg, labels=jnp.zeros((b,), jnp.int32))
  return unit(x0[:, 0])
