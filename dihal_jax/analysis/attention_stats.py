"""Summaries of attention maps: where each head looks and how spread out it is.

For a query i with probabilities p_ij over keys j (rows sum to 1):
- mean distance   sum_j p_ij |i - j|
- entropy         -sum_j p_ij log p_ij (nats; log of the number of visible keys at most)
- previous token  p_i,i-1
- separator       p_i,0 (the document separator every window starts with)
- future          sum_{j > i} p_ij (0 under a causal mask; a masked diffusion model's
                  bidirectional attention can look ahead)
Each is averaged over the queries in `queries` (position 0 is left out by the caller:
its only visible key is itself in a causal model).
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("mean_distance", "entropy", "previous_token", "separator", "future")


def head_statistics(probs: np.ndarray, queries: np.ndarray) -> dict[str, np.ndarray]:
  """{statistic: [H]} for probs [B, H, T, S] and a bool query selection [B, T]."""
  p = np.asarray(probs, np.float64)
  _, _, t, s = p.shape
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    plogp = np.where(p > 0, p * np.log(p), 0.0)
  per_query = {
      "mean_distance": np.sum(p * np.abs(i - j), axis=-1),
      "entropy": -np.sum(plogp, axis=-1),
      "previous_token": np.sum(p * (j == i - 1), axis=-1),
      "separator": p[..., 0],
      "future": np.sum(p * (j > i), axis=-1),
  }  # each [B, H, T]
  weight = np.asarray(queries, np.float64)[:, None, :]  # [B, 1, T]
  total = weight.sum() * 1.0
  if total == 0:
    raise ValueError("head_statistics: no query selected")
  return {name: np.sum(value * weight, axis=(0, 2)) / total for name, value in per_query.items()}
