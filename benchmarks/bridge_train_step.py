"""Bridge training-step benchmark: the JAX `make_train_step` vs the same UNet step in PyTorch.

What: times one optimizer step of the bridge UNet (default `UNetConfig`: C=128,
channel_mults (1, 2, 2), 2 blocks per level, attention at levels 1 and 2) on a
[batch, length, dim] float32 batch of standardized hidden states (defaults:
16 x 64 x 576, SmolLM2-135M's width):
  * JAX: the library's `make_train_step(DiffusionConfig(), OptimConfig(), ...)`
    on a {"data": 1} mesh with DEFAULT_RULES (jitted, state donated);
  * torch: `TorchUNet`, a port of `dihal_jax.bridge.unet.UNet` (channels-first
    [B, C, n] layout, F.conv1d / F.group_norm / scaled_dot_product_attention),
    loaded with the JAX model's parameters, and `torch_train_step`: the same
    draws (t ~ U(1e-3, 1), `sample_known_mask`'s prefix/span/only-0 masks,
    Gaussian noise, clean x0 at known positions), the same loss (v-prediction
    on the cosine schedule, MSE over unknown positions), clip_grad_norm_(1.0),
    torch.optim.AdamW (betas 0.9/0.99, eps 1e-8, weight decay 0.01 on ndim >= 2
    only; fused=True, torch's fastest CPU AdamW: 2x the default for-loop one
    here), the warmup-cosine LR as a LambdaLR, and the EMA (with the library's
    decay warm-up, `ema_decay_at`) via _foreach_lerp_.
Before timing, the two forwards are run on the same random input and known mask
(with every zero- or one-initialized parameter perturbed first, so that the
zero-initialized output projection does not make the check vacuous) and must
agree to FORWARD_TOL; the loss and the gradient norm of one step on identical
draws are compared as well. Each step is warmed up (JAX: compiled; torch: its
first step allocates), then `--steps` steps of each are timed interleaved
(stopping early past `--budget-s`, after at least MIN_STEPS each); the reported
time is the median (the minimum is printed too). torch.compile is opt-in
(`--torch-compile`): it works offline here, but inductor took ~3 minutes to
compile this step on 2 cores.

Why: the target is a JAX/torch speed ratio (torch median / JAX median)
>= 1.2 for the bridge's training step on CPU with the same thread count.

Threads: `--threads` (default os.cpu_count()). torch: torch.set_num_threads.
XLA CPU has no thread-count option (its intra-op pool has one thread per
schedulable core, as backbone_forward.py relies on), so for threads <
os.cpu_count() the process is pinned to the first `threads` cores
(os.sched_setaffinity, before the JAX backend starts) and threads == 1 also
passes --xla_cpu_multi_thread_eigen=false. XLA_FLAGS is stored in the JSON.
The numbers are only meaningful on otherwise idle cores: the 1-minute load
average before and after is printed and stored, with a warning above
LOAD_WARNING (on a shared 2-core machine, torch's OpenMP steps slowed 10-50x
under outside load while XLA's slowed ~2x).

Run (defaults: --batch 16 --length 64 --dim 576 --channels 128 --steps 10 --budget-s 150):
  python benchmarks/bridge_train_step.py --out /tmp/bridge_step.json
  python benchmarks/bridge_train_step.py --check --batch 2 --channels 32   # sanity only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from dihal_jax.bridge import diffusion
from dihal_jax.bridge.train_step import (T_MIN, OptimConfig, ema_decay_at, init_train_state,
                                         learning_rate, make_optimizer, make_train_step,
                                         sample_known_mask)
from dihal_jax.bridge.unet import UNet, UNetConfig, num_params
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from dihal_jax.reports import write_json

FORWARD_TOL = 1e-4   # max |jax - torch| of the forward, relative to max |output| (>= 1)
EPS = 1e-5           # GroupNorm epsilon, as in unet.py
MIN_STEPS = 3        # timed steps of each even past --budget-s
LOAD_WARNING = 0.5   # 1-min load average before the run above which the ratio is flagged


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The PyTorch port of dihal_jax.bridge.unet.UNet (float32). Parameters keep the JAX names
# (kernel, bias, scale, q_proj, ...) so that `load_jax_params` maps them one to one; the
# layouts are torch's: conv kernels [O, C, 3], linear kernels [O, C].


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = x.float()[..., None] * freqs
  return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TGroupNorm(nn.Module):
  def __init__(self, channels: int, groups: int):
    super().__init__()
    self.groups = groups
    self.scale = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):  # [B, C, N]
    return F.group_norm(x, self.groups, self.scale, self.bias, EPS)


class TLinear(nn.Module):
  """[..., C] -> [..., O]; on channels-first [B, C, N] input with `channels_first`."""

  def __init__(self, c_in: int, c_out: int):
    super().__init__()
    self.kernel = nn.Parameter(torch.empty(c_out, c_in))
    self.bias = nn.Parameter(torch.zeros(c_out))

  def forward(self, x, channels_first: bool = False):
    if channels_first:
      return F.conv1d(x, self.kernel[..., None], self.bias)
    return F.linear(x, self.kernel, self.bias)


class TConv1D(nn.Module):
  def __init__(self, c_in: int, c_out: int, stride: int = 1):
    super().__init__()
    self.stride = stride
    self.kernel = nn.Parameter(torch.empty(c_out, c_in, 3))
    self.bias = nn.Parameter(torch.zeros(c_out))

  def forward(self, x):
    return F.conv1d(x, self.kernel, self.bias, stride=self.stride, padding=1)


class TResBlock(nn.Module):
  def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: UNetConfig):
    super().__init__()
    self.norm1 = TGroupNorm(c_in, cfg.groups)
    self.conv1 = TConv1D(c_in, c_out)
    self.film = TLinear(emb_dim, 2 * c_out)
    self.norm2 = TGroupNorm(c_out, cfg.groups)
    self.dropout = nn.Dropout(cfg.dropout)
    self.conv2 = TConv1D(c_out, c_out)
    self.skip = None if c_in == c_out else TLinear(c_in, c_out)

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.film(F.silu(emb))[:, :, None].chunk(2, dim=1)
    h = F.silu(self.norm2(h) * (1 + scale) + shift)
    h = self.conv2(self.dropout(h))
    return (x if self.skip is None else self.skip(x, channels_first=True)) + h


class TSelfAttention(nn.Module):
  def __init__(self, channels: int, cfg: UNetConfig):
    super().__init__()
    self.heads = cfg.heads
    self.norm = TGroupNorm(channels, cfg.groups)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # [M*H, C] and [C, M*H]
      setattr(self, name, nn.Parameter(torch.empty(channels, channels)))
    self.o_bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):  # [B, C, N]
    b, c, n = x.shape
    y = self.norm(x).transpose(1, 2)  # [B, N, C]
    q, k, v = (F.linear(y, p).view(b, n, self.heads, -1).transpose(1, 2)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, no mask
    out = F.linear(out.transpose(1, 2).reshape(b, n, c), self.o_proj, self.o_bias)
    return x + out.transpose(1, 2)


class TStage(nn.Module):
  def __init__(self, c_in, c_out, emb_dim, attention, cfg):
    super().__init__()
    self.res = TResBlock(c_in, c_out, emb_dim, cfg)
    self.attn = TSelfAttention(c_out, cfg) if attention else None

  def forward(self, x, emb):
    x = self.res(x, emb)
    return x if self.attn is None else self.attn(x)


class TUpsample(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.conv = TConv1D(channels, channels)

  def forward(self, x):
    return self.conv(x.repeat_interleave(2, dim=2))


class TorchUNet(nn.Module):
  """`UNet` without class labels and self-conditioning (the defaults), float32."""

  def __init__(self, dim: int, cfg: UNetConfig):
    super().__init__()
    if cfg.num_classes or cfg.self_condition:
      raise ValueError("TorchUNet: class labels / self-conditioning are not ported")
    self.cfg = cfg
    levels = len(cfg.channel_mults)
    c, emb_dim, blocks = cfg.channels, 4 * cfg.channels, cfg.blocks_per_level
    self.in_x = nn.Parameter(torch.empty(c, dim))
    self.in_known = nn.Parameter(torch.empty(c, dim))
    self.in_mask = nn.Parameter(torch.empty(c))
    self.in_bias = nn.Parameter(torch.zeros(c))
    self.time_in = TLinear(c, emb_dim)
    self.time_out = TLinear(emb_dim, emb_dim)
    chans = [c * m for m in cfg.channel_mults]
    skips, ch = [c], c
    self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
    for level, out in enumerate(chans):
      for _ in range(blocks):
        self.down.append(TStage(ch, out, emb_dim, level in cfg.attention_levels, cfg))
        ch = out
        skips.append(ch)
      if level < levels - 1:
        self.downsample.append(TConv1D(ch, ch, stride=2))
        skips.append(ch)
    self.mid1 = TResBlock(ch, ch, emb_dim, cfg)
    self.mid_attn = TSelfAttention(ch, cfg) if levels - 1 in cfg.attention_levels else None
    self.mid2 = TResBlock(ch, ch, emb_dim, cfg)
    self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
    for level in reversed(range(levels)):
      for _ in range(blocks + 1):
        self.up.append(TStage(ch + skips.pop(), chans[level], emb_dim,
                              level in cfg.attention_levels, cfg))
        ch = chans[level]
      if level > 0:
        self.upsample.append(TUpsample(ch))
    self.out_norm = TGroupNorm(ch, cfg.groups)
    self.out_proj = nn.Parameter(torch.zeros(dim, ch))
    self.out_bias = nn.Parameter(torch.zeros(dim))

  def forward(self, x_t, t, known_mask, known):
    """x_t, known [B, n, d] float32, t [B], known_mask [B, n] bool -> [B, n, d]."""
    cfg = self.cfg
    n = x_t.shape[1]
    mask = known_mask[..., None]
    h = (F.linear(x_t, self.in_x) + F.linear(torch.where(mask, known, 0.0), self.in_known)
         + mask * self.in_mask + self.in_bias
         + sinusoidal_embedding(torch.arange(n), cfg.channels))
    h = h.transpose(1, 2).contiguous()  # [B, C, N]
    emb = self.time_out(F.silu(self.time_in(sinusoidal_embedding(1000.0 * t, cfg.channels))))
    levels, blocks = len(cfg.channel_mults), cfg.blocks_per_level
    skips = [h]
    for level in range(levels):
      for i in range(blocks):
        h = self.down[level * blocks + i](h, emb)
        skips.append(h)
      if level < levels - 1:
        h = self.downsample[level](h)
        skips.append(h)
    h = self.mid1(h, emb)
    if self.mid_attn is not None:
      h = self.mid_attn(h)
    h = self.mid2(h, emb)
    for j, level in enumerate(reversed(range(levels))):
      for i in range(blocks + 1):
        h = self.up[j * (blocks + 1) + i](torch.cat([h, skips.pop()], dim=1), emb)
      if level > 0:
        h = self.upsample[j](h)
    return F.linear(F.silu(self.out_norm(h)).transpose(1, 2), self.out_proj, self.out_bias)


def to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  """A JAX UNet parameter (by its leaf name) in the layout of the TorchUNet parameter."""
  if name == "kernel" and value.ndim == 3:                   # conv [3, C, O] -> [O, C, 3]
    return value.transpose(2, 1, 0)
  if name in ("kernel", "in_x", "in_known", "out_proj"):     # [C, O] -> [O, C]
    return value.T
  if name in ("q_proj", "k_proj", "v_proj"):                 # [C, M, H] -> [M*H, C]
    return value.reshape(value.shape[0], -1).T
  if name == "o_proj":                                       # [M, H, C] -> [C, M*H]
    return value.reshape(-1, value.shape[-1]).T
  return value


def load_jax_params(torch_model: TorchUNet, params: nnx.State) -> None:
  """Copies every nnx.Param of the JAX UNet into the TorchUNet (all must match by name)."""
  torch_params = dict(torch_model.named_parameters())
  seen = set()
  for path, var in nnx.to_flat_state(params):
    name = ".".join(map(str, path))
    value = to_torch_layout(str(path[-1]), np.asarray(var.get_value()))
    target = torch_params[name]
    if tuple(target.shape) != value.shape:
      raise ValueError(f"{name}: torch {tuple(target.shape)} vs jax {value.shape}")
    with torch.no_grad():
      target.copy_(torch.from_numpy(np.array(value)))
    seen.add(name)
  if seen != set(torch_params):
    raise ValueError(f"torch parameters without a JAX value: {sorted(set(torch_params) - seen)}")


def perturb(params: nnx.State, key: jax.Array) -> nnx.State:
  """Every all-zero or all-one parameter (biases, norm scales, out_proj) plus noise,
  so that the forward check exercises every parameter."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, p in zip(keys, leaves):
    if bool(jnp.all(p == 0)) or bool(jnp.all(p == 1)):
      scale = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(p.shape[0])
      p = p + scale * jax.random.normal(k, p.shape, p.dtype)
    out.append(p)
  return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# The torch training step.


