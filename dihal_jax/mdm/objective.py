"""The MDLM objective: absorbing-state forward process and its weighted cross-entropy.

Forward process: a time t ~ U(eps, 1) per window; every position except 0 (the
document separator every window starts with, never masked) is replaced by the mask id
with probability t. For this linear schedule the continuous-time NELBO is

  L = E_t [ (1 / t) * sum over masked i of -log p_theta(x_i | z_t) ],

(MDLM, Sahoo et al. 2024: alpha_t = 1 - t, weight -alpha'_t / (1 - alpha_t) = 1 / t).
We report it per token: the sum is divided by the window's T - 1 predictable positions
and averaged over the batch, so an untrained uniform model scores ~log V.

The shift (DiffuLLaMA, Dream): logits at position i - 1 predict token i, so the AR
head keeps its meaning (next-token logits) and the post-training starts from a model
that already predicts the masked token well when everything before it is clean. Without
the shift, logits at i predict token i.

Block diffusion (mdm.block = k > 0, BD3-LM): the model reads x_t ⊕ x_0 with the pattern
of mdm/attention.py::block_diffusion and token i is predicted from the noisy half. With the
shift, a block's first token has no earlier position in its own noisy block; it is read at
position i - 1 of the clean half, which sees exactly x_<i: the AR head's own prediction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dihal_jax.mdm.attention import bidirectional, block_diffusion, block_positions

T_EPS = 1e-3  # t ~ U(T_EPS, 1): the 1/t weight stays finite


def mask_tokens(key: jax.Array, tokens: jax.Array, t: jax.Array, mask_id: int) -> tuple[
    jax.Array, jax.Array]:
  """(z_t [B, T], masked bool [B, T]): each position but 0 masked with probability t[b]."""
  u = jax.random.uniform(key, tokens.shape)
  masked = (u < t[:, None]) & (jnp.arange(tokens.shape[1]) > 0)[None]
  return jnp.where(masked, mask_id, tokens), masked


def token_logits(logits: jax.Array, shift: bool) -> jax.Array:
  """Logits that predict token i, at position i ([B, T, V]); with the shift, position 0
  (never masked, never predicted) gets position 0's own logits as a placeholder."""
  if not shift:
    return logits
  return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def predictions(model, z: jax.Array, clean: jax.Array, *, shift: bool, block: int,
                attention: jax.Array | None = None) -> jax.Array:
  """[B, T, V] logits that predict token i at position i, for the noised window z [B, T]:
  one pass over z with `attention` (default bidirectional), or with block > 0 the BD3-LM
  pass over z ⊕ clean (clean [B, T]: the window's clean tokens, where committed)."""
  n = z.shape[1]
  if not block:
    pattern = bidirectional(n) if attention is None else attention
    return token_logits(model(z, attention=pattern), shift)
  both = model(jnp.concatenate([z, clean], axis=1), positions=block_positions(n),
               attention=block_diffusion(n, block))
  noisy = token_logits(both[:, :n], shift)
  if not shift:
    return noisy
  first = (jnp.arange(n) % block == 0)[None, :, None]
  return jnp.where(first, token_logits(both[:, n:], shift), noisy)


def mdlm_loss(logits: jax.Array, tokens: jax.Array, masked: jax.Array, t: jax.Array) -> jax.Array:
  """Per-token NELBO of `predictions` [B, T, V]: mean over b of
  sum_i masked[b, i] * CE[b, i] / t[b] / (T - 1)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  per_window = jnp.sum(jnp.where(masked, nll, 0.0), axis=1) / t / (tokens.shape[1] - 1)
  return jnp.mean(per_window)
