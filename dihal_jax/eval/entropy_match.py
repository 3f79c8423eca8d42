"""Reading at matched entropy: the readout temperature at which samples have real text's
unigram entropy.

Perplexity falls steeply as entropy falls (a sampler that repeats frequent tokens scores
well), so rows are compared where their unigram entropy is within ENTROPY_TOL nats of real
text's. `matched_temperature` bisects T (entropy rises with T) over draws from the same
states; `dihal ablate` and `dihal eval` with eval.match_entropy read their joint rows at it.
"""

from __future__ import annotations

import numpy as np

from dihal_jax.eval import metrics

ENTROPY_TOL = 0.1  # nats
T_RANGE = (0.05, 4.0)  # the bisection's bracket
T_ITERS = 12


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
