"""The current-token head: which token a hidden state h_l holds, as a distribution.

What: class means μ_v of the bridge-normalized states z = norm(h_l) at the positions
holding token v (tokens seen in the train cache only), and a temperature τ:
p_id(v | z) = softmax_v(-||z - μ_v||² / τ). Its argmax is the `identity` readout; its
log-probabilities are the `joint` readout's consistency term and the bridge's auxiliary
token cross-entropy.

Why class means and not a linear probe: a probe over the vocabulary would be a
V x d matrix (28 M parameters for SmolLM2) trained on a few million tokens; the class
means need no training, are exact where the current token dominates h_l (at l = 0 they
are the embedding rows), and τ, the one free number, is the maximum-likelihood value on
held-in positions (scipy's bounded scalar search over log τ). Distances are taken in the
normalized space so that the few massive-activation channels do not decide them.

Usage:
  head = ClassMeanHead.fit(tokens, states, norm, vocab_size=V)   # states in backbone units
  tokens = head(h)                    # [B, n] argmax, h [B, n, d] backbone units
  logp = head.log_probs(h)            # [B, n, V], -inf for tokens never seen
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from dihal_jax.bridge.normalization import Normalizer

FIT_POSITIONS = 4096  # positions the temperature is fitted on (all of them when fewer)
_LOG_TAU_BOUNDS = (-8.0, 12.0)


@dataclasses.dataclass(frozen=True)
class ClassMeanHead:
  ids: np.ndarray  # [V'] int32 token ids with at least one training occurrence
  means: np.ndarray  # [V', d] float32, in the normalized space of `norm`
  norm: Normalizer
  temperature: float  # τ
  vocab_size: int

  @classmethod
  def fit(cls, tokens: np.ndarray, states: np.ndarray, norm: Normalizer, *, vocab_size: int,
          chunk: int = 512, seed: int = 0) -> "ClassMeanHead":
    """tokens [N, T] int (T >= 2), states [N, T, d] in backbone units (a memmap is fine);
    position 0 included in the means, excluded from the temperature fit."""
    d = states.shape[-1]
    sums, counts = np.zeros((d, vocab_size)), np.zeros(vocab_size)
    for i in range(0, len(tokens), chunk):
      ids = np.asarray(tokens[i:i + chunk]).ravel()
      x = np.asarray(states[i:i + chunk], np.float64).reshape(-1, d)
      counts += np.bincount(ids, minlength=vocab_size)
      for c in range(d):
        sums[c] += np.bincount(ids, weights=x[:, c], minlength=vocab_size)
    seen = np.flatnonzero(counts)
    raw = (sums[:, seen] / counts[seen]).T
    means = np.asarray(norm.forward(raw.astype(np.float32)), np.float32)
    head = cls(seen.astype(np.int32), means, norm, 1.0, vocab_size)
    n, t = tokens.shape
    if n * (t - 1) <= FIT_POSITIONS:  # every position but 0
      rows, cols = np.divmod(np.arange(n * (t - 1)), t - 1)
      cols = cols + 1
    else:  # a seeded sample, read in file order (states may be a memmap)
      rng = np.random.default_rng(seed)
      rows, cols = rng.integers(0, n, FIT_POSITIONS), rng.integers(1, t, FIT_POSITIONS)
      order = np.lexsort((cols, rows))
      rows, cols = rows[order], cols[order]
    z = np.asarray(norm.forward(np.stack([states[r, c] for r, c in zip(rows, cols)])))
    scores = class_scores(jnp.asarray(z), jnp.asarray(means))  # [P, V']
    index = jnp.asarray(np.searchsorted(seen, np.asarray(tokens)[rows, cols]))
    best = optimize.minimize_scalar(lambda log_tau: float(_nll(scores, index, log_tau)),
                                    bounds=_LOG_TAU_BOUNDS, method="bounded")
    return dataclasses.replace(head, temperature=float(np.exp(best.x)))

  def logits(self, h: jax.Array) -> jax.Array:
    """[..., V'] float32: -||z - μ_v||² / τ up to a per-position constant (z = norm(h))."""
    return class_scores(self.norm.forward(jnp.asarray(h, jnp.float32)), jnp.asarray(self.means)) \
        / self.temperature

  def log_probs(self, h: jax.Array) -> jax.Array:
    """[..., V] float32 log p_id(v | h) over the whole vocabulary (-inf for unseen tokens)."""
    logp = jax.nn.log_softmax(self.logits(h), axis=-1)
    full = jnp.full(logp.shape[:-1] + (self.vocab_size,), -jnp.inf, jnp.float32)
    return full.at[..., jnp.asarray(self.ids)].set(logp)

  def __call__(self, h: jax.Array) -> jax.Array:
    """tokens [B, n] int32: the nearest class mean of each state h [B, n, d] (backbone units)."""
    z = self.norm.forward(jnp.asarray(h, jnp.float32))
    return nearest_rows(z, jnp.asarray(self.means), jnp.asarray(self.ids))


@jax.jit
def _nll(scores, index, log_tau):
  """Mean -log p_id(true token) at temperature exp(log_tau)."""
  logp = jax.nn.log_softmax(scores / jnp.exp(log_tau), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, index[:, None], axis=-1))


def class_scores(z: jax.Array, means: jax.Array) -> jax.Array:
  """2 z·μ - ||μ||² = ||z||² - ||z - μ||² [..., V'] (float32 accumulation): the head's logits
  times τ, up to a per-position constant."""
  return (2.0 * jnp.einsum("...d,vd->...v", z, means, preferred_element_type=jnp.float32)
          - jnp.sum(jnp.square(means), axis=-1))


@jax.jit
def nearest_rows(z, rows, ids):
  """ids[argmin_r ||z - rows_r||²] [B, n] for z [B, n, d], rows [R, d], ids [R]; one batch
  row at a time (memory ~ n x R)."""
  return jax.lax.map(lambda x: ids[jnp.argmax(class_scores(x, rows), axis=-1)], z)
