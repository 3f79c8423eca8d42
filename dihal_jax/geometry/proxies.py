"""Geometry proxies of one layer's hidden states X [N, d] (float32).

- Effective rank (Roy & Vetterli): exp of the entropy of cov(X)'s normalized
  eigenvalues; also from a covariance accumulated elsewhere.
- Local curvature / compactness: M seeded anchors (rows of X) and their k
  nearest neighbours in X (Euclidean, the anchor's own row excluded).
  curvature_i = 1 - (top-m eigenvalues of the neighbours' covariance) / its
  trace (0 = an m-flat patch), from the k x k Gram matrix of the centred
  neighbours, so O(M·k²·d) rather than O(M·d³); compactness_i = mean kNN
  distance / median pairwise distance of X. Medians over anchors are reported.
- Global stiffness: Spearman rho between the ridge-Mahalanobis distances of S
  seeded pairs at this layer and at the reference (embedding) layer X0, rows
  aligned (the same tokens). High = the layer keeps the input's global order.

Everything is float32. Second moments are taken of centred data (shifted by
the first row, then by the mean, so a constant channel centres to exact
zeros), and matmuls ask for the highest precision (GPU TF32 would lose about
three digits). Memory is O(R·d + d²) for R points: the kNN distances are
[M, R], never [R, R]. The jitted inner parts take `cfg` as a static argument;
the public wrappers check it first and raise `UserInputError`.

Usage:
  cfg = ProxyConfig(k=16, anchors=256)
  erank = float(effective_rank(X, key, cfg))
  geo = local_geometry(X, key, cfg)    # {"curvature": scalar, "compactness": scalar}
  rho = float(stiffness(X, X0, key, cfg))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dihal_jax.errors import UserInputError

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
  """Static parameters of the proxies (hashable: a jit static argument)."""

  k: int = 16          # neighbours per anchor
  flat_dim: int = 4    # m: dimension of the flat patch for curvature
  anchors: int = 256   # M
  pairs: int = 4096    # S, for stiffness and for the median pairwise distance
  ridge: float = 1e-3  # γ: P = (C + γ·tr(C)/d·I)^{-1}


def _centered(X: jnp.ndarray) -> jnp.ndarray:
  """X [N, d] -> float32 X minus its mean (shifted by the first row first)."""
  X = jnp.asarray(X, jnp.float32)
  X = X - X[:1]
  return X - X.mean(0)


def _check_points(X) -> int:
  """N of hidden states X [N, d]; at least 2 rows."""
  if len(X.shape) != 2 or X.shape[0] < 2:
    raise UserInputError(f"hidden states of shape {tuple(X.shape)}: expected [N, d] with N >= 2")
  return X.shape[0]


def _require(ok: bool, field: str, value, expected: str):
  if not ok:
    raise UserInputError(f"config field locate.{field}={value!r}: expected {expected}")


def validate(cfg: ProxyConfig, n: int):
  """Checks the local-proxy parameters for n points (fail before any long pass)."""
  _require(cfg.k >= 1 and cfg.k + 1 <= n, "k", cfg.k,
           f"1..N-1 = {n - 1} (N = {n} points, the anchor excluded)")
  _require(1 <= cfg.flat_dim <= cfg.k - 2, "flat_dim", cfg.flat_dim,
           f"1..k-2 = {cfg.k - 2} (k centred neighbours span at most k-1 dimensions)")
  _require(1 <= cfg.anchors <= n, "anchors", cfg.anchors, f"1..N = {n} (the number of points)")
  _require(cfg.pairs >= 1, "pairs", cfg.pairs, ">= 1")
  _require(cfg.ridge > 0, "ridge", cfg.ridge, "> 0")


@jax.jit
def covariance(X: jnp.ndarray) -> jnp.ndarray:
  """[d, d] float32 covariance of X [N, d]: centred, divided by N."""
  Xc = _centered(X)
  return jnp.matmul(Xc.T, Xc, precision=HIGHEST) / X.shape[0]


@jax.jit
def correlation(cov: jnp.ndarray) -> jnp.ndarray:
  """[d, d] D^{-1/2} C D^{-1/2} of a covariance [d, d]; a zero-variance channel keeps std 1."""
  cov = jnp.asarray(cov, jnp.float32)
  std = jnp.sqrt(jnp.clip(jnp.diag(cov), 0.0))
  std = jnp.where(std > 0, std, 1.0)
  return cov / std[:, None] / std[None, :]


@jax.jit
def effective_rank_from_cov(cov: jnp.ndarray) -> jnp.ndarray:
  """exp(-Σ p log p), p = λ/Σλ, λ the eigenvalues of cov [d, d] clipped at 0; 0 if cov = 0."""
  lam = jnp.clip(jnp.linalg.eigvalsh(jnp.asarray(cov, jnp.float32)), 0.0)
  total = lam.sum()
  p = lam / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def effective_rank(X: jnp.ndarray, key: jax.Array, cfg: ProxyConfig = ProxyConfig()) -> jnp.ndarray:
  """Effective rank of cov(X) for X [N, d]; key and cfg unused (the proxies' common signature)."""
  del key, cfg
  _check_points(X)
  return effective_rank_from_cov(covariance(X))


@functools.partial(jax.jit, static_argnames=("n", "count"))
def sample_indices(key: jax.Array, n: int, count: int) -> jnp.ndarray:
  """[count] distinct int32 indices of range(n), seeded by key."""
  return jax.random.permutation(key, n)[:count].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "count"))
