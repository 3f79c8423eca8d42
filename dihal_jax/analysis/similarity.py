"""Linear CKA (Kornblith et al. 2019) between two sets of representations of the same inputs.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc
[n, features]. It is 1 for identical representations and for any orthogonal transform or
isotropic scaling of one of them, and near 0 for independent ones; it does not need the
two to have the same width. Computed in float64 from the feature side (features^2 memory,
not n^2), which suits n = thousands of tokens and widths of hundreds to thousands.

Linear CKA is a variance-weighted measure: a few tokens with massive norms (SmolLM2's
middle layers hold tokens 50-140x the median norm) decide it alone. `rms_normalized`
scales every token to unit RMS first, as the next block's input norm does, so that the
comparison is over what the model reads; the report gives both.
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


def rms_normalized(x: np.ndarray) -> np.ndarray:
  """Each row of x [n, d] divided by its root mean square (float64)."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True))
