"""Gaussian diffusion over hidden states x0 = h_l [B, n, d]: schedules, targets, loss, samplers.

Continuous time t in [0, 1]: x_t = a(t)·x0 + σ(t)·ε with a = sqrt(ᾱ(t)),
σ = sqrt(1 - ᾱ(t)), so DDIM can run any number of steps on one trained model.

- Schedules: "cosine" (Nichol & Dhariwal, s = 0.008, ᾱ clipped below at
  1e-5 near t = 1, where it would reach 0) and "linear" (β linear from 1e-4
  to 0.02 over 1000 DDPM steps; ᾱ(k/1000) is exactly prod_{i<k}(1 - β_i), log ᾱ
  interpolated linearly in between). Both give a and σ from forms that keep
  their relative precision at both ends (no 1 - ᾱ cancellation).
- Predictions: the model outputs ε, x0 or v = a·ε - σ·x0 (`DiffusionConfig.prediction`);
  `loss` is the MSE to that target over the unknown positions only.
- Samplers over `steps` evenly spaced times 1 = t_K > ... > t_0 = 0: DDIM
  (Song et al.; `eta` = 0 deterministic, 1 the DDPM variance) and DDPM
  ancestral (the posterior q(x_s | x_t, x0_hat)). Known positions are
  re-imposed RePaint-style before every model call (x_t = q_sample(known, t,
  fresh noise)) and set exactly in the output. Classifier-free guidance:
  (1 + w)·cond - w·uncond, the unconditional call with labels = NULL_LABEL.
  One `fori_loop`; random draws are `fold_in(key, step)`; jittable with the
  callable and the config closed over.

Usage:
  cfg = DiffusionConfig(prediction="v", steps=50)
  x_t = q_sample(x0, t, noise, cfg.schedule)
  l = loss(model(x_t, t, known_mask, labels), x0, noise, t, ~known_mask, cfg)
  h = sample(lambda x, t, m, y: model(x, t, m, y), key, (B, n, d), cfg,
             known=h_prefix, known_mask=known_mask)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.errors import UserInputError

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ddim", "ddpm")
NULL_LABEL = -1                 # the "no label" id of classifier-free guidance
COSINE_S = 0.008
ALPHA_BAR_MIN = 1e-5            # cosine clip: ᾱ(t) >= this, so a(1) > 0
LINEAR_STEPS = 1000
LINEAR_BETAS = (1e-4, 0.02)

# log ᾱ at t = k/1000, k = 0..1000 (float64, then float32): 0, cumsum(log(1 - β)).
_LINEAR_LOG_AB = np.concatenate(
    [[0.0], np.cumsum(np.log1p(-np.linspace(*LINEAR_BETAS, LINEAR_STEPS)))]).astype(np.float32)

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Static diffusion settings (hashable: a jit static argument)."""

  schedule: str = "cosine"   # "cosine" | "linear"
  prediction: str = "v"      # "eps" | "x0" | "v"
  steps: int = 50            # sampler steps
  sampler: str = "ddim"      # "ddim" | "ddpm"
  eta: float = 0.0           # DDIM stochasticity: 0 deterministic .. 1 the DDPM variance
  guidance: float = 0.0      # classifier-free guidance weight w (0 = off)


def _require(ok: bool, field: str, value, expected: str):
  if not ok:
    raise UserInputError(f"config field bridge.{field}={value!r}: expected {expected}")


def _check_schedule(schedule: str):
  _require(schedule in SCHEDULES, "schedule", schedule, f"one of {SCHEDULES}")


def validate(cfg: DiffusionConfig):
  """Raises `UserInputError` naming the first bad `bridge.<field>` of cfg."""
  _check_schedule(cfg.schedule)
  _require(cfg.prediction in PREDICTIONS, "prediction", cfg.prediction, f"one of {PREDICTIONS}")
  _require(cfg.sampler in SAMPLERS, "sampler", cfg.sampler, f"one of {SAMPLERS}")
  _require(isinstance(cfg.steps, (int, np.integer)) and not isinstance(cfg.steps, bool)
           and cfg.steps >= 1, "steps", cfg.steps, "an integer >= 1")
  _require(0.0 <= cfg.eta <= 1.0, "eta", cfg.eta, "a number in [0, 1]")
  _require(cfg.guidance >= 0.0, "guidance", cfg.guidance, "a number >= 0")


