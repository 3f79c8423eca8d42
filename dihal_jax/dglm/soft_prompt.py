"""The decoder side of DGLM: a projection of the sentence latent into k soft-prompt vectors
placed before the backbone's input embeddings, and LoRA adapters of the backbone.

Trained (teacher forcing) to continue a prefix given the latent of the true continuation.
The backbone's own weights never change. With the backbone frozen (dglm.lora_rank = 0) the
projector alone learns to say in the backbone's input space what the latent describes;
with LoRA adapters (backbone/lora.py) trained beside it the decoder also learns to follow
the soft prompt rather than only be addressed by it. As in DGLM, the latent is perturbed
during training (Gaussian noise of a random level, then renormalised) and dropped with a
small probability (the projector sees zeros), so the decoder tolerates the imperfect
latents the diffusion model proposes.

Sequence layout: [k soft vectors][separator, prefix (P)][continuation (C)], positions
0..k + P + C; the loss is the cross-entropy of the continuation tokens only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dihal_jax.backbone.generate import generate
from dihal_jax.backbone.lora import LoRA
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge.train_step import OptimConfig, TrainState, apply_gradients


class Projector(nnx.Module):
  """latent [B, d_z] -> soft prompt [B, k, D]: base vectors + an MLP of the latent, at the
  scale of the backbone's token embeddings (`embed_rms`); with `lora`, the adapters the
  decoder reads it with (`decoder`)."""

  def __init__(self, latent_dim: int, model_dim: int, *, vectors: int, hidden: int,
               embed_rms: float, rngs: nnx.Rngs, lora: LoRA | None = None):
    self.vectors, self.model_dim = vectors, model_dim
    self.embed_rms = embed_rms
    self.lora = lora
    self.base = nnx.Param(jax.random.normal(rngs.params(), (vectors, model_dim)))
    self.hidden = nnx.Linear(latent_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, vectors * model_dim, rngs=rngs)

  def __call__(self, latent: jax.Array) -> jax.Array:
    # Unit-norm latents have per-dimension scale 1/sqrt(d_z): rescale to unit variance.
    x = latent * jnp.sqrt(latent.shape[-1])
    delta = self.out(jax.nn.gelu(self.hidden(x))).reshape(-1, self.vectors, self.model_dim)
    return self.embed_rms * (self.base[...] + delta)

  def decoder(self, backbone: Decoder) -> Decoder:
    """The backbone that reads this projector's soft prompts (adapted when it has LoRA)."""
    return backbone if self.lora is None else self.lora.apply(backbone)


def perturb(key: jax.Array, latent: jax.Array, *, noise: float, dropout: float) -> jax.Array:
  """Unit latents [B, d] + N(0, (s/sqrt d)^2) with s ~ U(0, noise) per row, renormalised;
  each row zeroed with probability `dropout`."""
  k_level, k_noise, k_drop = jax.random.split(key, 3)
  b, d = latent.shape
  level = jax.random.uniform(k_level, (b, 1), maxval=noise)
  noisy = latent + level * jax.random.normal(k_noise, latent.shape) / jnp.sqrt(d)
  noisy = noisy / jnp.linalg.norm(noisy, axis=-1, keepdims=True)
  return jnp.where(jax.random.bernoulli(k_drop, dropout, (b, 1)), 0.0, noisy)


def continuation_nll(backbone: Decoder, soft: jax.Array, tokens: jax.Array,
                     prefix: int) -> jax.Array:
  """Mean cross-entropy of tokens[:, 1 + prefix:] after [soft][tokens[:, :1 + prefix]]."""
  k = soft.shape[1]
  h = jnp.concatenate([soft.astype(backbone.dtype), backbone.embed_tokens(tokens)], axis=1)
  h = backbone.run_layers(h, 0, backbone.cfg.num_layers)
  # the state at sequence position k + j predicts window token j + 1
  logits = backbone.logits(h[:, k + prefix:-1])
  target = tokens[:, 1 + prefix:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))


@functools.partial(jax.jit, static_argnames=("prefix", "optimizer", "optim_cfg", "noise",
                                             "dropout"), donate_argnums=(0,))
def train_step(state: TrainState, backbone: Decoder, tokens: jax.Array, latent: jax.Array,
               key: jax.Array, *, prefix: int, optimizer: optax.GradientTransformation,
               optim_cfg: OptimConfig, noise: float, dropout: float):
  """One AdamW step of the projector and its adapters (the backbone is an input, never
  updated)."""
  z = perturb(jax.random.fold_in(key, state.step), latent, noise=noise, dropout=dropout)

  def loss_fn(params):
    projector = nnx.merge(state.graphdef, params, state.rest)
    return continuation_nll(projector.decoder(backbone), projector(z), tokens, prefix)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (apply_gradients(state, grads, optimizer, optim_cfg),
          {"loss": loss, "grad_norm": optax.tree.norm(grads)})


@functools.partial(jax.jit, static_argnames=("prefix",))
def validation_nll(projector: Projector, backbone: Decoder, tokens: jax.Array,
                   latent: jax.Array, *, prefix: int) -> jax.Array:
  return continuation_nll(projector.decoder(backbone), projector(latent), tokens, prefix)


def write(backbone: Decoder, projector: Projector | None, prompts: jax.Array,
          latents: jax.Array | None, *, length: int, key: jax.Array, temperature: float,
          top_p: float) -> jax.Array:
  """[B, length] continuations of prompts [B, P'] (all real tokens), after the soft prompt of
  `latents` [B, d_z] when a projector is given (plain AR continuation otherwise)."""
  soft = None if projector is None else projector(jnp.asarray(latents))
  decoder = backbone if projector is None else projector.decoder(backbone)
  return generate(decoder, jnp.asarray(prompts), max_new_tokens=length, key=key,
                  temperature=temperature, top_p=top_p, soft_prompt=soft)
