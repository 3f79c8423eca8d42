"""Normalization of h_l for the bridge: the space the denoiser works in.

DESIGN.md: per channel by default, or one global scale; the statistics come
from one streaming pass (`data.hidden.ChannelStats`, stored next to the
hidden-state cache) and are saved with every bridge checkpoint.
`pca_whiten` (the third option of DESIGN.md) needs the full covariance and
is not implemented yet.

Usage:
  norm = Normalizer.from_stats(stats["3"], kind="per_channel")
  z = norm.forward(h); h_again = norm.inverse(z)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dihal_jax.errors import UserInputError

KINDS = ("per_channel", "global")


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """z = (h - mean) / scale, channel-wise; `scale` is [d] (per_channel) or all equal (global)."""

  kind: str
  mean: np.ndarray  # [d] float32
  scale: np.ndarray  # [d] float32, > 0

  @classmethod
  def from_stats(cls, stats: dict, kind: str = "per_channel") -> "Normalizer":
    """From {"mean": [d], "std": [d]} (population std over tokens, position 0 excluded)."""
    if kind not in KINDS:
      raise UserInputError(f"config field bridge.normalization={kind!r}: expected one of {KINDS}"
                           " (pca_whiten is not implemented yet)")
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    if kind == "global":  # one scale: the RMS of the per-channel stds (total variance / d)
      std = np.full_like(std, np.sqrt(np.mean(std ** 2)))
    scale = np.where(std > 0, std, 1.0)
    return cls(kind, mean.astype(np.float32), scale.astype(np.float32))

  def forward(self, h):
    """[..., d] hidden states -> normalized."""
    return (h - jnp.asarray(self.mean)) / jnp.asarray(self.scale)

  def inverse(self, z):
    """[..., d] normalized -> hidden states."""
    return z * jnp.asarray(self.scale) + jnp.asarray(self.mean)

  def to_dict(self) -> dict:
    return {"kind": self.kind, "mean": self.mean.tolist(), "scale": self.scale.tolist()}

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    return cls(d["kind"], np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32))
