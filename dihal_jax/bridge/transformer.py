"""A transformer denoiser made of the backbone's own blocks: the bridge's second architecture.

What: m pre-norm blocks of the backbone's architecture (RMSNorm, RoPE, grouped-query
attention, SwiGLU; `backbone.model.Block`) run with *bidirectional* attention over the
window. Same call as the UNet: (x_t, t, known_mask, known, labels, x0_prev) -> a
prediction [B, n, d] in the bridge's normalized space (x0 by default: see
`bridge/denoiser.py`).

Why this way (ELF, TEncDM, DiffuGPT: a pretrained network knows the language a
from-scratch denoiser cannot learn from a few million tokens):
- Backbone units. The normalized input is mapped back to the backbone's own units
  (h = z·scale·Bᵀ + mean, the bridge normalizer's inverse, stored as constants), so
  blocks copied from the backbone (`init=backbone`, blocks ℓ+1..ℓ+m by default) see
  the kind of input they were trained on.
- Time conditioning that starts as the identity. Per block, a zero-initialized linear
  map of the time embedding gives adaLN shift/scale/gate for attention and MLP:
  x + (1 + g)·f(norm(x)·(1 + s) + b). At step 0 every copied block computes exactly
  what it computed in the backbone (causal mask aside).
- Known positions enter as their clean values plus a learned (zero-initialized)
  "known" vector; self-conditioning adds a zero-initialized linear map of x0_prev.
- Output: RMSNorm, then a zero-initialized linear map to the normalized space
  (initial prediction 0, the data mean).

Usage:
  model = TransformerDenoiser(backbone.cfg, TransformerConfig(blocks=4), norm, rngs=nnx.Rngs(0))
  model.load_blocks(backbone, first=layer)        # init=backbone: blocks layer+1..layer+4
  pred = model(x_t, t, known_mask, known)         # [B, n, d] float32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.backbone import rope
from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.model import Block, Decoder, RMSNorm
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.unet import linear, sinusoidal_embedding


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of the transformer denoiser (`bridge.transformer` in the config)."""
  blocks: int = 4              # m, blocks of the backbone's architecture
  first_block: int = 0         # init=backbone: copy blocks first_block.. (1-based); 0 = ℓ + 1
  time_dim: int = 128          # width of the time embedding feeding the adaLN maps
  self_condition: bool = True  # extra input x0_prev (Analog Bits)


class Constant(nnx.Variable):
  """Fixed state saved with the model but never trained (the normalizer's affine map)."""


def _zero(layer: nnx.Linear) -> nnx.Linear:
  layer.kernel.set_value(jnp.zeros_like(layer.kernel[...]))
  return layer


class TransformerDenoiser(nnx.Module):
  """Bidirectional backbone blocks with adaLN-zero time conditioning (module docstring)."""

  def __init__(self, block_cfg: BackboneConfig, cfg: TransformerConfig, norm: Normalizer, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    d = block_cfg.hidden_size
    if len(norm.mean) != d:
      raise ValueError(f"TransformerDenoiser: normalizer of width {len(norm.mean)} vs blocks of "
                       f"width {d}")
    self.cfg, self.block_cfg = cfg, block_cfg
    basis = np.eye(d, dtype=np.float32) if norm.basis is None else norm.basis
    self.mean = Constant(jnp.asarray(norm.mean, jnp.float32))
    # h = z @ to_backbone + mean, to_backbone = diag(scale) Bᵀ (Normalizer.inverse).
    self.to_backbone = Constant(jnp.asarray(norm.scale[:, None] * basis.T, jnp.float32))
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.blocks = nnx.List([Block(block_cfg, **kw) for _ in range(cfg.blocks)])
    self.time_in = linear(cfg.time_dim, cfg.time_dim, ("time_embed", "time_embed_out"), **kw)
    self.time_out = linear(cfg.time_dim, cfg.time_dim, ("time_embed", "time_embed_out"), **kw)
    self.modulation = nnx.List([
        _zero(linear(cfg.time_dim, 6 * d, ("time_embed", "channels_out"), **kw))
        for _ in range(cfg.blocks)])
    self.known_embed = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("norm",))
    self.self_cond = (_zero(linear(d, d, ("embed", "channels_out"), **kw))
                      if cfg.self_condition else None)
    self.out_norm = RMSNorm(d, eps=block_cfg.rms_norm_eps, param_dtype=jnp.float32, rngs=rngs)
    self.out = _zero(linear(d, d, ("embed", "channels_out"), **kw))

  def load_blocks(self, backbone: Decoder, first: int) -> None:
    """Copies backbone blocks first..first+m-1 (1-based; block l outputs h_l) into the blocks."""
    layers = nnx.state(backbone.layers)
    for i, block in enumerate(self.blocks):
      nnx.update(block, jax.tree.map(lambda a, i=i: jnp.array(a[first - 1 + i]), layers))

  def __call__(self, x_t, t, known_mask, known, labels=None, x0_prev=None, *,
               deterministic: bool = True):
    """Prediction [B, n, d] float32 for x_t [B, n, d] (normalized), t [B], known_mask [B, n]
    bool with clean `known` values [B, n, d]; x0_prev [B, n, d] with self_condition."""
    del deterministic  # no dropout
    if labels is not None:
      raise ValueError("TransformerDenoiser: class labels are not supported (UNet only)")
    out = self.out(self.out_norm(self.trunk(x_t, t, known_mask, known, x0_prev)))
    return out.astype(jnp.float32)

  def trunk(self, x_t, t, known_mask, known, x0_prev=None) -> jax.Array:
    """The blocks' output [B, n, d] in backbone units, before the output head."""
    b, n, d = x_t.shape
    mask = jnp.asarray(known_mask, bool)[..., None]
    z = jnp.where(mask, known, x_t).astype(jnp.float32)
    h = z @ self.to_backbone[...] + self.mean[...] + mask * self.known_embed[...]
    if self.self_cond is not None:
      prev = jnp.zeros_like(z) if x0_prev is None else x0_prev
      h = h + self.self_cond(prev)
    emb = sinusoidal_embedding(1000.0 * jnp.asarray(t, jnp.float32), self.cfg.time_dim)
    emb = jax.nn.silu(self.time_out(jax.nn.silu(self.time_in(emb))))  # [B, time_dim]
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    cos, sin = rope.rotary_cos_sin(positions, rope.inverse_frequencies(self.block_cfg))
    everywhere = jnp.ones((b, n, n), bool)  # bidirectional
    for block, modulation in zip(self.blocks, self.modulation):
      shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(
          modulation(emb)[:, None, :], 6, axis=-1)
      attn, _ = block.attn(block.input_norm(h) * (1 + scale_a) + shift_a, cos, sin, everywhere)
      h = h + (1 + gate_a) * attn
      h = h + (1 + gate_m) * block.mlp(block.post_attn_norm(h) * (1 + scale_m) + shift_m)
    return h
