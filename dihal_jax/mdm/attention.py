"""Attention patterns of a masked diffusion model post-trained from a causal backbone.

An MDM sees the whole window: attention is bidirectional. Switching a causal model to
bidirectional at once perturbs every layer; DiffuLLaMA anneals instead: during the first
`anneal_steps` each query sees its causal past plus each future key with probability r,
r rising linearly from 0 to 1. After the annealing (or with anneal_steps = 0) the pattern
is fully bidirectional. Patterns are bool [B, T, T] or [T, T], True = query i sees key j.

Block diffusion (BD3-LM, Arriola et al. 2025) runs one pass over the noised window x_t
followed by the clean one x_0, both at positions 0..T-1 (`block_diffusion`,
`block_positions`): blocks of k positions are denoised in parallel inside, and
autoregressively across, blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def anneal_rate(step, anneal_steps: int) -> jax.Array:
  """r at optimizer step `step` (0-based): min(1, step / anneal_steps); 1 when not annealing."""
  if anneal_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / anneal_steps)


def annealed_pattern(key: jax.Array, batch: int, length: int, rate) -> jax.Array:
  """bool [batch, T, T]: causal OR Bernoulli(rate) per (query, key) pair.

  rate = 0 gives the causal pattern, rate = 1 the bidirectional one.
  """
  causal = jnp.tril(jnp.ones((length, length), bool))
  extra = jax.random.bernoulli(key, rate, (batch, length, length))
  return causal[None] | extra


def bidirectional(length: int) -> jax.Array:
  """bool [T, T], all True: the pattern of a trained MDM (training, validation, sampling)."""
  return jnp.ones((length, length), bool)


def block_diffusion(length: int, block: int) -> jax.Array:
  """bool [2T, 2T] over x_t ⊕ x_0: a noisy query sees the noisy keys of its own block and the
  clean keys of earlier blocks; a clean query sees the clean keys of its block and earlier
  ones (block-causal); nothing sees a noisy key from the clean half."""
  i = jnp.arange(2 * length)
  noisy = i < length
  blk = (i % length) // block
  bq, bk = blk[:, None], blk[None, :]
  nq, nk = noisy[:, None], noisy[None, :]
  return (nq & nk & (bq == bk)) | (nq & ~nk & (bk < bq)) | (~nq & ~nk & (bk <= bq))


def block_positions(length: int) -> jax.Array:
  """int [1, 2T]: x_t and x_0 both at positions 0..T-1 (RoPE sees one window twice)."""
  return jnp.tile(jnp.arange(length), 2)[None]
