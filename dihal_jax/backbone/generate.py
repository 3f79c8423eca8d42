"""Autoregressive generation with a KV cache: greedy, temperature and top-p sampling.

The AR reference of DiHAL (the `ar_backbone` row) and prompt handling. One
prefill over the (left-padded) prompt fills the stacked [L, B, S, K, H] cache,
then each step feeds one token; the whole loop is one jitted `fori_loop`.
Random draws are `fold_in(key, step)`.

Usage:
  tokens = generate(model, prompt, prompt_mask, max_new_tokens=32, key=jax.random.key(0))
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.backbone.model import Decoder


TOP_P_BISECTIONS = 48  # float32 thresholds in (0, max p]: converged well before 48 halvings


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of tokens whose probability mass reaches top_p (nucleus).

  The nucleus is {i : p_i >= tau} for the largest tau whose set still holds top_p of the
  mass; tau is found by bisection (each halving one masked sum over the vocabulary) instead
  of sorting the vocabulary: on CPU a sort of [32, 64, 49152] logits takes ~50x longer.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.float32)  # mass(lo) = 1 >= top_p
  hi = jnp.max(probs, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, hi = jax.lax.fori_loop(0, TOP_P_BISECTIONS, halve, (lo, hi))
  mass_hi = jnp.sum(jnp.where(probs >= hi, probs, 0.0), axis=-1, keepdims=True)
  tau = jnp.where(mass_hi >= top_p, hi, lo)
  return jnp.where(probs >= tau, logits, -jnp.inf)


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V]; temperature 0 means greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_p", "eos_id", "pad_id"))
def _generate(graphdef, state, prompt, prompt_mask, key, soft_prompt, *, max_new_tokens,
              temperature, top_p, eos_id, pad_id):
  model: Decoder = nnx.merge(graphdef, state)
  cfg = model.cfg
  embeddings = model.embed_tokens(prompt)
  if soft_prompt is not None:  # vectors before the (left-padded) prompt, all of them real
    b, k, _ = soft_prompt.shape
    embeddings = jnp.concatenate([soft_prompt.astype(embeddings.dtype), embeddings], axis=1)
    prompt_mask = jnp.concatenate([jnp.ones((b, k), bool), prompt_mask], axis=1)
  b, p = prompt_mask.shape
  s = p + max_new_tokens
  cache = jnp.zeros((cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim), model.dtype)
  key_mask = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache_k, cache_v = model.decode_step(None, positions, cache, cache, 0, key_mask,
                                               embeddings=embeddings)
  token = sample_next(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = token == eos_id

  def step(i, carry):
    out, cache_k, cache_v, token, done = carry
    pos = positions[:, -1:] + i
    logits, cache_k, cache_v = model.decode_step(token[:, None], pos, cache_k, cache_v,
                                                 p + i - 1, key_mask)
    nxt = sample_next(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p)
    nxt = jnp.where(done, pad_id, nxt)
    return out.at[:, i].set(nxt), cache_k, cache_v, nxt, done | (nxt == eos_id)

  out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache_k, cache_v, token, done))
  return out


def generate(model: Decoder, prompt: jax.Array, prompt_mask: jax.Array | None = None, *,
             max_new_tokens: int, key: jax.Array | None = None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             soft_prompt: jax.Array | None = None) -> jax.Array:
  """Continues each prompt row by `max_new_tokens` tokens.

  Args:
    model: the backbone.
    prompt: [B, P] int tokens, left-padded where rows differ in length.
    prompt_mask: [B, P] bool, True on real tokens (default: all real).
    max_new_tokens: tokens to generate per row.
    key: PRNG key (needed unless greedy).
    temperature: 0 for greedy argmax.
    top_p: nucleus mass (1.0 = no filtering).
    eos_id: after this token a row emits `pad_id` (None: never stop).
    soft_prompt: [B, k, D] input vectors placed before each prompt row (DGLM's projected
      latent); they take positions 0..k-1 and every row's tokens follow them.
  Returns:
    [B, max_new_tokens] int32 new tokens.
  """
  chex.assert_rank(prompt, 2)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt.shape, bool)
  if key is None:
    key = jax.random.key(0)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32),
                   jnp.asarray(prompt_mask, bool), key, soft_prompt,
                   max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_p=float(top_p),
                   eos_id=-1 if eos_id is None else int(eos_id), pad_id=int(pad_id))