def torch_signal_noise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """(a, σ) of the cosine schedule, as `diffusion.signal_noise(t, "cosine")`."""
  c = math.pi / (2 * (1 + diffusion.COSINE_S))
  norm = math.sin(c) ** 2
  t = t.clamp(0.0, 1.0)
  ab = (torch.sin((1 - t) * c) ** 2 / norm).clamp_min(diffusion.ALPHA_BAR_MIN)
  one_minus = (torch.sin(t * c) * torch.sin((2 - t) * c) / norm).clamp_max(
      1 - diffusion.ALPHA_BAR_MIN)
  return ab.sqrt(), one_minus.sqrt()


def torch_known_mask(batch: int, n: int, gen: torch.Generator, p_prefix: float = 0.5,
                     p_span: float = 0.25) -> torch.Tensor:
  """bool [batch, n], the distribution of `train_step.sample_known_mask`."""
  u = torch.rand(batch, generator=gen)
  length = torch.randint(1, n, (batch,), generator=gen)
  start = torch.randint(1, n, (batch,), generator=gen)
  v = torch.rand(batch, generator=gen)
  end = start + 1 + torch.minimum((v * (n - start)).floor().long(), n - start - 1)
  pos = torch.arange(n)[None, :]
  prefix = pos < length[:, None]
  span = (pos == 0) | ((pos >= start[:, None]) & (pos < end[:, None]))
  only0 = (pos == 0).expand(batch, n)
  kind_prefix = (u < p_prefix)[:, None]
  kind_span = ((u >= p_prefix) & (u < p_prefix + p_span))[:, None]
  return torch.where(kind_prefix, prefix, torch.where(kind_span, span, only0))


