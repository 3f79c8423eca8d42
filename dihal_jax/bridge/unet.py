"""1D UNet over positions: the denoiser of the DiHAL bridge (docs/design.md, "Bridge").

What: given a noised, standardized hidden-state window x_t [B, n, d], the
diffusion time t [B] in [0, 1], a mask of *known* positions with their clean
values, and optionally class labels and a self-conditioning estimate x0_prev,
the UNet returns a prediction [B, n, d] (ε, x0 or v: the diffusion code says
which it trains).

Why this shape: the bridge generates a whole window of h_ℓ at once. Convolutions
mix neighbouring positions at every resolution, bidirectional self-attention at
the coarse levels mixes the whole window, and skip connections at every level
keep the low-noise detail that a pure bottleneck smooths away.

Layout (C = cfg.channels, level l has C * channel_mults[l] channels):
  input   x_t W_x + (known * mask) W_k + mask w_m (+ x0_prev W_s) + b, a linear
          map of the channel concatenation kept as separate parameters so that
          `init_input_projection` can load PCA components into W_x; plus a
          sinusoidal position embedding (no parameters).
  down    per level: `blocks_per_level` resblocks (each followed by attention at
          `attention_levels`), then a stride-2 conv (all but the coarsest level).
  middle  resblock, attention (if the coarsest level has attention), resblock.
  up      coarsest level first: `blocks_per_level + 1` resblocks, each on the
          channel concatenation with one skip (+ attention), then nearest x2 +
          conv (all but the finest level).
  output  GroupNorm -> SiLU -> linear C -> d, zero-initialized (initial output 0).
  time    sinusoidal embedding of 1000 t -> linear C -> 4C -> SiLU -> linear 4C ->
          4C (+ class embedding, row num_classes = null label) -> per resblock
          FiLM: GroupNorm(h) * (1 + scale) + shift.

Matmuls and convs run in `dtype` with float32 accumulation; GroupNorm, softmax
and the output projection are float32, and the output is float32.

Layers: GroupNorm, the linear maps (time MLP, FiLM, skips) and the convs are
`nnx.GroupNorm` / `nnx.Linear` / `nnx.Conv` as `group_norm`, `linear` and `conv1d`
configure them (float32 statistics, float32 accumulation and bias, explicit (1, 1)
padding); the attention core is `jax.nn.dot_product_attention`. The input and
output projections and the attention's q/k/v/o projections stay plain parameters
with einsums: `nnx.MultiHeadAttention` has q/k/v biases (this attention has none)
and computes its logits in `dtype`, and keeping these parameter paths keeps
existing bridge checkpoints loadable.

Usage:
  model = UNet(576, UNetConfig(), rngs=nnx.Rngs(0))
  model.init_input_projection(pca_components)       # optional, [576, C]
  pred = model(x_t, t, known_mask, known)           # [B, n, 576] float32

Einsum letters: B batch, N positions (n), S key positions, D model width (d),
C channels in, O channels out, M heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

_INIT = nnx.initializers.lecun_normal()  # fan_in = every axis but the last (conv taps included)
_ZEROS = nnx.initializers.zeros
_EPS = 1e-5  # GroupNorm epsilon (PyTorch's default)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the bridge UNet (see the module docstring)."""
  channels: int = 128                   # C, channels of the finest level
  channel_mults: tuple = (1, 2, 2)      # per resolution level, finest first
  blocks_per_level: int = 2
  attention_levels: tuple = (1, 2)      # levels (0 = finest) with bidirectional self-attention
  heads: int = 4
  groups: int = 8                       # GroupNorm groups
  dropout: float = 0.0
  num_classes: int = 0                  # > 0: class-label conditioning; label -1 = null (CFG)
  self_condition: bool = False          # Analog-Bits style extra input x0_prev
  max_len: int = 4096                   # longest window n the model accepts


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[..., dim] float32: concat(sin(x f), cos(x f)), f_i = max_period^(-i / (dim/2)).

  Used for the time (x = 1000 t) and for positions (x = 0..n-1).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _param(rngs: nnx.Rngs, shape, names, dtype, init=_INIT) -> nnx.Param:
  """A parameter annotated with logical axis names (see `parallel.sharding`)."""
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(names))