def signal_noise(t, schedule: str) -> tuple[jax.Array, jax.Array]:
  """(a, σ) = (sqrt(ᾱ(t)), sqrt(1 - ᾱ(t))), float32, shaped like t.

  Cosine: ᾱ = sin²((1-t)c)/sin²(c) and 1 - ᾱ = sin(tc)·sin((2-t)c)/sin²(c),
  c = π/(2(1+s)) (the cos² form rewritten, precise near both ends). Linear:
  log ᾱ interpolated from the 1000-step table, 1 - ᾱ = -expm1(log ᾱ).
  """
  _check_schedule(schedule)
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  if schedule == "cosine":
    c = math.pi / (2 * (1 + COSINE_S))
    norm = math.sin(c) ** 2
    ab = jnp.sin((1 - t) * c) ** 2 / norm
    one_minus = jnp.sin(t * c) * jnp.sin((2 - t) * c) / norm
    ab = jnp.maximum(ab, ALPHA_BAR_MIN)
    one_minus = jnp.minimum(one_minus, 1 - ALPHA_BAR_MIN)
  else:
    log_ab = jnp.interp(t * LINEAR_STEPS, jnp.arange(LINEAR_STEPS + 1, dtype=jnp.float32),
                        jnp.asarray(_LINEAR_LOG_AB))
    ab = jnp.exp(log_ab)
    one_minus = -jnp.expm1(log_ab)
  return jnp.sqrt(ab), jnp.sqrt(one_minus)


def alpha_bar(t, schedule: str) -> jax.Array:
  """ᾱ(t), float32, shaped like t: 1 at t = 0, decreasing to a small positive value at t = 1."""
  a, _ = signal_noise(t, schedule)
  return a * a


def _per_example(t: jax.Array, x: jax.Array, schedule: str) -> tuple[jax.Array, jax.Array]:
  """(a, σ) for t [B], shaped [B, 1, 1] to broadcast over x [B, n, d]."""
  chex.assert_rank(x, 3)
  chex.assert_shape(t, (x.shape[0],))
  a, sigma = signal_noise(t, schedule)
  return a[:, None, None], sigma[:, None, None]


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: str) -> jax.Array:
  """x_t [B, n, d] = a(t)·x0 + σ(t)·noise for x0, noise [B, n, d] and t [B]."""
  chex.assert_equal_shape([x0, noise])
  a, sigma = _per_example(t, x0, schedule)
  return a * x0 + sigma * noise


def target(x0: jax.Array, noise: jax.Array, t: jax.Array, cfg: DiffusionConfig) -> jax.Array:
  """[B, n, d] regression target for cfg.prediction: ε, x0 or v = a·ε - σ·x0."""
  validate(cfg)
  chex.assert_equal_shape([x0, noise])
  if cfg.prediction == "eps":
    return noise
  if cfg.prediction == "x0":
    return x0
  a, sigma = _per_example(t, x0, cfg.schedule)
  return a * noise - sigma * x0


def predict_x0_eps(model_out: jax.Array, x_t: jax.Array, t: jax.Array,
                   cfg: DiffusionConfig) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat), each [B, n, d], from a model output in cfg.prediction's form.

  The inverse of `target` given x_t (a² + σ² = 1). "x0" divides by σ(t):
  needs t > 0.
  """
  validate(cfg)
  chex.assert_equal_shape([model_out, x_t])
  a, sigma = _per_example(t, x_t, cfg.schedule)
  if cfg.prediction == "eps":
    return (x_t - sigma * model_out) / a, model_out
  if cfg.prediction == "x0":
    return model_out, (x_t - a * model_out) / sigma
  return a * x_t - sigma * model_out, sigma * x_t + a * model_out


def loss(model_out: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
         unknown_mask: jax.Array, cfg: DiffusionConfig) -> jax.Array:
  """Scalar MSE to `target` over the unknown positions (unknown_mask [B, n] True) and all channels.

  0 when no position is unknown.
  """
  chex.assert_shape(unknown_mask, x0.shape[:2])
  err = jnp.square(jnp.asarray(model_out, jnp.float32) - target(x0, noise, t, cfg))
  weight = jnp.asarray(unknown_mask, jnp.float32)[..., None]
  count = jnp.sum(weight) * x0.shape[-1]
  return jnp.sum(err * weight) / jnp.maximum(count, 1.0)


def guided(denoise_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, known_mask: jax.Array,
           labels: jax.Array | None, guidance: float) -> jax.Array:
  """denoise_fn's output [B, n, d]; with guidance w > 0 and labels [B], (1+w)·cond - w·uncond.

  The unconditional call gets labels = NULL_LABEL everywhere.
  """
  out = denoise_fn(x_t, t, known_mask, labels)
  chex.assert_equal_shape([out, x_t])
  if guidance == 0.0 or labels is None:
    return out
  uncond = denoise_fn(x_t, t, known_mask, jnp.full_like(labels, NULL_LABEL))
  return (1.0 + guidance) * out - guidance * uncond


def _step(x0_hat: jax.Array, eps_hat: jax.Array, x_t: jax.Array, a_t, sigma_t, a_s, sigma_s,
          key: jax.Array, cfg: DiffusionConfig) -> jax.Array:
  """x_s [B, n, d] for s < t from the model's (x0_hat, eps_hat) at x_t (scalars a, σ)."""
  z = jax.random.normal(key, x_t.shape, jnp.float32)
  # 1 - ᾱ_t/ᾱ_s = (σ_t² - σ_s²)/a_s², written without cancellation at small t.
  beta = (sigma_t - sigma_s) * (sigma_t + sigma_s) / (a_s * a_s)
  if cfg.sampler == "ddpm":
    # q(x_s | x_t, x0): mean a_s·β/σ_t²·x0 + (a_t/a_s)·σ_s²/σ_t²·x_t, variance σ_s²/σ_t²·β.
    mean = (a_s * beta * x0_hat + (a_t / a_s) * sigma_s ** 2 * x_t) / sigma_t ** 2
    return mean + jnp.sqrt(sigma_s ** 2 * beta) / sigma_t * z
  std = cfg.eta * sigma_s / sigma_t * jnp.sqrt(beta)
  direction = jnp.sqrt(jnp.maximum(sigma_s ** 2 - std ** 2, 0.0))
  return a_s * x0_hat + direction * eps_hat + std * z


