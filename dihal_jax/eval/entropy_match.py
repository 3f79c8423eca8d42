"""Reading at matched entropy: the readout temperature at which samples have real text's
unigram entropy.

Perplexity falls steeply as entropy falls (a sampler that repeats frequent tokens scores
well), so rows are compared where their unigram entropy is within ENTROPY_TOL nats of real
text's. `matched_temperature` bisects T (entropy rises with T) over draws from the same
states; `dihal ablate` and `dihal eval` with eval.match_entropy read their joint rows at it.
`matched_joint_read` does it for `dihal eval`'s rows of any size: T is bisected on the first
FIT_WINDOWS windows, whose sorted joint scores are kept between draws, and the rest are drawn
once at the T found.
"""

from __future__ import annotations

import numpy as np

from dihal_jax.eval import metrics

ENTROPY_TOL = 0.1  # nats
T_RANGE = (0.05, 4.0)  # the bisection's bracket
T_ITERS = 12
# The windows a row's temperature is bisected on: their sorted joint scores stay in memory
# (values and ids, ~3 GB for 128 SmolLM2 windows of 64 tokens).
FIT_WINDOWS = 128


def matched_temperature(read, target: float, start: int = 1) -> tuple[float, np.ndarray, bool]:
  """(T, tokens, matched): bisection on T in T_RANGE for the unigram entropy of positions
  start.. within ENTROPY_TOL of target; `read(T)` -> tokens [N, n]. Unmatched: the closest
  read."""
  lo, hi = T_RANGE
  best = None
  for _ in range(T_ITERS):
    t = float(np.sqrt(lo * hi))  # geometric midpoint
    tokens = read(t)
    h = metrics.unigram_entropy(tokens[:, start:])
    if best is None or abs(h - target) < abs(best[2] - target):
      best = (t, tokens, h)
    if abs(h - target) <= ENTROPY_TOL:
      return t, tokens, True
    lo, hi = (t, hi) if h < target else (lo, t)
  return best[0], best[1], False


def matched_joint_read(reader, head, parts: list, given: np.ndarray, known: np.ndarray,
                       real: np.ndarray, start: int, cfg) -> tuple[np.ndarray, float, bool]:
  """(tokens [N, n], T, matched) of the joint readout (hybrid/readout.py) of `parts`, one
  (states [b, n, d], the read's key, rows: a slice of given's rows) per batch, in order; known
  positions keep given's tokens. T is bisected on the batches that start within the first
  FIT_WINDOWS rows against real text's entropy over as many windows (positions start..);
  the rest are drawn at that T. Every batch's draw is `reader.joint(states, head, key, cfg,
  temperature=T)`'s."""
  fit = [p for p in parts if p[2].start < FIT_WINDOWS]
  scores = [reader.joint_scores(h, head, cfg.beta) for h, _, _ in fit]

  def kept(drawn, rows):
    return np.where(known[rows], given[rows], np.asarray(drawn))

  def read(t: float) -> np.ndarray:
    return np.concatenate([kept(reader.draw(sc, k, t, cfg.top_p), rows)
                           for sc, (_, k, rows) in zip(scores, fit)])

  n_fit = min(fit[-1][2].stop, len(given))
  t, tokens, matched = matched_temperature(read, metrics.unigram_entropy(real[:n_fit, start:]),
                                           start)
  del scores
  rest = [kept(reader.joint(h, head, k, cfg, temperature=t), rows)
          for h, k, rows in parts[len(fit):]]
  return np.concatenate([tokens, *rest]), t, matched
