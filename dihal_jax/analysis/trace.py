"""An instrumented forward: every layer's state, attention probabilities and head outputs,
with optional activation patching, in one scan over the stacked blocks.

It runs the Decoder's own pieces (`Attention.queries_keys_values`, `probabilities`,
`heads`, `output`, then `Block.after_attention`) in the order `Block.__call__` does, so an
unpatched trace equals the model's forward (tests compare it with `transformers`).

Patching (`Patch`) replaces, inside the scan and only at the positions flagged in
`positions`,
- a whole block's contribution: h_l = h_{l-1} + delta_l with delta_l taken from another
  run (the clean one) instead of computed, for the layers flagged in `layers`;
- single heads: head n's output (before the output projection) at layer l taken from the
  other run, for the (l, n) flagged in `heads`; the rest of the block is recomputed.
Patching at the position that reads the answer asks which block writes it there; patching
everywhere would also re-insert the clean token itself wherever the inputs differ.
The patched values come from a `trace` of the clean input with `emit=("deltas", "heads")`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.backbone.model import Decoder


class Patch(NamedTuple):
  """What to take from the other run: layers [L] bool, heads [L, N] bool, at positions [T]
  bool; deltas [L, B, T, D] (h_l - h_{l-1} of the other run), head_outputs [L, B, T, N, H]."""

  layers: jax.Array
  heads: jax.Array
  positions: jax.Array
  deltas: jax.Array
  head_outputs: jax.Array


def trace(model: Decoder, tokens: jax.Array, *, attention=None, patch: Patch | None = None,
          emit: Sequence[str] = ("states",)) -> tuple[jax.Array, dict]:
  """(h_L [B, T, D], {name: [L, ...]}) for tokens [B, T]; `model.logits(h_L)` are the
  logits (left to the caller, which often needs them at one position only).

  `emit` picks what each layer returns, stacked over layers: "states" h_l [L, B, T, D],
  "deltas" h_l - h_{l-1}, "probs" [L, B, K, G, T, S] (float32), "heads" [L, B, T, N, H].
  `attention`: the pattern ([T, T], True = query sees key; default causal).
  """
  cos, sin, mask = model.attention_context(tokens.shape, None, None, attention)
  graphdef, state = nnx.split(model.layers)
  flags = None if patch is None else (patch.layers, patch.heads, patch.deltas,
                                      patch.head_outputs)
  where = None if patch is None else patch.positions[None, :, None]  # [1, T, 1]

  def body(x, xs):
    layer_state, flag = xs
    block = nnx.merge(graphdef, layer_state)
    attn = block.attn
    q, k, v = attn.queries_keys_values(block.input_norm(x), cos, sin)
    probs = attn.probabilities(q, k, mask)
    heads = attn.heads(probs, v)
    if flag is not None:
      use_layer, use_heads, other_delta, other_heads = flag
      heads = jnp.where(use_heads[None, None, :, None] & where[..., None],
                        other_heads.astype(heads.dtype), heads)
    y = block.after_attention(x, attn.output(heads))
    if flag is not None:
      y = jnp.where(use_layer & where, x + other_delta.astype(y.dtype), y)
    out = {"states": y, "deltas": y - x, "probs": probs, "heads": heads}
    return y, {name: out[name] for name in emit}

  h, emitted = jax.lax.scan(body, model.embed_tokens(tokens), (state, flags))
  return h, emitted


def no_patch(positions: jax.Array, deltas: jax.Array, head_outputs: jax.Array) -> Patch:
  """A Patch at `positions` [T] bool that takes nothing yet (layer and head flags all False)
  over the other run's values (deltas [L, B, T, D], head_outputs [L, B, T, N, H])."""
  num_layers, num_heads = head_outputs.shape[0], head_outputs.shape[3]
  return Patch(jnp.zeros(num_layers, bool), jnp.zeros((num_layers, num_heads), bool),
               jnp.asarray(positions, bool), deltas, head_outputs)
