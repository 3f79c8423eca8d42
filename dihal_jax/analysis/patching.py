"""Activation patching: which layers and heads carry the clean input's answer.

For a task's clean and corrupted rows (analysis/tasks.py) the logit difference
LD = logit(clean answer) - logit(corrupted answer) at the answer is large on the clean run
and small or negative on the corrupted one. Patching one block's contribution (or one
head's output), at the position that reads the answer only, from the clean run into the
corrupted run moves it part of the way back:

  restoration = (mean LD_patched - mean LD_corrupt) / (mean LD_clean - mean LD_corrupt)

(the ratio of means over items, as in Wang et al. 2022's IOI analysis; 1 = the patched
component alone restores the clean answer, 0 = it carries none of it). The layer profile
is one number per block; `early_share` is the share of the positive restoration that
the first third of the blocks holds (the "more early-layer processing" claim as a number).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.analysis import trace as tracing
from dihal_jax.analysis.tasks import Items
from dihal_jax.backbone.model import Decoder


@dataclasses.dataclass
class Subject:
  """A model under study: its attention pattern ([T, T] or None = causal) and where it reads
  token P's prediction (position P - offset: 1 for next-token logits, as the AR model and a
  shifted MDM have; 0 for an unshifted MDM)."""

  model: Decoder
  attention: jax.Array | None
  offset: int


@nnx.jit(static_argnames=("read", "emit"))
def read_logits(model: Decoder, tokens, attention, patch, read: int, emit: tuple = ()):
  """(logits [B, V] at position `read`, the emitted traces) of a (patched) run; the LM head
  runs at that one position only."""
  h, emitted = tracing.trace(model, tokens, attention=attention, patch=patch, emit=emit)
  return model.logits(h[:, read:read + 1])[:, 0], emitted


def logit_difference(logits: jax.Array, answer: np.ndarray, other: np.ndarray) -> float:
  """Mean over items of logits[answer] - logits[other] (logits [n, V])."""
  rows = np.arange(len(answer))
  logits = np.asarray(logits, np.float64)
  return float(np.mean(logits[rows, answer] - logits[rows, other]))


def early_share(profile: np.ndarray) -> float:
  """Share of the positive restoration in the first ceil(L / 3) blocks (nan if none)."""
  positive = np.clip(np.asarray(profile, np.float64), 0.0, None)
  total = positive.sum()
  return float(positive[:math.ceil(len(positive) / 3)].sum() / total) if total > 0 else math.nan


def patching_profile(subject: Subject, items: Items, *, head_layers: int) -> dict:
  """Accuracy on the clean rows, LD clean/corrupt, the per-layer restoration and, for the
  `head_layers` layers that restore most, the per-head restoration."""
  model, read = subject.model, items.position - subject.offset
  cfg = model.cfg
  clean_logits, clean = read_logits(model, jnp.asarray(items.clean), subject.attention, None,
                                    read, ("deltas", "heads"))
  corrupt = jnp.asarray(items.corrupt)
  corrupt_logits, _ = read_logits(model, corrupt, subject.attention, None, read)
  ld_clean = logit_difference(clean_logits, items.answer, items.corrupt_answer)
  ld_corrupt = logit_difference(corrupt_logits, items.answer, items.corrupt_answer)
  at_read = jnp.arange(items.clean.shape[1]) == read
  empty = tracing.no_patch(at_read, clean["deltas"], clean["heads"])

  def restored(patch: tracing.Patch) -> float:
    logits, _ = read_logits(model, corrupt, subject.attention, patch, read)
    ld = logit_difference(logits, items.answer, items.corrupt_answer)
    return (ld - ld_corrupt) / (ld_clean - ld_corrupt)

  layers = [restored(empty._replace(layers=empty.layers.at[l].set(True)))
            for l in range(cfg.num_layers)]
  top = sorted(np.argsort(-np.asarray(layers))[:head_layers].tolist())
  heads = {int(l) + 1: [restored(empty._replace(heads=empty.heads.at[l, n].set(True)))
                        for n in range(cfg.num_heads)] for l in top}
  accuracy = np.asarray(jnp.argmax(clean_logits, axis=-1)) == items.answer
  return {"accuracy": float(accuracy.mean()), "correct": int(accuracy.sum()),
          "ld_clean": ld_clean, "ld_corrupt": ld_corrupt, "layers": layers, "heads": heads,
          "early_share": early_share(np.asarray(layers))}
