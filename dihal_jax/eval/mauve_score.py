"""MAUVE between generated and real text on sentence-encoder features (`mauve-text`).

MAUVE (Pillutla et al. 2021) compares the two distributions in a quantised
feature space: 1 = indistinguishable, near 0 = disjoint. It is biased upward when
few samples are compared (few k-means buckets: n / 10 by default), so every report
carries the number of samples MAUVE saw; the full preset compares >= 500 per side.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

SCALING = 5  # mauve-text's default c in exp(-c KL)


def mauve(p_features: np.ndarray, q_features: np.ndarray, seed: int = 0) -> float:
  """MAUVE(P, Q) of two feature sets [N, d], [M, d] (mauve-text defaults, seeded k-means)."""
  import mauve as mauve_text
  if min(len(p_features), len(q_features)) < 2:
    return float("nan")
  with _quiet_stderr():  # faiss's k-means warns on stderr below 39 points per centroid
    out = mauve_text.compute_mauve(p_features=np.asarray(p_features, np.float32),
                                 q_features=np.asarray(q_features, np.float32),
                                 mauve_scaling_factor=SCALING, seed=seed, verbose=False)
  return float(out.mauve)


@contextlib.contextmanager
def _quiet_stderr():
  """File descriptor 2 -> /dev/null for C-level prints (Python exceptions still propagate)."""
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
