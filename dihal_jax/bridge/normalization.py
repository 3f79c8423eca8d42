"""Normalization of h_l for the bridge: the space the denoiser works in.

docs/design.md, "Normalization": per-channel scaling gives the few massive-activation
channels (std up to ~90 on SmolLM2) the same weight as the rest, so the
normalization is a config choice:
  per_channel  z = (h - mean) / std_c
  global       z = (h - mean) / s, one s = sqrt(mean_c std_c²) (keeps relative scales)
  pca_whiten   z = ((h - mean) U) / sqrt(λ), U the covariance's eigenvectors
               (descending λ), λ floored at 1e-6 · mean λ: decorrelated, unit variance.
The statistics come from the hidden-state cache (mean/std streamed with it;
the full covariance from `covariance`) and are saved with every bridge
checkpoint. `pca_components` gives the optional PCA init of the UNet's input
projection.

Usage:
  norm = Normalizer.from_stats(stats["3"], kind="per_channel")
  norm = Normalizer.pca_whiten(stats["3"]["mean"], covariance(h_cache))
  z = norm.forward(h); h_again = norm.inverse(z)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.errors import UserInputError

KINDS = ("per_channel", "global", "pca_whiten")
_EIG_FLOOR = 1e-6  # relative floor of the whitening eigenvalues


@functools.partial(jax.tree_util.register_dataclass, data_fields=("mean", "scale", "basis"),
                   meta_fields=("kind",))
@dataclasses.dataclass(frozen=True)
class Normalizer:
  """z = ((h - mean) B) / scale with B = basis ([d, d] orthogonal) or the identity (None).
  A pytree (its arrays the leaves), so it enters jitted functions as one argument."""

  kind: str
  mean: np.ndarray  # [d] float32
  scale: np.ndarray  # [d] float32, > 0
  basis: np.ndarray | None = None  # [d, d] float32, columns = principal directions

  @classmethod
  def from_stats(cls, stats: dict, kind: str = "per_channel",
                 cov: np.ndarray | None = None) -> "Normalizer":
    """From {"mean": [d], "std": [d]} (population std over tokens, position 0 excluded);
    `pca_whiten` also needs the covariance [d, d] (`covariance`)."""
    if kind not in KINDS:
      raise UserInputError(f"config field bridge.normalization={kind!r}: expected one of {KINDS}")
    if kind == "pca_whiten":
      if cov is None:
        raise ValueError("Normalizer.from_stats: pca_whiten needs the covariance")
      return cls.pca_whiten(stats["mean"], cov)
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    if kind == "global":  # one scale: the RMS of the per-channel stds (total variance / d)
      std = np.full_like(std, np.sqrt(np.mean(std ** 2)))
    scale = np.where(std > 0, std, 1.0)
    return cls(kind, mean.astype(np.float32), scale.astype(np.float32))

  @classmethod
  def pca_whiten(cls, mean, cov) -> "Normalizer":
    cov = np.asarray(cov, np.float64)
    eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    floor = _EIG_FLOOR * max(float(eigvals.mean()), np.finfo(np.float64).tiny)
    scale = np.sqrt(np.maximum(eigvals, floor))
    return cls("pca_whiten", np.asarray(mean, np.float32), scale.astype(np.float32),
               eigvecs.astype(np.float32))

  def forward(self, h):
    """[..., d] hidden states -> normalized."""
    centred = h - jnp.asarray(self.mean)
    if self.basis is not None:
      centred = centred @ jnp.asarray(self.basis)
    return centred / jnp.asarray(self.scale)

  def inverse(self, z):
    """[..., d] normalized -> hidden states."""
    h = z * jnp.asarray(self.scale)
    if self.basis is not None:
      h = h @ jnp.asarray(self.basis).T
    return h + jnp.asarray(self.mean)

  def normalized_covariance(self, cov) -> np.ndarray:
    """[d, d] covariance of z given the covariance of h (float64)."""
    a = np.eye(len(self.mean)) if self.basis is None else np.asarray(self.basis, np.float64)
    a = a / np.asarray(self.scale, np.float64)[None, :]
    return a.T @ np.asarray(cov, np.float64) @ a

  def to_dict(self) -> dict:
    out = {"kind": self.kind, "mean": self.mean.tolist(), "scale": self.scale.tolist()}
    if self.basis is not None:
      out["basis"] = self.basis.tolist()
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    basis = None if d.get("basis") is None else np.asarray(d["basis"], np.float32)
    return cls(d["kind"], np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32),
               basis)


def covariance(h: np.ndarray, *, exclude_first: bool = True, chunk: int = 256) -> np.ndarray:
  """[d, d] float64 population covariance of h [N, T, d] over all tokens (position 0
  excluded, as in the cache's stats), read in chunks of windows (h may be a memmap)."""
  d = h.shape[-1]
  total, s, ss = 0, np.zeros(d), np.zeros((d, d))
  for i in range(0, h.shape[0], chunk):
    x = np.asarray(h[i:i + chunk, 1 if exclude_first else 0:], np.float64).reshape(-1, d)
    total += x.shape[0]
    s += x.sum(0)
    ss += x.T @ x
  mean = s / max(total, 1)
  return ss / max(total, 1) - np.outer(mean, mean)


def pca_components(cov_z: np.ndarray, channels: int) -> np.ndarray:
  """[d, channels] float32: the top principal directions of the normalized data
  (unit columns, descending variance) for `UNet.init_input_projection`."""
  d = cov_z.shape[0]
  if channels > d:
    raise UserInputError(f"bridge.pca_init: {channels} UNet channels > d = {d} directions")
  eigvals, eigvecs = np.linalg.eigh((cov_z + cov_z.T) / 2)
  return eigvecs[:, np.argsort(eigvals)[::-1][:channels]].astype(np.float32)
