"""Sampling a masked diffusion model: reveal masked positions over `steps` parallel passes.

Start: every unknown position holds the mask id (known positions: the separator, a
prompt, the text around an infill gap). Step s of S = sample.mdm_steps (time
t_s = 1 - s/S): one bidirectional forward pass gives a distribution per masked
position (through the shift when the model was trained with it); a token is drawn at
each (temperature, top-p); then as many positions are revealed as the linear schedule
asks for (round(M·t_s) - round(M·t_{s+1}) of the M unknown positions of the block), the
rest stay masked. Revealed tokens never change (MDLM's carry-over).

Which positions: `random` picks uniformly among the masked ones (MDLM's ancestral
sampler with the revealed count fixed per step instead of drawn), `confidence`
the ones whose drawn token has the highest probability (MaskGIT / LLaDA low-confidence
remasking). `block` > 0 is semi-autoregressive: the window is cut into blocks of that
many positions, revealed left to right, each with its own S steps (positions right of
the current block stay masked and are still seen). A model trained as block diffusion
(`trained_block` > 0) is always sampled by its own blocks, each step one BD3-LM pass over
the window twice (mdm/objective.py::predictions: the committed blocks are its clean half,
later blocks are invisible to it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.backbone.generate import top_p_filter
from dihal_jax.errors import UserInputError
from dihal_jax.mdm.objective import predictions

UNMASK = ("confidence", "random")


def check(steps: int, unmask: str, block: int, length: int) -> None:
  """One `dihal: error:` line for bad sampler settings."""
  if steps < 1:
    raise UserInputError(f"--config.sample.mdm_steps={steps}: expected >= 1")
  if unmask not in UNMASK:
    raise UserInputError(f"--config.sample.unmask={unmask!r}: expected one of "
                         f"{', '.join(UNMASK)}")
  if block < 0 or (block and length % block):
    raise UserInputError(f"--config.sample.mdm_block={block}: must be 0 or divide the window "
                         f"length {length}")


def reveal_counts(unknown: np.ndarray, steps: int) -> np.ndarray:
  """int [S, N]: positions revealed per step so that round(M·(1 - s/S)) stay masked after
  s steps, for M [N] unknown positions (the counts of each row sum to M)."""
  unknown = np.asarray(unknown)
  remaining = np.round(unknown[None, :] * (1.0 - np.arange(steps + 1)[:, None] / steps))
  return (remaining[:-1] - remaining[1:]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "shift", "trained_block", "unmask",
                                             "temperature", "top_p"))
def _step(graphdef, state, tokens, masked, count, key, *, mask_id, shift, trained_block, unmask,
          temperature, top_p):
  """One reveal step: tokens [N, T] (mask id where masked), masked [N, T] the still-masked
  positions this block may reveal, count [N] how many to reveal."""
  model = nnx.merge(graphdef, state)
  logits = predictions(model, tokens, tokens, shift=shift, block=trained_block)
  logits = logits.at[..., mask_id].set(-jnp.inf)  # never draw the absorbing state itself
  k_draw, k_order = jax.random.split(key)
  if temperature == 0.0:
    drawn = jnp.argmax(logits, axis=-1)
  else:
    scaled = logits / temperature
    if top_p < 1.0:
      scaled = top_p_filter(scaled, top_p)
    drawn = jax.random.categorical(k_draw, scaled, axis=-1)
  if unmask == "confidence":
    probs = jax.nn.softmax(logits, axis=-1)
    score = jnp.take_along_axis(probs, drawn[..., None], axis=-1)[..., 0]
  else:
    score = jax.random.uniform(k_order, tokens.shape)
  score = jnp.where(masked, score, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)  # 0 = best
  reveal = masked & (rank < count[:, None])
  return jnp.where(reveal, drawn.astype(tokens.dtype), tokens), masked & ~reveal


def sample(model, tokens: np.ndarray, known: np.ndarray, key: jax.Array, *, mask_id: int,
           shift: bool, steps: int, unmask: str = "confidence", block: int = 0,
           trained_block: int = 0, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
  """tokens [N, T] with the unknown positions (known False) filled by the MDM `model`
  (trained as block diffusion with blocks of `trained_block` when > 0: then `block` is
  that)."""
  tokens = np.asarray(tokens, np.int32)
  known = np.asarray(known, bool)
  num, length = tokens.shape
  block = trained_block or block
  check(steps, unmask, block, length)
  graphdef, state = nnx.split(model)
  current = jnp.asarray(np.where(known, tokens, mask_id))
  edges = range(0, length, block) if block else [0]
  for b, start in enumerate(edges):
    stop = start + block if block else length
    in_block = np.zeros(length, bool)
    in_block[start:stop] = True
    masked = ~known & in_block[None]
    counts = reveal_counts(masked.sum(1), steps)
    masked = jnp.asarray(masked)
    for s in range(steps):
      current, masked = _step(graphdef, state, current, masked, jnp.asarray(counts[s]),
                              jax.random.fold_in(key, b * steps + s), mask_id=mask_id,
                              shift=shift, trained_block=trained_block, unmask=unmask,
                              temperature=float(temperature),
                              top_p=float(top_p))
  return np.asarray(current)