def _einsum(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """einsum with operands in `dtype` and a float32 result (float32 accumulation)."""
  return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_operands(args, dtype=None, inexact=True):
  """`promote_dtype` of the nnx Linear/Conv layers: input and kernel in `dtype`, bias in float32.

  With `preferred_element_type=float32` the layer then sums in float32 and adds the
  float32 bias to the float32 result; callers cast that result to `dtype`.
  """
  del inexact
  x, kernel, bias = args
  return x.astype(dtype), kernel.astype(dtype), None if bias is None else bias.astype(jnp.float32)


def _float32(args, dtype=None, inexact=True):
  """`promote_dtype` of the nnx GroupNorm: input, scale and bias in float32 (the output is
  cast to the layer's `dtype`)."""
  del dtype, inexact
  return tuple(None if a is None else a.astype(jnp.float32) for a in args)


def _axes(*names: str) -> dict:
  """Variable metadata: logical axis names (see `parallel.sharding`)."""
  return {"logical_axes": names}


def group_norm(channels: int, groups: int, *, dtype, param_dtype,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm over (positions, channels of a group) per example of x [B, N, C], eps 1e-5,
  computed in float32, output in `dtype`."""
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=_EPS, use_fast_variance=False,
                       dtype=dtype, param_dtype=param_dtype, promote_dtype=_float32,
                       scale_metadata=_axes("norm"), bias_metadata=_axes("norm"), rngs=rngs)


def linear(c_in: int, c_out: int, names: tuple[str, str], *, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  """x [..., C] -> [..., O] with bias, in `dtype` with a float32 result; `names` are the
  kernel's logical axes (the bias gets the last)."""
  return nnx.Linear(c_in, c_out, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT,
                    bias_init=_ZEROS, promote_dtype=_matmul_operands,
                    preferred_element_type=jnp.float32, kernel_metadata=_axes(*names),
                    bias_metadata=_axes(*names[1:]), rngs=rngs)


def conv1d(c_in: int, c_out: int, *, stride: int = 1, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Conv:
  """Convolution over positions of x [B, N, C], kernel [3, C, O], zero padding 1 per side,
  with bias, in `dtype` with a float32 result.

  stride 1 keeps n; stride 2 halves an even n (PyTorch's Conv1d(k=3, stride=2,
  padding=1); Flax's 'SAME' would pad (0, 1) there).
  """
  return nnx.Conv(c_in, c_out, kernel_size=(3,), strides=stride, padding=[(1, 1)],
                  dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, bias_init=_ZEROS,
                  promote_dtype=_matmul_operands, preferred_element_type=jnp.float32,
                  kernel_metadata=_axes("conv_taps", "channels", "channels_out"),
                  bias_metadata=_axes("channels_out"), rngs=rngs)


class ResBlock(nnx.Module):
  """GroupNorm -> SiLU -> conv -> GroupNorm -> FiLM(emb) -> SiLU -> dropout -> conv, + skip."""

  def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: UNetConfig, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.norm1 = group_norm(c_in, cfg.groups, **kw)
    self.conv1 = conv1d(c_in, c_out, **kw)
    self.film = linear(emb_dim, 2 * c_out, ("time_embed", "channels_out"), **kw)
    self.norm2 = group_norm(c_out, cfg.groups, **kw)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.conv2 = conv1d(c_out, c_out, **kw)
    self.skip = None if c_in == c_out else linear(c_in, c_out, ("channels", "channels_out"), **kw)

  def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool) -> jax.Array:
    """x [B, N, C], emb [B, E] -> [B, N, O]."""
    dt = self.dtype
    h = self.conv1(jax.nn.silu(self.norm1(x))).astype(dt)
    scale, shift = jnp.split(self.film(jax.nn.silu(emb)).astype(dt)[:, None, :], 2, axis=-1)
    h = jax.nn.silu(self.norm2(h) * (1 + scale) + shift)
    h = self.conv2(self.dropout(h, deterministic=deterministic)).astype(dt)
    return (x if self.skip is None else self.skip(x).astype(dt)) + h


class SelfAttention(nnx.Module):
  """x + MHSA(GroupNorm(x)): every position attends to every position (no causal mask)."""

  def __init__(self, channels: int, cfg: UNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    if channels % cfg.heads:
      raise ValueError(f"attention: {channels} channels are not divisible by {cfg.heads} heads")
    m, h = cfg.heads, channels // cfg.heads
    self.dtype = dtype
    self.scale = h ** -0.5
    self.norm = group_norm(channels, cfg.groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Plain parameters, not nnx.MultiHeadAttention: that has q/k/v biases and computes the
    # logits in `dtype`; these paths are also what existing checkpoints hold.
    in_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    names = ("channels", "q_heads", "head_dim")
    self.q_proj = _param(rngs, (channels, m, h), names, param_dtype, init=in_init)
    self.k_proj = _param(rngs, (channels, m, h), names, param_dtype, init=in_init)
    self.v_proj = _param(rngs, (channels, m, h), names, param_dtype, init=in_init)
    self.o_proj = _param(rngs, (m, h, channels), ("q_heads", "head_dim", "channels"), param_dtype,
                         init=nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))
    self.o_bias = _param(rngs, (channels,), ("channels",), param_dtype, init=_ZEROS)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.norm(x)
    q, k, v = (_einsum("BNC,CMH->BNMH", y, p[...], self.dtype).astype(self.dtype)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    # Logits and softmax in float32, probabilities back in `dtype` (XLA implementation).
    out = jax.nn.dot_product_attention(q, k, v, scale=self.scale)
    out = _einsum("BNMH,MHC->BNC", out, self.o_proj[...], self.dtype)
    return x + (out + self.o_bias[...].astype(jnp.float32)).astype(x.dtype)


class Stage(nnx.Module):
  """A resblock, followed by self-attention at attention levels."""

  def __init__(self, c_in: int, c_out: int, emb_dim: int, attention: bool, cfg: UNetConfig, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.res = ResBlock(c_in, c_out, emb_dim, cfg, **kw)
    self.attn = SelfAttention(c_out, cfg, **kw) if attention else None

  def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool) -> jax.Array:
    x = self.res(x, emb, deterministic)
    return x if self.attn is None else self.attn(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 over positions, then a conv."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv = conv1d(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(x, 2, axis=1)).astype(self.dtype)


class UNet(nnx.Module):
  """The bridge denoiser (see the module docstring).

  Args:
    dim: d, the width of the hidden states.
    cfg: architecture.
    dtype: compute dtype of matmuls and convs (norms, softmax, output: float32).
    param_dtype: storage dtype of parameters.
  """

  def __init__(self, dim: int, cfg: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    levels = len(cfg.channel_mults)
    if dim < 1:
      raise ValueError(f"UNet: dim={dim} must be positive")
    if cfg.channels < 2 or cfg.channels % 2:
      raise ValueError(f"UNet: channels={cfg.channels} must be even and positive "
                       "(sinusoidal embeddings)")
    if levels < 1 or any(m < 1 for m in cfg.channel_mults):
      raise ValueError(f"UNet: channel_mults={cfg.channel_mults} must be non-empty and positive")
    if cfg.blocks_per_level < 1:
      raise ValueError(f"UNet: blocks_per_level={cfg.blocks_per_level} must be >= 1")
    if any(not 0 <= l < levels for l in cfg.attention_levels):
      raise ValueError(f"UNet: attention_levels={cfg.attention_levels} outside 0..{levels - 1}")
    if cfg.heads < 1:
      raise ValueError(f"UNet: heads={cfg.heads} must be >= 1")
    if cfg.groups < 1:
      raise ValueError(f"UNet: groups={cfg.groups} must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
      raise ValueError(f"UNet: dropout={cfg.dropout} outside [0, 1)")
    if cfg.num_classes < 0:
      raise ValueError(f"UNet: num_classes={cfg.num_classes} must be >= 0")
    if cfg.max_len < 1:
      raise ValueError(f"UNet: max_len={cfg.max_len} must be >= 1")
    self.dim = dim
    self.cfg = cfg
    self.dtype = dtype
    self.factor = 2 ** (levels - 1)  # n must be a multiple: every downsample halves n
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c, emb_dim, blocks = cfg.channels, 4 * cfg.channels, cfg.blocks_per_level

    self.in_x = _param(rngs, (dim, c), ("embed", "channels"), param_dtype)
    self.in_known = _param(rngs, (dim, c), ("embed", "channels"), param_dtype)
    self.in_mask = _param(rngs, (c,), ("channels",), param_dtype, init=nnx.initializers.normal(1.0))
    self.in_self = (_param(rngs, (dim, c), ("embed", "channels"), param_dtype)
                    if cfg.self_condition else None)
    self.in_bias = _param(rngs, (c,), ("channels",), param_dtype, init=_ZEROS)

    self.time_in = linear(c, emb_dim, ("channels", "time_embed"), **kw)
    self.time_out = linear(emb_dim, emb_dim, ("time_embed", "time_embed_out"), **kw)
    self.class_embed = (_param(rngs, (cfg.num_classes + 1, emb_dim), ("classes", "time_embed"),
                               param_dtype, init=nnx.initializers.normal(1.0))
                        if cfg.num_classes else None)

    chans = [c * m for m in cfg.channel_mults]
    skips = [c]  # channels of every skip, in the order the down path pushes them
    ch = c
    down, downsample = [], []
    for level, out in enumerate(chans):
      for _ in range(blocks):
        down.append(Stage(ch, out, emb_dim, level in cfg.attention_levels, cfg, **kw))
        ch = out
        skips.append(ch)
      if level < levels - 1:
        downsample.append(conv1d(ch, ch, stride=2, **kw))
        skips.append(ch)
    self.down, self.downsample = nnx.List(down), nnx.List(downsample)

    self.mid1 = ResBlock(ch, ch, emb_dim, cfg, **kw)
    self.mid_attn = SelfAttention(ch, cfg, **kw) if levels - 1 in cfg.attention_levels else None
    self.mid2 = ResBlock(ch, ch, emb_dim, cfg, **kw)

    up, upsample = [], []
    for level in reversed(range(levels)):
      for _ in range(blocks + 1):
        up.append(Stage(ch + skips.pop(), chans[level], emb_dim, level in cfg.attention_levels,
                        cfg, **kw))
        ch = chans[level]
      if level > 0:
        upsample.append(Upsample(ch, **kw))
    self.up, self.upsample = nnx.List(up), nnx.List(upsample)

    self.out_norm = group_norm(ch, cfg.groups, **kw)
    self.out_proj = _param(rngs, (ch, dim), ("channels", "embed"), param_dtype, init=_ZEROS)
    self.out_bias = _param(rngs, (dim,), ("norm",), param_dtype, init=_ZEROS)

  def init_input_projection(self, components: jax.Array) -> None:
    """Overwrites the x_t part of the input projection, W_x [d, C] (e.g. PCA components)."""
    components = jnp.asarray(components)
    if components.shape != self.in_x.shape:
      raise ValueError(f"init_input_projection: components of shape {components.shape}, "
                       f"expected {self.in_x.shape} (d, channels)")
    self.in_x.set_value(components.astype(self.in_x.dtype))

  def __call__(self, x_t: jax.Array, t: jax.Array, known_mask: jax.Array, known: jax.Array,
               labels: jax.Array | None = None, x0_prev: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """The prediction [B, n, d] (float32).

    Args:
      x_t: [B, n, d] noised standardized hidden states.
      t: [B] diffusion time in [0, 1].
      known_mask: [B, n] bool, True where the clean value is given.
      known: [B, n, d] clean values; ignored where known_mask is False.
      labels: [B] int in [-1, num_classes), -1 = null label; only with
        num_classes > 0, where None means null for every row.
      x0_prev: [B, n, d] previous x0 estimate; only with self_condition, where
        None means zeros (the first self-conditioning pass).
      deterministic: False applies dropout (needs the constructor's rngs).
    """
    cfg = self.cfg
    chex.assert_rank(x_t, 3)
    b, n, d = x_t.shape
    if d != self.dim:
      raise ValueError(f"UNet: x_t width {d}, model built for d={self.dim}")
    if n % self.factor:
      raise ValueError(f"UNet: n={n} positions is not a multiple of 2^(levels-1) = {self.factor}")
    if n > cfg.max_len:
      raise ValueError(f"UNet: n={n} positions exceeds max_len={cfg.max_len}")
    chex.assert_shape(t, (b,))
    chex.assert_shape(known_mask, (b, n))
    chex.assert_shape(known, (b, n, d))
    if labels is not None and not cfg.num_classes:
      raise ValueError("UNet: labels given but num_classes=0")
    if x0_prev is not None and not cfg.self_condition:
      raise ValueError("UNet: x0_prev given but self_condition=False")

    mask = known_mask.astype(bool)[..., None]
    h = (_einsum("BND,DC->BNC", x_t, self.in_x[...], self.dtype)
         + _einsum("BND,DC->BNC", jnp.where(mask, known, 0), self.in_known[...], self.dtype)
         + mask * self.in_mask[...].astype(jnp.float32)
         + self.in_bias[...].astype(jnp.float32)
         + sinusoidal_embedding(jnp.arange(n), cfg.channels))
    if x0_prev is not None:
      chex.assert_shape(x0_prev, (b, n, d))
      h = h + _einsum("BND,DC->BNC", x0_prev, self.in_self[...], self.dtype)
    h = h.astype(self.dtype)

    emb = self.time_in(sinusoidal_embedding(1000.0 * t, cfg.channels)).astype(self.dtype)
    emb = self.time_out(jax.nn.silu(emb)).astype(self.dtype)
    if self.class_embed is not None:
      rows = jnp.full((b,), -1) if labels is None else labels
      chex.assert_shape(rows, (b,))
      rows = jnp.where(rows < 0, cfg.num_classes, rows)
      emb = emb + jnp.take(self.class_embed[...], rows, axis=0).astype(self.dtype)

    levels, blocks = len(cfg.channel_mults), cfg.blocks_per_level
    skips = [h]
    for level in range(levels):
      for i in range(blocks):
        h = self.down[level * blocks + i](h, emb, deterministic)
        skips.append(h)
      if level < levels - 1:
        h = self.downsample[level](h).astype(self.dtype)
        skips.append(h)

    h = self.mid1(h, emb, deterministic)
    if self.mid_attn is not None:
      h = self.mid_attn(h)
    h = self.mid2(h, emb, deterministic)

    for j, level in enumerate(reversed(range(levels))):
      for i in range(blocks + 1):
        h = self.up[j * (blocks + 1) + i](jnp.concatenate([h, skips.pop()], axis=-1), emb,
                                          deterministic)
      if level > 0:
        h = self.upsample[j](h)

    out = _einsum("BNC,CD->BND", jax.nn.silu(self.out_norm(h)), self.out_proj[...], jnp.float32)
    return out + self.out_bias[...].astype(jnp.float32)


def num_params(model: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param leaves) of a model."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
