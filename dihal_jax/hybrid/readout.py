"""Readouts: hidden states h_l -> tokens, and the hybrid generators built on them.

docs/design.md, "Readout and generation: the crux". The LM head at position t
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
  identity   decode the *current* token of each position from h_l with the
             current-token head (bridge/token_head.py, class means fit on the
             train split's cached states): consistent with the states by
             construction, but blind to the language.
  joint      both in one parallel pass: token_i ~ top-p softmax((logits_LM[i-1] +
             β · log p_id(· | h_i)) / T), logits_LM from the upper layers on the
             generated states h_<i, p_id the current-token head on h_i. Fed the
             true states of real text it gives back that text (the LM term alone
             is the literal readout; the p_id term alone is `identity`); β = 0 is
             `lm_head`.

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
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.backbone.generate import sample_next
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.token_head import ClassMeanHead, class_scores, nearest_rows
from dihal_jax.errors import UserInputError

MODES = ("blockwise", "lm_head", "refine", "identity", "joint")


class JointScores(NamedTuple):
  """The joint readout's scores, sorted: values [B, n-1, V] descending, order = token ids."""
  values: jax.Array
  order: jax.Array


_UNSEEN = -1e4  # log p_id of a token the head never saw (e^-10^4 = 0 in float32)


@dataclasses.dataclass(frozen=True)
class ReadoutConfig:
  """Settings of every mode (hashable: a jit static)."""
  temperature: float = 1.0  # lm_head / blockwise / refine draws; 0 = argmax
  top_p: float = 0.9
  block: int = 8  # blockwise: positions per block
  rounds: int = 4  # refine: at most R rounds
  renoise_t: float = 0.3  # refine: re-noise level t_r
  steps: int = 50  # bridge sampler steps (a full 1 -> 0 pass)
  beta: float = 1.0  # joint: weight of the current-token head's log-probabilities


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
  if cfg.beta < 0:
    raise UserInputError(f"beta={cfg.beta}: expected >= 0 (the joint readout's weight of "
                         "the current-token head)")
  if cfg.steps < 1 or cfg.rounds < 0:
    raise UserInputError(f"steps={cfg.steps}, rounds={cfg.rounds}: expected >= 1 and >= 0")


def nearest_embedding(h0: jax.Array, embed: jax.Array) -> jax.Array:
  """Diffusion-LM rounding: tokens [B, n] whose embedding rows are nearest (L2) to h0 [B, n, d]."""
  chex.assert_rank(h0, 3)
  return nearest_rows(jnp.asarray(h0, jnp.float32), jnp.asarray(embed, jnp.float32),
                      jnp.arange(embed.shape[0], dtype=jnp.int32))


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

  def joint_scores(self, h, head: ClassMeanHead, beta: float) -> JointScores:
    """The joint readout's temperature-free part for h [B, n, d]: logits_LM[i-1] + β log p_id
    for positions 1..n-1, sorted once (descending) so that draws at any temperature reuse it."""
    return JointScores(*_joint_scores(*self._joint_inputs(h, head, beta), layer=self.layer,
                                      vocab=head.vocab_size))

  def _joint_inputs(self, h, head: ClassMeanHead, beta: float) -> tuple:
    """The positional arguments of the jitted joint readouts for h [B, n, d]."""
    h = jnp.asarray(h, jnp.float32)
    return (self.graphdef, self.state, h, head.norm.forward(h), jnp.asarray(head.means),
            jnp.asarray(head.ids), jnp.float32(head.temperature), jnp.float32(beta))

  def _with_separator(self, nxt: jax.Array) -> jax.Array:
    """tokens [B, n]: the separator, then nxt [B, n-1]."""
    return jnp.concatenate([jnp.full((nxt.shape[0], 1), self.separator, jnp.int32), nxt], axis=1)

  def draw(self, scores: JointScores, key, temperature: float, top_p: float) -> jax.Array:
    """tokens [B, n]: the separator, then a top-p draw at `temperature` (0 = argmax) per
    position of `scores` (temperature is traced: no recompilation per value)."""
    return self._with_separator(
        scores.order[..., 0] if temperature == 0 else
        _draw_sorted(scores.values, scores.order, key, jnp.float32(temperature), top_p=top_p))

  def joint(self, h, head: ClassMeanHead, key, cfg: ReadoutConfig,
            temperature: float | None = None) -> jax.Array:
    """tokens [B, n] of the joint readout of h [B, n, d] (token 0 = separator);
    `temperature` overrides cfg.temperature."""
    t = cfg.temperature if temperature is None else temperature
    if t == 0:  # argmax: the same token as the sorted scores' first, without the sort
      return self._with_separator(_joint_argmax(*self._joint_inputs(h, head, cfg.beta),
                                                layer=self.layer, vocab=head.vocab_size))
    return self.draw(self.joint_scores(h, head, cfg.beta), key, t, cfg.top_p)

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
    if mode in ("identity", "joint"):
      if identity_head is None:
        raise ValueError(f"{mode} readout needs the current-token head (ClassMeanHead)")
      read = (identity_head(states) if mode == "identity" else
              self.joint(states, identity_head, jax.random.fold_in(k_rest, 0), cfg))
      return {"tokens": jnp.where(known, tokens, read), "states": states, "rounds": 0}
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


def _joint_logits(graphdef, state, h, z, means, ids, tau, beta, *, layer, vocab):
  """[B, n-1, V]: logits_LM[i-1] + β log p_id(· | h_i) for positions i = 1..n-1."""
  lm = nnx.merge(graphdef, state).upper(h, layer)[:, :-1]  # [B, n-1, V]: logits[t] -> t + 1
  log_id = jax.nn.log_softmax(class_scores(z[:, 1:], means) / tau, axis=-1)  # [B, n-1, V']
  # Tokens never seen in training have p_id = 0: a finite floor keeps β = 0 exactly lm_head.
  return lm.at[..., ids].add(beta * log_id) + jnp.where(
      jnp.zeros((vocab,), bool).at[ids].set(True), 0.0, beta * _UNSEEN)


@functools.partial(jax.jit, static_argnames=("layer", "vocab"))
def _joint_scores(graphdef, state, h, z, means, ids, tau, beta, *, layer, vocab):
  """(values, order) [B, n-1, V]: the joint scores of positions 1..n-1 sorted descending."""
  combined = _joint_logits(graphdef, state, h, z, means, ids, tau, beta, layer=layer,
                           vocab=vocab)
  order = jnp.argsort(-combined, axis=-1, stable=True).astype(jnp.int32)
  return jnp.take_along_axis(combined, order, axis=-1), order


@functools.partial(jax.jit, static_argnames=("layer", "vocab"))
def _joint_argmax(graphdef, state, h, z, means, ids, tau, beta, *, layer, vocab):
  """[B, n-1]: the joint readout's argmax tokens (temperature 0: no sort over the vocabulary)."""
  return jnp.argmax(_joint_logits(graphdef, state, h, z, means, ids, tau, beta, layer=layer,
                                  vocab=vocab), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_p",))
def _draw_sorted(values, order, key, temperature, *, top_p):
  """Top-p draws [B, m] from descending-sorted logits values [B, m, V] (token ids `order`):
  the smallest prefix whose probability mass at `temperature` reaches top_p."""
  logits = values / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p
  rank = jax.random.categorical(key, jnp.where(keep, logits, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, rank[..., None], axis=-1)[..., 0]