def torch_loss(model, x0, t, known_mask, noise):
  """v-prediction MSE over the unknown positions, x_t with clean x0 at known positions."""
  a, sigma = (s[:, None, None] for s in torch_signal_noise(t))
  mask = known_mask[..., None]
  x_t = torch.where(mask, x0, a * x0 + sigma * noise)
  out = model(x_t, t, known_mask, torch.where(mask, x0, 0.0))
  weight = (~mask).float()
  err = (out - (a * noise - sigma * x0)).square()
  return (err * weight).sum() / (weight.sum() * x0.shape[-1]).clamp_min(1.0)


def lr_factor(cfg: OptimConfig, step: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, 1, warmup, total, 0) at `step`."""
  if step < cfg.warmup_steps:
    return step / cfg.warmup_steps
  frac = min((step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1), 1.0)
  return 0.5 * (1 + math.cos(math.pi * frac))


def ema_decay(cfg: OptimConfig, step: int) -> float:
  """`train_step.ema_decay_at`: min(ema_decay, (1 + step)/(10 + step)) with warm-up."""
  return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def torch_train_step(model: TorchUNet, cfg: OptimConfig, batch: np.ndarray, compile_model: bool):
  """A closure running one training step on `batch` (fresh draws each call)."""
  params = list(model.parameters())
  decay = [p for p in params if p.ndim >= 2]
  no_decay = [p for p in params if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=1e-8, fused=True)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
  ema = [p.detach().clone() for p in params]
  x0 = torch.from_numpy(batch)
  b, n, _ = x0.shape
  gen = torch.Generator().manual_seed(0)
  forward = torch.compile(model) if compile_model else model
  counter = [0]

  def step():
    t = torch.rand(b, generator=gen) * (1 - T_MIN) + T_MIN
    known_mask = torch_known_mask(b, n, gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss = torch_loss(forward, x0, t, known_mask, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
    opt.step()
    sched.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - ema_decay(cfg, counter[0]))
    counter[0] += 1
    return loss.item(), grad_norm.item()

  return step


# ---------------------------------------------------------------------------------------------


def set_threads(threads: int) -> None:
  """torch.set_num_threads and, below os.cpu_count(), pin the process (XLA's pool follows)."""
  cores = sorted(os.sched_getaffinity(0))
  if threads < len(cores):
    os.sched_setaffinity(0, cores[:threads])
    if threads == 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_cpu_multi_thread_eigen=false").strip()
  torch.set_num_threads(threads)


def check_agreement(jax_model: UNet, torch_model: TorchUNet, batch: np.ndarray,
                    diffusion_cfg: diffusion.DiffusionConfig, optim_cfg: OptimConfig) -> dict:
  """Asserts that the two forwards agree (max |diff| <= FORWARD_TOL x output scale), that
  the loss and gradient norm on identical draws agree, and that the LR and EMA-decay
  schedules match the library's; returns the numbers."""
  b, n, d = batch.shape
  rng = np.random.default_rng(1)
  x_t = rng.standard_normal((b, n, d), np.float32)
  known = rng.standard_normal((b, n, d), np.float32)
  t = rng.uniform(T_MIN, 1.0, b).astype(np.float32)
  known_mask = np.array(sample_known_mask(jax.random.key(2), b, n))
  noise = rng.standard_normal((b, n, d), np.float32)

  jax_out = np.asarray(nnx.jit(lambda m, *a: m(*a))(jax_model, x_t, t, known_mask, known))
  with torch.no_grad():
    torch_out = torch_model(*map(torch.from_numpy, (x_t, t, known_mask, known))).numpy()
  forward_diff = float(np.max(np.abs(jax_out - torch_out)))
  out_scale = float(np.max(np.abs(jax_out)))
  if not forward_diff <= FORWARD_TOL * max(out_scale, 1.0):
    raise AssertionError(f"JAX and torch forwards differ: max |diff| {forward_diff:.3g}, "
                         f"output scale {out_scale:.3g}")
  for step in range(0, optim_cfg.total_steps + 2, 7):  # the schedules, step by step
    np.testing.assert_allclose(lr_factor(optim_cfg, step) * optim_cfg.lr,
                               learning_rate(optim_cfg, step), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(ema_decay(optim_cfg, step), ema_decay_at(optim_cfg, step),
                               rtol=1e-6)

  x0 = batch
  mask = known_mask[..., None]
  graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)

  def jax_loss(params):
    model = nnx.merge(graphdef, params, rest)
    x_t = jnp.where(mask, x0, diffusion.q_sample(x0, t, noise, diffusion_cfg.schedule))
    out = model(x_t, t, known_mask, jnp.where(mask, x0, 0.0))
    return diffusion.loss(out, x0, noise, t, ~known_mask, diffusion_cfg)

  loss_j, grads = jax.jit(jax.value_and_grad(jax_loss))(params)
  torch_model.zero_grad(set_to_none=True)
  loss_t = torch_loss(torch_model, *map(torch.from_numpy, (x0, t, known_mask, noise)))
  loss_t.backward()
  gnorm_t = torch.nn.utils.get_total_norm([p.grad for p in torch_model.parameters()])
  torch_model.zero_grad(set_to_none=True)
  np.testing.assert_allclose(loss_t.item(), float(loss_j), rtol=FORWARD_TOL)
  np.testing.assert_allclose(float(gnorm_t), float(optax.tree.norm(grads)), rtol=10 * FORWARD_TOL)
  return {"forward_max_abs_diff": forward_diff, "forward_max_abs_output": out_scale,
          "loss_jax": float(loss_j), "loss_torch": loss_t.item(),
          "grad_norm_jax": float(optax.tree.norm(grads)), "grad_norm_torch": float(gnorm_t)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=64, help="window n (positions)")
  parser.add_argument("--dim", type=int, default=576, help="hidden width d (SmolLM2-135M: 576)")
  parser.add_argument("--channels", type=int, default=128, help="UNetConfig.channels")
  parser.add_argument("--steps", type=int, default=10, help="timed steps of each")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--budget-s", type=float, default=150.0,
                      help=f"stop timing after this many seconds (at least {MIN_STEPS} steps each)")
  parser.add_argument("--check", action="store_true",
                      help="only the JAX/torch agreement checks (a quick sanity: try "
                      "--check --batch 2 --channels 32), no timing")
  parser.add_argument("--torch-compile", action="store_true",
                      help="also time the torch step with torch.compile(model) (inductor)")
  args = parser.parse_args()

  set_threads(args.threads)  # before the JAX backend starts
  load_before = os.getloadavg()[0]
  unet_cfg = UNetConfig(channels=args.channels)
  diffusion_cfg, optim_cfg = diffusion.DiffusionConfig(), OptimConfig()
  batch = np.random.default_rng(0).standard_normal((args.batch, args.length, args.dim),
                                                   np.float32)

  jax_model = UNet(args.dim, unet_cfg, rngs=nnx.Rngs(0))
  n_params = num_params(jax_model)
  nnx.update(jax_model, perturb(nnx.state(jax_model, nnx.Param), jax.random.key(1)))
  torch_model = TorchUNet(args.dim, unet_cfg)
  load_jax_params(torch_model, nnx.state(jax_model, nnx.Param))
  check = check_agreement(jax_model, torch_model, batch, diffusion_cfg, optim_cfg)
  if args.check:
    print(f"check passed: forward max |jax - torch| = {check['forward_max_abs_diff']:.2e} "
          f"(output max |y| {check['forward_max_abs_output']:.2f}); loss "
          f"{check['loss_jax']:.6f}/{check['loss_torch']:.6f}, grad norm "
          f"{check['grad_norm_jax']:.5f}/{check['grad_norm_torch']:.5f} (jax/torch)")
    return

  # JAX: the library's step; the state is donated, so the closure carries it along.
  mesh = make_mesh({"data": 1})
  jax_step = make_train_step(diffusion_cfg, optim_cfg, mesh, DEFAULT_RULES)
  carry = {"state": init_train_state(jax_model, make_optimizer(optim_cfg))}
  key, x = jax.random.key(0), jnp.asarray(batch)

  def jax_fn():  # float(loss) waits for the whole executable, as the training loop's does
    carry["state"], metrics = jax_step(carry["state"], x, key)
    return float(metrics["loss"])

  fns = {"jax": jax_fn, "torch": torch_train_step(torch_model, optim_cfg, batch, False)}
  if args.torch_compile:
    compiled_model = TorchUNet(args.dim, unet_cfg)
    compiled_model.load_state_dict(torch_model.state_dict())
    fns["torch_compile"] = torch_train_step(compiled_model, optim_cfg, batch, True)
  warmup = {name: seconds(fn) for name, fn in fns.items()}  # JAX: compile + first step
  times = {name: [] for name in fns}
  start = time.perf_counter()
  for i in range(args.steps):  # interleaved, so that outside load hits all alike
    for name, fn in fns.items():
      times[name].append(seconds(fn))
    if i + 1 >= MIN_STEPS and time.perf_counter() - start > args.budget_s:
      break  # a loaded machine: torch's OpenMP steps can take 10x longer
  load_after = os.getloadavg()[0]

  medians = {name: statistics.median(ts) for name, ts in times.items()}
  ratio = medians["torch"] / medians["jax"]
  goal = 1.2
  results = {
      "jax_step_s": medians["jax"], "torch_step_s": medians["torch"],
      "jax_step_min_s": min(times["jax"]), "torch_step_min_s": min(times["torch"]),
      "ratio_torch_over_jax": ratio, "goal": goal, "goal_met": ratio >= goal,
      "load_warning": load_before > LOAD_WARNING,
      **({"torch_compile_step_s": medians["torch_compile"],
          "ratio_torch_compile_over_jax": medians["torch_compile"] / medians["jax"]}
         if "torch_compile" in medians else {}),
      "agreement": check,
      "settings": {
          "batch": args.batch, "length": args.length, "dim": args.dim,
          "unet": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in vars(unet_cfg).items()},
          "unet_params": n_params, "dtype": "float32", "steps": len(times["jax"]),
          "budget_s": args.budget_s,
          "diffusion": vars(diffusion_cfg), "optim": vars(optim_cfg),
          "threads": args.threads, "torch_num_threads": torch.get_num_threads(),
          "affinity": sorted(os.sched_getaffinity(0)), "torch_compile": args.torch_compile,
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "torch": torch.__version__,
          "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
          "jax_devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_1min_before": load_before, "load_average_1min_after": load_after,
      },
      "raw_seconds": {"warmup": warmup, **times},
  }

  print(f"Bridge UNet training step ({n_params / 1e6:.1f}M params, C={args.channels} "
        f"mults={unet_cfg.channel_mults}), float32, batch={args.batch} n={args.length} "
        f"d={args.dim}, median of {len(times['jax'])}; {args.threads} threads "
        f"(torch.set_num_threads({torch.get_num_threads()}), XLA CPU pool on "
        f"{len(os.sched_getaffinity(0))} cores)")
  print(f"  {'':26s}{'median s':>10s}{'min s':>10s}{'first s':>10s}")
  rows = [("jax (make_train_step)", "jax"), ("torch (eager)", "torch"),
          ("torch (torch.compile)", "torch_compile")]
  for label, name in rows:
    if name in medians:
      print(f"  {label:26s}{medians[name]:10.4f}{min(times[name]):10.4f}{warmup[name]:10.2f}")
  print(f"  torch/jax = {ratio:.2f} (goal >= {goal}): {'met' if ratio >= goal else 'NOT met'}"
        + (" (unreliable: see the load warning)" if load_before > LOAD_WARNING else ""))
  print(f"  forward agreement: max |jax - torch| = {check['forward_max_abs_diff']:.2e} "
        f"(output max |y| {check['forward_max_abs_output']:.2f}, tol {FORWARD_TOL:g}); "
        f"loss {check['loss_jax']:.6f}/{check['loss_torch']:.6f}, grad norm "
        f"{check['grad_norm_jax']:.5f}/{check['grad_norm_torch']:.5f} (jax/torch)")
  print(f"  1-min load average before/after: {load_before:.2f}/{load_after:.2f}")
  if load_before > LOAD_WARNING:
    print(f"  WARNING: load average {load_before:.2f} before the run: other processes share "
          "the cores, and torch's OpenMP threads suffer far more from that than XLA's pool; "
          "the ratio is not meaningful, rerun on idle cores")
  if args.out:
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
