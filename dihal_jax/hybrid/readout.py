"""Readouts: hidden states h_l -> tokens, and the hybrid generators built on them.

DESIGN.md "Readout and generation: the crux". The LM head at position t
predicts token t+1 given the sequence the states came from, so reading a
generated h_l sequence out position by position is not self-consistent.
The modes (`MODES`), all measured by `dihal eval`:

  lm_head    the paper's literal readout: upper layers + LM head on the
             generated h_l; token t+1 ~ logits[t] (temperature / top-p, 0 =
             argmax). Token 0 is the separator (always a known position).
  refine     lm_head, then R rounds of: re-encode the tokens with the real
             lower layers, re-noise to t_r, denoise with the bridge (SDEdit),
             read out again; stops early when no token changes.
  blockwise  semi-autoregressive: blocks of k positions; the prefix's h_l
             comes from the real lower layers on the tokens so far, the bridge
             fills the rest as known-position inpainting, and the block's
             tokens are read with the LM head. Note: the first token of each
             block is read from logits at the last *real* prefix position, so
             it is the backbone's own next-token draw; 1/k of the tokens do not
             depend on the bridge (reported as `ar_share`).
  identity   decode the *current* token of each position from h_l with a
             class-mean head fit on the train split's cached states
             (`ClassMeanHead`): consistent with the states by construction.

Also `nearest_embedding` (Diffusion-LM rounding: the row of the embedding
matrix nearest to a generated h_0), the `embedding_rounding` baseline's readout.

Usage:
  reader = Readout(backbone, layer, separator)
  tokens, known = reader.template(num=64, length=64)
  out = reader.fill(bridge, key, tokens, known, mode="blockwise", cfg=ReadoutConfig())
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.backbone.generate import sample_next
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import diffusion
from dihal_jax.errors import UserInputError

MODES = ("blockwise", "lm_head", "refine", "identity")


@dataclasses.dataclass(frozen=True)
class ReadoutConfig:
  """Settings of every mode (hashable: a jit static)."""
  temperature: float = 1.0  # lm_head / blockwise / refine draws; 0 = argmax
  top_p: float = 0.9
  block: int = 8  # blockwise: positions per block
  rounds: int = 4  # refine: at most R rounds
  renoise_t: float = 0.3  # refine: re-noise level t_r
  steps: int = 50  # bridge sampler steps (a full 1 -> 0 pass)


def validate(mode: str, cfg: ReadoutConfig, length: int):
  if mode not in MODES:
    raise UserInputError(f"readout={mode!r}: expected one of {', '.join(MODES)}")
  if not 0.0 < cfg.top_p <= 1.0:
    raise UserInputError(f"top_p={cfg.top_p}: expected 0 < top_p <= 1")
  if cfg.temperature < 0:
    raise UserInputError(f"temperature={cfg.temperature}: expected >= 0")
  if not 1 <= cfg.block < length:
    raise UserInputError(f"block={cfg.block}: expected 1 <= block < length={length}")
  if not 0.0 < cfg.renoise_t <= 1.0:
    raise UserInputError(f"renoise_t={cfg.renoise_t}: expected 0 < t <= 1")
  if cfg.steps < 1 or cfg.rounds < 0:
    raise UserInputError(f"steps={cfg.steps}, rounds={cfg.rounds}: expected >= 1 and >= 0")


@dataclasses.dataclass(frozen=True)
class ClassMeanHead:
  """identity readout: token of position t = argmin_v ||h_t - μ_v||² over tokens seen in training.

  Fit on raw h_l (backbone units) of the train cache: μ_v = mean of h_l at the
  positions holding token v. At a shallow layer the current token dominates h_l.
  """
  ids: np.ndarray  # [V'] int32 token ids with at least one training occurrence
  means: np.ndarray  # [V', d] float32

  @classmethod
  def fit(cls, tokens: np.ndarray, states: np.ndarray, chunk: int = 512) -> "ClassMeanHead":
    """tokens [N, T] int, states [N, T, d] (a memmap is fine); position 0 included."""
    d = states.shape[-1]
    vocab = int(np.max(tokens)) + 1
    sums, counts = np.zeros((d, vocab)), np.zeros(vocab)
    for i in range(0, len(tokens), chunk):
      ids = np.asarray(tokens[i:i + chunk]).ravel()
      x = np.asarray(states[i:i + chunk], np.float64).reshape(-1, d)
      counts += np.bincount(ids, minlength=vocab)
      for c in range(d):
        sums[c] += np.bincount(ids, weights=x[:, c], minlength=vocab)
    seen = np.flatnonzero(counts)
    return cls(seen.astype(np.int32), (sums[:, seen] / counts[seen]).T.astype(np.float32))

  def __call__(self, h: jax.Array) -> jax.Array:
    """tokens [B, n] int32 for h [B, n, d]."""
    return _nearest(h, jnp.asarray(self.means), jnp.asarray(self.ids))


@jax.jit
def _nearest(h, rows, ids):
  """ids[argmin_r ||h - rows_r||²] per position, one batch row at a time (memory ~ n x V)."""
  sq = jnp.sum(jnp.square(rows), axis=-1)

  def one(x):  # x [n, d]
    scores = 2.0 * jnp.einsum("nd,vd->nv", x, rows, preferred_element_type=jnp.float32) - sq
    return ids[jnp.argmax(scores, axis=-1)]

  return jax.lax.map(one, jnp.asarray(h, jnp.float32))


def nearest_embedding(h0: jax.Array, embed: jax.Array) -> jax.Array:
  """Diffusion-LM rounding: tokens [B, n] whose embedding rows are nearest (L2) to h0 [B, n, d]."""
  chex.assert_rank(h0, 3)
  return _nearest(h0, jnp.asarray(embed, jnp.float32), jnp.arange(embed.shape[0], dtype=jnp.int32))


class Readout:
  """The frozen backbone's side of hybrid generation at interface layer `layer`."""

  def __init__(self, backbone: Decoder, layer: int, separator: int):
    self.graphdef, self.state = nnx.split(backbone)
    self.layer, self.separator = layer, int(separator)
    self.dim = backbone.cfg.hidden_size

  def lower(self, tokens) -> jax.Array:
    """h_layer [B, n, d] of tokens [B, n] (the real lower layers)."""
    return _lower(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32), layer=self.layer)

  def lm_head(self, h, key, cfg: ReadoutConfig) -> jax.Array:
    """tokens [B, n]: token 0 = separator, token t+1 ~ logits[t] of upper(h)."""
    return _lm_head(self.graphdef, self.state, jnp.asarray(h, jnp.float32), key,
                    layer=self.layer, separator=self.separator, temperature=cfg.temperature,
                    top_p=cfg.top_p)

  def template(self, num: int, length: int, prompt: list[int] | None = None):
    """(tokens, known) for unconditional generation (position 0 = separator known) or a
    prompt (separator + prompt tokens known); unknown positions hold the separator."""
    given = [self.separator] + list(prompt or [])
    if len(given) >= length:
      raise UserInputError(f"prompt of {len(given) - 1} tokens leaves no room in length={length}")
    tokens = np.full((num, length), self.separator, np.int32)
    tokens[:, :len(given)] = given
    known = np.zeros((num, length), bool)
    known[:, :len(given)] = True
    return tokens, known

  def fill(self, bridge, key, tokens, known, *, mode: str, cfg: ReadoutConfig,
           identity_head: ClassMeanHead | None = None, progress=None) -> dict:
    """Fills the unknown positions of tokens [B, n] (known [B, n] bool, the same pattern in
    every row; position 0 known). Returns {"tokens": [B, n] int32, "states": the first bridge
    sample [B, n, d] (backbone units), "rounds": refine rounds taken}.

    Known positions enter the bridge as h_l of the real lower layers on `tokens` (for an
    infill suffix that includes placeholder tokens in the gaps before it).
    """
    tokens, known = jnp.asarray(tokens, jnp.int32), jnp.asarray(known, bool)
    b, n = tokens.shape
    validate(mode, cfg, n)
    if not bool(jnp.all(known[:, 0])) or not bool(jnp.all(known == known[:1])):
      raise ValueError("fill: position 0 must be known and the pattern equal in every row")
    k_first, k_rest = jax.random.split(key)
    if mode == "blockwise":
      unknown = np.flatnonzero(~np.asarray(known[0]))
      states, filled = None, known
      for i in range(0, len(unknown), cfg.block):
        idx = unknown[i:i + cfg.block]
        idx = np.pad(idx, (0, cfg.block - len(idx)), mode="edge")  # one shape for every block
        k_block = jax.random.fold_in(k_rest, i)
        h = bridge.sample(jax.random.fold_in(k_block, 0), self.lower(tokens), filled,
                          steps=cfg.steps)
        states = h if states is None else states
        tokens = _read_positions(self.graphdef, self.state, h, jax.random.fold_in(k_block, 1),
                                 tokens, jnp.asarray(idx, jnp.int32), layer=self.layer,
                                 end=int(idx.max()), temperature=cfg.temperature,
                                 top_p=cfg.top_p)
        filled = filled | jnp.zeros((n,), bool).at[idx].set(True)[None]
        if progress is not None:
          progress()
      return {"tokens": tokens, "states": states, "rounds": 0}
    known_h = self.lower(tokens)
    states = bridge.sample(k_first, known_h, known, steps=cfg.steps)
    if mode == "identity":
      if identity_head is None:
        raise ValueError("identity readout needs a ClassMeanHead")
      return {"tokens": jnp.where(known, tokens, identity_head(states)), "states": states,
              "rounds": 0}
    tokens = jnp.where(known, tokens, self.lm_head(states, jax.random.fold_in(k_rest, 0), cfg))
    rounds = 0
    if mode == "refine":
      for r in range(1, cfg.rounds + 1):
        z = bridge.norm.forward(self.lower(tokens))
        noise = jax.random.normal(jax.random.fold_in(k_rest, 3 * r), z.shape)
        z_t = diffusion.q_sample(z, jnp.full((b,), cfg.renoise_t), noise,
                                 bridge.diffusion.schedule)
        h = bridge.sample(jax.random.fold_in(k_rest, 3 * r + 1), known_h, known,
                          steps=cfg.steps, x_start=z_t, t_start=cfg.renoise_t)
        new = jnp.where(known, tokens, self.lm_head(h, jax.random.fold_in(k_rest, 3 * r + 2),
                                                    cfg))
        changed, tokens, rounds = bool(jnp.any(new != tokens)), new, r
        if progress is not None:
          progress()
        if not changed:
          break
    return {"tokens": tokens, "states": states, "rounds": rounds}


