"""Rotary position embeddings, including Llama 3.1's frequency scaling.

Follows HF `transformers.modeling_rope_utils` (`_compute_default_rope_parameters`,
`_compute_llama3_parameters`) and `apply_rotary_pos_emb` (rotate-half layout:
dimension i pairs with i + head_dim/2), computed in float32 as HF does.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dihal_jax.backbone.config import BackboneConfig


def inverse_frequencies(cfg: BackboneConfig) -> np.ndarray:
  """[head_dim/2] float32 inverse frequencies, with llama3 scaling if configured."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  old_len = scaling.original_max_position_embeddings
  low_freq_wavelen = old_len / scaling.low_freq_factor
  high_freq_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, N, H] by cos/sin [B, T, H] (rotate-half convention), in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
