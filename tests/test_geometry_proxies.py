"""Geometry proxies against float64 NumPy/SciPy references written here, known answers, invariances.

The references share only the sampled indices with the code under test
(`local_samples`, `sample_pairs`); kNN, eigenvalues, distances and ranks are
recomputed independently (explicit loops, d x d covariances, scipy).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist, pdist
from scipy.stats import spearmanr

from dihal_jax.errors import UserInputError
from dihal_jax.geometry.proxies import (ProxyConfig, correlation, covariance, effective_rank,
                                        effective_rank_from_cov, local_geometry, local_samples,
                                        sample_indices, sample_pairs, spearman, stiffness)

KEY = jax.random.key(0)


# --- float64 references -------------------------------------------------------

def ref_erank(X: np.ndarray) -> float:
  lam = np.clip(np.linalg.eigvalsh(np.cov(np.asarray(X, np.float64).T, bias=True)), 0, None)
  p = lam / lam.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def ref_local(X: np.ndarray, cfg: ProxyConfig, key) -> dict[str, float]:
  X = np.asarray(X, np.float64)
  anchors, (i, j) = local_samples(key, len(X), cfg)
  anchors, i, j = np.asarray(anchors), np.asarray(i), np.asarray(j)
  if len(X) * (len(X) - 1) // 2 <= cfg.pairs:
    scale = np.median(pdist(X))
  else:
    scale = np.median(np.linalg.norm(X[i] - X[j], axis=1))
  curv, comp = [], []
  for a in anchors:
    dist = cdist(X[a:a + 1], X)[0]
    dist[a] = np.inf
    nb = np.argsort(dist)[:cfg.k]
    lam = np.linalg.eigvalsh(np.cov(X[nb].T, bias=True))[::-1]
    curv.append(1 - lam[:cfg.flat_dim].sum() / lam.sum())
    comp.append(dist[nb].mean() / scale)
  return {"curvature": float(np.median(curv)), "compactness": float(np.median(comp))}


def ref_mahalanobis(X: np.ndarray, i, j, ridge: float) -> np.ndarray:
  X = np.asarray(X, np.float64)
  C = np.cov(X.T, bias=True)
  P = np.linalg.inv(C + ridge * np.trace(C) / len(C) * np.eye(len(C)))
  diff = X[i] - X[j]
  return np.sqrt(np.einsum("sd,de,se->s", diff, P, diff))


def ref_stiffness(X, X0, cfg: ProxyConfig, key) -> float:
  i, j = (np.asarray(a) for a in sample_pairs(key, len(X), cfg.pairs))
  return float(spearmanr(ref_mahalanobis(X, i, j, cfg.ridge),
                         ref_mahalanobis(X0, i, j, cfg.ridge)).statistic)


# --- data ---------------------------------------------------------------------

def cloud(n: int, d: int, seed: int, offset: float = 50.0) -> np.ndarray:
  """Anisotropic Gaussian [n, d] float32, far from the origin (tests the centring)."""
  rng = np.random.default_rng(seed)
  scales = np.geomspace(3.0, 0.1, d)
  return (rng.normal(size=(n, d)) * scales + offset).astype(np.float32)


def orthogonal(d: int, seed: int) -> np.ndarray:
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def sphere(n: int, seed: int) -> np.ndarray:
  P = np.random.default_rng(seed).normal(size=(n, 3))
  return (P / np.linalg.norm(P, axis=1, keepdims=True)).astype(np.float32)


# --- against the references ---------------------------------------------------

def test_covariance_matches_numpy():
  X = cloud(1000, 48, 0, offset=1000.0)
  C = np.asarray(covariance(X))
  ref = np.cov(X.astype(np.float64).T, bias=True)
  np.testing.assert_allclose(C, ref, atol=1e-6 * np.abs(ref).max())


def test_effective_rank_matches_reference():
  X = cloud(1500, 64, 1)
  ref = ref_erank(X)
  np.testing.assert_allclose(float(effective_rank(X, KEY)), ref, rtol=1e-5)
  # From a covariance accumulated elsewhere (float64).
  cov64 = np.cov(X.astype(np.float64).T, bias=True)
  np.testing.assert_allclose(float(effective_rank_from_cov(cov64)), ref, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("n,d,cfg", [
    (600, 24, ProxyConfig(k=16, flat_dim=4, anchors=64, pairs=2048)),  # sampled pairs, d > k
    (60, 5, ProxyConfig(k=12, flat_dim=2, anchors=60, pairs=4096)),    # all pairs, d < k
])
def test_local_geometry_matches_reference(n, d, cfg):
  X = cloud(n, d, 2)
  got = local_geometry(X, KEY, cfg)
  ref = ref_local(X, cfg, KEY)
  np.testing.assert_allclose(float(got["curvature"]), ref["curvature"], rtol=3e-5)
  np.testing.assert_allclose(float(got["compactness"]), ref["compactness"], rtol=3e-6)


def test_stiffness_matches_reference():
  X0 = cloud(800, 16, 3)
  X = np.tanh(X0 - 50) * 4 + cloud(800, 16, 4, offset=0) * 0.5
  cfg = ProxyConfig(pairs=2048, ridge=1e-2)
  ref = ref_stiffness(X, X0, cfg, KEY)
  assert 0.2 < ref < 0.95  # a non-trivial case
  np.testing.assert_allclose(float(stiffness(X, X0, KEY, cfg)), ref, atol=1e-5)
  # Covariances passed in (float64, accumulated elsewhere) give the same answer.
  covs = {name: np.cov(x.astype(np.float64).T, bias=True) for name, x in (("cov", X), ("cov0", X0))}
  np.testing.assert_allclose(float(stiffness(X, X0, KEY, cfg, **covs)), ref, atol=1e-5)


def test_spearman_matches_scipy():
  rng = np.random.default_rng(5)
  a = rng.normal(size=3000).astype(np.float32)
  b = (a + rng.normal(size=3000) * 2).astype(np.float32)
  np.testing.assert_allclose(float(spearman(a, b)), spearmanr(a, b).statistic, atol=1e-5)


def test_sampling_helpers():
  idx = np.asarray(sample_indices(KEY, 100, 40))
  assert len(set(idx.tolist())) == 40 and idx.min() >= 0 and idx.max() < 100
  np.testing.assert_array_equal(idx, np.asarray(sample_indices(KEY, 100, 40)))
  i, j = (np.asarray(a) for a in sample_pairs(KEY, 7, 5000))
  assert (i != j).all() and min(i.min(), j.min()) >= 0 and max(i.max(), j.max()) < 7
  assert len(set(zip(i.tolist(), j.tolist()))) == 42  # every ordered pair of 7 points drawn


# --- known answers ------------------------------------------------------------

def test_effective_rank_of_rank_5_gaussian():
  rng = np.random.default_rng(6)
  basis = orthogonal(64, 7)[:5]
  X = (rng.normal(size=(20000, 5)) @ basis + 3.0).astype(np.float32)
  assert abs(float(effective_rank(X, KEY)) - 5) < 0.03 * 5


@pytest.mark.slow
def test_curvature_of_plane_and_sphere():
  cfg = ProxyConfig(k=32, flat_dim=2, anchors=128)
  rng = np.random.default_rng(8)
  plane = (rng.normal(size=(400, 2)) @ orthogonal(32, 9)[:2] + 5.0).astype(np.float32)
  assert float(local_geometry(plane, KEY, cfg)["curvature"]) < 1e-5
  # k neighbours of a uniform sphere fill a cap with 1 - cos(theta) = a = 2k/N; there
  # cos(phi) ~ U[1 - a, 1], so normal variance a²/12 over total a - a²/4:
  # curvature ~ (a/12) / (1 - a/4) = 0.0139 for k=32, N=400.
  a = 2 * cfg.k / 400
  expected = (a / 12) / (1 - a / 4)
  got = float(local_geometry(sphere(400, 10), KEY, cfg)["curvature"])
  assert got > 0.01 and abs(got - expected) < 0.25 * expected


def test_stiffness_monotone_and_shuffled():
  X0 = cloud(2000, 32, 11)
  noise = np.random.default_rng(12).normal(size=X0.shape) * 1e-3
  X = (X0 @ orthogonal(32, 13) * 3 + noise).astype(np.float32)
  assert float(stiffness(X, X0, KEY)) > 0.95
  shuffled = X0[np.random.default_rng(14).permutation(len(X0))]
  assert abs(float(stiffness(shuffled, X0, KEY))) < 0.1


# --- invariances --------------------------------------------------------------

def test_invariances():
  X = cloud(600, 24, 15)
  Q = orthogonal(24, 16)
  rotated = (X @ Q).astype(np.float32)
  scaled = (X * 7.3).astype(np.float32)
  erank = float(effective_rank(X, KEY))
  np.testing.assert_allclose(float(effective_rank(rotated, KEY)), erank, rtol=1e-4)
  np.testing.assert_allclose(float(effective_rank(scaled, KEY)), erank, rtol=1e-4)
  cfg = ProxyConfig(k=16, flat_dim=4, anchors=64, pairs=2048)
  base = local_geometry(X, KEY, cfg)
  np.testing.assert_allclose(float(local_geometry(rotated, KEY, cfg)["curvature"]),
                             float(base["curvature"]), rtol=1e-4)
  np.testing.assert_allclose(float(local_geometry(scaled, KEY, cfg)["compactness"]),
                             float(base["compactness"]), rtol=1e-5)


# --- correlation --------------------------------------------------------------

def test_correlation_matches_corrcoef_and_zero_variance_channel():
  X = cloud(500, 10, 17)
  X[:, 3] = 0.1  # constant channel, not exactly representable
  R = np.asarray(correlation(covariance(X)))
  live = [c for c in range(10) if c != 3]
  ref = np.corrcoef(X[:, live].astype(np.float64).T)
  np.testing.assert_allclose(R[np.ix_(live, live)], ref, atol=1e-5)
  assert (R[3] == 0).all() and (R[:, 3] == 0).all()
  # A covariance from elsewhere with an exact zero-variance channel.
  C = np.cov(X.astype(np.float64).T, bias=True)
  np.testing.assert_allclose(np.asarray(correlation(C))[np.ix_(live, live)], ref, atol=1e-6)


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("n,cfg,field", [
    (10, ProxyConfig(k=16, anchors=4), "locate.k=16"),
    (100, ProxyConfig(anchors=256), "locate.anchors=256"),
    (100, ProxyConfig(k=8, flat_dim=7), "locate.flat_dim=7"),
])
def test_bad_local_config(n, cfg, field):
  with pytest.raises(UserInputError, match=field):
    local_geometry(cloud(n, 4, 18), KEY, cfg)


def test_bad_stiffness_input():
  X = cloud(50, 4, 19)
  with pytest.raises(UserInputError, match="locate.ridge=0"):
    stiffness(X, X, KEY, ProxyConfig(ridge=0.0))
  with pytest.raises(UserInputError, match="40 rows"):
    stiffness(X, X[:40], KEY)
  with pytest.raises(UserInputError, match="shape"):
    effective_rank(X[:1], KEY)
