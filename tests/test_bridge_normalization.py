"""Normalization of hidden states for the bridge, against NumPy float64."""

import numpy as np
import pytest

from dihal_jax.bridge.normalization import Normalizer, covariance, pca_components
from dihal_jax.data.hidden import ChannelStats
from dihal_jax.errors import UserInputError


def _data():
  rng = np.random.default_rng(0)
  # a few "massive activation" channels, as in SmolLM2, and one constant channel
  scale = np.array([1.0, 0.5, 90.0, 2.0, 0.0, 3.0])
  return (rng.standard_normal((5000, 6)) * scale + [0, 1, 3000, -2, 7, 0]).astype(np.float32)


def _stats(h):
  stats = ChannelStats(h.shape[1])
  stats.update(h)
  return stats.to_dict()


def test_per_channel_standardizes_each_channel():
  h = _data()
  norm = Normalizer.from_stats(_stats(h), "per_channel")
  z = np.asarray(norm.forward(h), np.float64)
  live = [0, 1, 2, 3, 5]
  np.testing.assert_allclose(z[:, live].mean(0), 0, atol=1e-3)
  np.testing.assert_allclose(z[:, live].std(0), 1, rtol=1e-3)
  np.testing.assert_allclose(z[:, 4], 0, atol=1e-6)  # constant channel: scale 1, centred
  np.testing.assert_allclose(np.asarray(norm.inverse(z)), h, rtol=1e-5, atol=2e-3)


def test_global_uses_one_scale_equal_to_the_rms_std():
  h = _data()
  norm = Normalizer.from_stats(_stats(h), "global")
  expected = np.sqrt(np.mean(h.astype(np.float64).std(0) ** 2))
  np.testing.assert_allclose(norm.scale, expected, rtol=1e-4)
  z = np.asarray(norm.forward(h), np.float64)
  np.testing.assert_allclose((z ** 2).mean(), 1.0, rtol=1e-3)  # total variance preserved as d


def test_round_trip_through_dict_and_bad_kind():
  norm = Normalizer.from_stats(_stats(_data()))
  again = Normalizer.from_dict(norm.to_dict())
  np.testing.assert_array_equal(again.mean, norm.mean)
  np.testing.assert_array_equal(again.scale, norm.scale)
  with pytest.raises(UserInputError, match="bridge.normalization"):
    Normalizer.from_stats(_stats(_data()), "zca")


def _correlated(n=20_000, d=5):
  rng = np.random.default_rng(1)
  mixing = rng.normal(size=(d, d)) * np.array([30.0, 1, 1, 0.1, 1])[:, None]
  return (rng.standard_normal((n, d)) @ mixing + 5.0).astype(np.float32)


def test_covariance_matches_numpy_and_skips_position_zero():
  h = _correlated(4000).reshape(400, 10, 5)
  h[:, 0] = 1e4  # position 0 is excluded: a huge value there must not matter
  want = np.cov(h[:, 1:].reshape(-1, 5).astype(np.float64), rowvar=False, bias=True)
  np.testing.assert_allclose(covariance(h, chunk=7), want, rtol=1e-9, atol=1e-9)


def test_pca_whiten_decorrelates_and_inverts():
  h = _correlated()
  x = h.astype(np.float64)
  cov = np.cov(x, rowvar=False, bias=True)
  norm = Normalizer.from_stats(_stats(h), "pca_whiten", cov=cov)
  z = np.asarray(norm.forward(h), np.float64)
  np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(5), atol=2e-3)
  assert np.all(np.diff(norm.scale) <= 0)  # descending variance
  np.testing.assert_allclose(np.asarray(norm.inverse(z)), h, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(norm.normalized_covariance(cov), np.eye(5), atol=1e-4)  # f32 basis
  again = Normalizer.from_dict(norm.to_dict())
  np.testing.assert_array_equal(again.basis, norm.basis)
  with pytest.raises(ValueError, match="covariance"):
    Normalizer.from_stats(_stats(h), "pca_whiten")


def test_pca_components_are_the_top_eigenvectors():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  cov = q @ np.diag([9.0, 4.0, 1.0, 0.5, 0.2, 0.1]) @ q.T
  comps = pca_components(cov, 2)
  for j in range(2):  # each column is ± the j-th direction
    assert abs(abs(comps[:, j] @ q[:, j]) - 1) < 1e-6
  with pytest.raises(UserInputError, match="pca_init"):
    pca_components(cov, 7)