def sample(denoise_fn: DenoiseFn, key: jax.Array, shape: tuple[int, int, int],
           cfg: DiffusionConfig, *, known: jax.Array | None = None,
           known_mask: jax.Array | None = None, labels: jax.Array | None = None,
           self_condition: bool = False, x_start: jax.Array | None = None,
           t_start: float = 1.0) -> jax.Array:
  """x0 [B, n, d] float32 drawn by cfg.sampler from t = t_start to 0.

  Args:
    denoise_fn: (x_t [B, n, d], t [B], known_mask [B, n] bool, labels [B] int or None)
      -> model output [B, n, d] in cfg.prediction's form; with `self_condition`
      it takes a fifth argument, the previous step's x0 estimate (zeros first).
    key: PRNG key; x_1 from fold_in(key, 0), step k's draws from fold_in(key, k).
    shape: (B, n, d).
    cfg: the diffusion settings (validated here).
    known: [B, n, d] values of the known positions (inpainting); others ignored.
    known_mask: [B, n] bool, True where `known` holds (default: none known).
    labels: [B] int class ids for guidance, NULL_LABEL = unconditional.
    self_condition: feed each step the previous step's x0 estimate.
    x_start: [B, n, d] the state at t_start (default: pure noise, t_start = 1).
      SDEdit-style re-noising: x_start = q_sample(x0, t_start, noise).
    t_start: where x_start sits; the sampler takes round(cfg.steps · t_start)
      steps (at least 1) on the grid k / cfg.steps.
  Returns:
    [B, n, d] float32; equal to `known` at the known positions.
  """
  validate(cfg)
  b, n, d = shape
  if not 0.0 < t_start <= 1.0:
    raise ValueError(f"sample: t_start={t_start} outside (0, 1]")
  if known_mask is None:
    known_mask = jnp.zeros((b, n), bool)
  if known is None:
    known = jnp.zeros(shape, jnp.float32)
  chex.assert_shape(known, shape)
  chex.assert_shape(known_mask, (b, n))
  if labels is not None:
    chex.assert_shape(labels, (b,))
  known = jnp.asarray(known, jnp.float32)
  known_mask = jnp.asarray(known_mask, bool)
  mask = known_mask[..., None]
  first = max(1, round(cfg.steps * t_start))  # the number of steps taken

  def body(i, carry):
    x, x0_prev = carry
    k = first - i
    t = jnp.where(first == cfg.steps, k / cfg.steps, k * (t_start / first))
    s = jnp.where(first == cfg.steps, (k - 1) / cfg.steps, (k - 1) * (t_start / first))
    (a_t, sigma_t), (a_s, sigma_s) = signal_noise(t, cfg.schedule), signal_noise(s, cfg.schedule)
    key_known, key_step = jax.random.split(jax.random.fold_in(key, k))
    noised = a_t * known + sigma_t * jax.random.normal(key_known, shape, jnp.float32)
    x = jnp.where(mask, noised, x)
    t_vec = jnp.full((b,), t, jnp.float32)
    fn = (lambda *a: denoise_fn(*a, x0_prev)) if self_condition else denoise_fn
    out = guided(fn, x, t_vec, known_mask, labels, cfg.guidance)
    x0_hat, eps_hat = predict_x0_eps(jnp.asarray(out, jnp.float32), x, t_vec, cfg)
    return _step(x0_hat, eps_hat, x, a_t, sigma_t, a_s, sigma_s, key_step, cfg), x0_hat

  if x_start is None:
    x = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
  else:
    chex.assert_shape(x_start, shape)
    x = jnp.asarray(x_start, jnp.float32)
  x, _ = jax.lax.fori_loop(0, first, body, (x, jnp.zeros(shape, jnp.float32)))
  return jnp.where(mask, known, x)
