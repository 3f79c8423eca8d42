"""Linear CKA (Kornblith et al. 2019) between two sets of representations of the same inputs.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc
[n, features]. It is 1 for identical representations and for any orthogonal transform or
isotropic scaling of one of them, and near 0 for independent ones; it does not need the
two to have the same width. Computed in float64 from the feature side (features^2 memory,
not n^2), which suits n = thousands of tokens and widths of hundreds to thousands.
"""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA of x [n, p] and y [n, q] (rows are the same n inputs)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"linear_cka: expected [n, p] and [n, q], got {x.shape} and {y.shape}")
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  cross = np.linalg.norm(y.T @ x) ** 2
  return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