@functools.partial(jax.jit, static_argnames=("layer",))
def _lower(graphdef, state, tokens, *, layer):
  return nnx.merge(graphdef, state).lower(tokens, layer)


@functools.partial(jax.jit, static_argnames=("layer", "end", "temperature", "top_p"))
def _read_positions(graphdef, state, h, key, tokens, idx, *, layer, end, temperature, top_p):
  """tokens with positions idx [k] (1 <= idx <= end) replaced by draws from logits[idx - 1]
  of upper(h). The upper layers are causal, so they run on h[:, :end] only, and the LM head
  and top-p (which sorts the whole vocabulary) on the k read rows only."""
  model = nnx.merge(graphdef, state)
  hidden = model.run_layers(h[:, :end], layer, model.cfg.num_layers)
  logits = model.logits(hidden[:, idx - 1])  # [B, k, V]
  keys = jax.random.split(key, idx.shape[0])
  new = jax.vmap(lambda lg, k: sample_next(lg, k, temperature, top_p), in_axes=(1, 0),
                 out_axes=1)(logits, keys)
  return tokens.at[:, idx].set(new)


@functools.partial(jax.jit, static_argnames=("layer", "separator", "temperature", "top_p"))
def _lm_head(graphdef, state, h, key, *, layer, separator, temperature, top_p):
  logits = nnx.merge(graphdef, state).upper(h, layer)[:, :-1]  # logits[t] -> token t + 1
  b, n1, v = logits.shape
  keys = jax.random.split(key, n1)
  nxt = jax.vmap(lambda lg, k: sample_next(lg, k, temperature, top_p), in_axes=(1, 0),
                 out_axes=1)(logits, keys)
  return jnp.concatenate([jnp.full((b, 1), separator, jnp.int32), nxt], axis=1)