def sample_pairs(key: jax.Array, n: int, count: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(i, j), each [count] int32: independent uniform ordered pairs of range(n) with i != j."""
  key_i, key_j = jax.random.split(key)
  i = jax.random.randint(key_i, (count,), 0, n)
  j = (i + jax.random.randint(key_j, (count,), 1, n)) % n
  return i.astype(jnp.int32), j.astype(jnp.int32)


def local_samples(key: jax.Array, n: int,
                  cfg: ProxyConfig) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
  """(anchors [M], (i, j)) used by `local_geometry` for n points.

  split(key) gives the anchor key and the pair key; (i, j) are all n(n-1)/2
  pairs i < j when that is at most cfg.pairs, else cfg.pairs sampled pairs.
  """
  key_anchors, key_pairs = jax.random.split(key)
  anchors = sample_indices(key_anchors, n, cfg.anchors)
  if n * (n - 1) // 2 <= cfg.pairs:
    i, j = np.triu_indices(n, 1)
    return anchors, (jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32))
  return anchors, sample_pairs(key_pairs, n, cfg.pairs)


def _neighbours(Xc: jnp.ndarray, anchors: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The k nearest rows of Xc [N, d] to each anchor, itself excluded: ([M, k, d], distances [M, k]).

  Candidates come from |a|² + |x|² - 2a·x on centred data ([M, N]); the
  returned distances are recomputed from the differences (no cancellation).
  """
  a = Xc[anchors]
  sq = jnp.sum(Xc * Xc, axis=1)
  d2 = sq[anchors][:, None] + sq[None, :] - 2 * jnp.matmul(a, Xc.T, precision=HIGHEST)
  d2 = d2.at[jnp.arange(anchors.shape[0]), anchors].set(jnp.inf)
  _, idx = jax.lax.top_k(-d2, k)
  nb = Xc[idx]
  return nb, jnp.linalg.norm(nb - a[:, None], axis=-1)


@functools.partial(jax.jit, static_argnames="cfg")
def _local_geometry(X: jnp.ndarray, key: jax.Array, cfg: ProxyConfig) -> dict[str, jnp.ndarray]:
  Xc = _centered(X)
  anchors, (i, j) = local_samples(key, X.shape[0], cfg)
  nb, dist = _neighbours(Xc, anchors, cfg.k)
  Y = nb - nb.mean(axis=1, keepdims=True)
  gram = jnp.einsum("mkd,mld->mkl", Y, Y, precision=HIGHEST)
  lam = jnp.clip(jnp.linalg.eigvalsh(gram), 0.0)  # ascending
  top = lam[:, -cfg.flat_dim:].sum(axis=-1)
  trace = jnp.sum(Y * Y, axis=(1, 2))
  curvature = jnp.where(trace > 0, 1.0 - top / jnp.where(trace > 0, trace, 1.0), 0.0)
  scale = jnp.median(jnp.linalg.norm(Xc[i] - Xc[j], axis=-1))
  compactness = dist.mean(axis=1) / jnp.where(scale > 0, scale, 1.0)
  return {"curvature": jnp.median(jnp.clip(curvature, 0.0, 1.0)),
          "compactness": jnp.median(compactness)}


def local_geometry(X: jnp.ndarray, key: jax.Array,
                   cfg: ProxyConfig = ProxyConfig()) -> dict[str, jnp.ndarray]:
  """{"curvature", "compactness"}: medians over cfg.anchors anchors of X [N, d] (module doc)."""
  validate(cfg, _check_points(X))
  return _local_geometry(X, key, cfg)


def _mahalanobis_sq(X: jnp.ndarray, cov: jnp.ndarray, i: jnp.ndarray, j: jnp.ndarray,
                    ridge: float) -> jnp.ndarray:
  """[S] squared d_P(x_i, x_j), P = (cov + ridge·tr(cov)/d·I)^{-1}.

  Cholesky + triangular solve (~10x faster than eigh at d = 576); if rounding
  makes the ridged matrix not positive definite, falls back to eigh with the
  eigenvalues clipped at 0 (never NaN).
  """
  X = jnp.asarray(X, jnp.float32)
  cov = jnp.asarray(cov, jnp.float32)
  d = cov.shape[0]
  shift = ridge * jnp.trace(cov) / d
  shift = jnp.where(shift > 0, shift, ridge)
  delta = X[i] - X[j]
  chol = jnp.linalg.cholesky(cov + shift * jnp.eye(d, dtype=cov.dtype))

  def via_cholesky(_):
    z = jax.scipy.linalg.solve_triangular(chol, delta.T, lower=True)
    return jnp.sum(z * z, axis=0)

  def via_eigh(_):
    lam, vecs = jnp.linalg.eigh(cov)
    z = jnp.matmul(delta, vecs, precision=HIGHEST)
    return jnp.sum(z * z / (jnp.clip(lam, 0.0) + shift), axis=-1)

  return jax.lax.cond(jnp.all(jnp.isfinite(chol)), via_cholesky, via_eigh, None)


@functools.partial(jax.jit, static_argnames="cfg")
def pair_distances(X: jnp.ndarray, cov: jnp.ndarray, key: jax.Array,
                   cfg: ProxyConfig) -> jnp.ndarray:
  """[S] squared Mahalanobis distances of the pairs `sample_pairs(key, N, cfg.pairs)`.

  Squared distances have the same ranks as distances; a reference layer's
  distances can be computed once and reused for every layer (`locate`).
  """
  i, j = sample_pairs(key, X.shape[0], cfg.pairs)
  return _mahalanobis_sq(X, cov, i, j, cfg.ridge)


def _stiffness(X, X0, cov, cov0, key, cfg: ProxyConfig) -> float:
  return spearman(pair_distances(X, cov, key, cfg), pair_distances(X0, cov0, key, cfg))


def stiffness(X: jnp.ndarray, X0: jnp.ndarray, key: jax.Array, cfg: ProxyConfig = ProxyConfig(),
              *, cov: jnp.ndarray | None = None, cov0: jnp.ndarray | None = None) -> jnp.ndarray:
  """Spearman rho of Mahalanobis distances of cfg.pairs pairs (from `sample_pairs(key, N, S)`).

  X [N, d] is this layer, X0 [N, d0] the reference layer (same tokens, same
  row order); cov / cov0 default to `covariance` of X / X0.
  """
  n = _check_points(X)
  if _check_points(X0) != n:
    raise UserInputError(f"reference hidden states: {X0.shape[0]} rows, expected {n} (rows of X)")
  _require(cfg.pairs >= 1, "pairs", cfg.pairs, ">= 1")
  _require(cfg.ridge > 0, "ridge", cfg.ridge, "> 0 (hidden-state covariances are often singular)")
  cov = covariance(X) if cov is None else cov
  cov0 = covariance(X0) if cov0 is None else cov0
  for name, c, x in (("cov", cov, X), ("cov0", cov0, X0)):
    if c.shape != (x.shape[1],) * 2:
      raise UserInputError(f"stiffness {name} of shape {tuple(c.shape)}: expected "
                           f"{(x.shape[1],) * 2}")
  return _stiffness(X, X0, cov, cov0, key, cfg)


def spearman(a, b) -> float:
  """Spearman rho of a, b [S] (scipy.stats.spearmanr on the host; ties get averaged ranks)."""
  return float(stats.spearmanr(np.asarray(a, np.float64), np.asarray(b, np.float64)).statistic)
