"""Bridge diffusion against float64 references written here and problems with known answers.

Schedules are checked against the closed form / np.cumprod; the samplers run
the EXACT optimal denoiser of 1-D Gaussian / Gaussian-mixture data (E[x0 |
x_t] in closed form) and must reproduce the data distribution. Inpainting is
checked against a float64 recurrence of what RePaint-style replacement does to
a correlated Gaussian pair, and against an oracle that sees the clean known
value. The denoisers take a(t), σ(t) from `signal_noise`, which the schedule
tests pin to the closed form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dihal_jax.bridge.diffusion import (DiffusionConfig, alpha_bar, loss, predict_x0_eps,
                                        q_sample, sample, signal_noise, target)
from dihal_jax.errors import UserInputError

KEY = jax.random.key(0)


# --- float64 references -------------------------------------------------------

def ref_alpha_bar(t, schedule: str) -> np.ndarray:
  """ᾱ(t) in float64: Nichol & Dhariwal's cos² ratio clipped at 1e-5, or the 1000-step cumprod."""
  t = np.asarray(t, np.float64)
  if schedule == "cosine":
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.maximum(f(t) / f(0.0), 1e-5)
  ab = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))])
  return ab[np.rint(t * 1000).astype(int)]  # only used at t = k/1000


def ref_a_sigma(t, schedule: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
  ab = ref_alpha_bar(t, schedule)
  return np.sqrt(ab), np.sqrt(1 - ab)


def ref_target(x0, noise, t, prediction: str) -> np.ndarray:
  a, sigma = (v[:, None, None] for v in ref_a_sigma(t))
  return {"eps": noise, "x0": x0, "v": a * noise - sigma * x0}[prediction]


def as_prediction(x0_hat, x_t, t, prediction: str, schedule: str = "cosine"):
  """The model output that encodes x0_hat at x_t [B, n, d], t [B] in `prediction`'s form."""
  a, sigma = (v[:, None, None] for v in signal_noise(t, schedule))
  eps = (x_t - a * x0_hat) / sigma
  return {"eps": eps, "x0": x0_hat, "v": a * eps - sigma * x0_hat}[prediction]


# --- exact denoisers ----------------------------------------------------------

MIX_W, MIX_MU, MIX_S = (0.3, 0.7), (-2.0, 2.0), (0.3, 0.3)


def mixture_x0(x_t, t, schedule):
  """E[x0 | x_t] for x0 ~ Σ_k w_k N(mu_k, s_k²): posterior over k times per-component means."""
  a, sigma = (v[:, None, None] for v in signal_noise(t, schedule))
  logits, means = [], []
  for w, mu, s in zip(MIX_W, MIX_MU, MIX_S):
    var = a ** 2 * s ** 2 + sigma ** 2
    logits.append(math.log(w) - 0.5 * jnp.log(var) - 0.5 * (x_t - a * mu) ** 2 / var)
    means.append(mu + a * s ** 2 / var * (x_t - a * mu))
  post = jax.nn.softmax(jnp.stack(logits), axis=0)
  return jnp.sum(post * jnp.stack(means), axis=0)


def gaussian_x0(m, s):
  def x0_hat(x_t, t, schedule):
    a, sigma = (v[:, None, None] for v in signal_noise(t, schedule))
    return m + a * s ** 2 / (a ** 2 * s ** 2 + sigma ** 2) * (x_t - a * m)
  return x0_hat


def denoiser(x0_fn, cfg: DiffusionConfig):
  """denoise_fn that outputs the exact x0_fn(x_t, t) in cfg.prediction's form."""
  def fn(x_t, t, known_mask, labels):
    del known_mask, labels
    return as_prediction(x0_fn(x_t, t, cfg.schedule), x_t, t, cfg.prediction, cfg.schedule)
  return fn


# --- 1. schedules -------------------------------------------------------------

def test_cosine_schedule_matches_closed_form():
  t = np.linspace(0, 1, 1001, dtype=np.float32)
  ab = np.asarray(alpha_bar(t, "cosine"), np.float64)
  ref = ref_alpha_bar(t, "cosine")
  np.testing.assert_allclose(ab, ref, rtol=2e-6)
  a, sigma = (np.asarray(v, np.float64) for v in signal_noise(t, "cosine"))
  np.testing.assert_allclose(sigma ** 2, 1 - ref, rtol=1e-5)  # naive float32 1 - ᾱ: ~1e-3
  assert ab[0] == 1.0 and sigma[0] == 0.0
  assert ab[-1] == pytest.approx(1e-5, rel=1e-5)               # clipped, > 0
  assert np.all(np.diff(ab) <= 0)


def test_linear_schedule_matches_cumprod():
  k = np.arange(1001)
  ab = np.asarray(alpha_bar(jnp.asarray(k / 1000, jnp.float32), "linear"), np.float64)
  np.testing.assert_allclose(ab, ref_alpha_bar(k / 1000, "linear"), rtol=1e-5)
  _, sigma = signal_noise(jnp.asarray(k / 1000, jnp.float32), "linear")
  np.testing.assert_allclose(np.asarray(sigma, np.float64) ** 2,
                             1 - ref_alpha_bar(k / 1000, "linear"), rtol=1e-5)
  mid = np.asarray(alpha_bar(jnp.asarray((k[:-1] + 0.5) / 1000, jnp.float32), "linear"))
  assert np.all(mid < ab[:-1]) and np.all(mid > ab[1:])


# --- 2. forward process and parameterisations ---------------------------------

def test_q_sample_formula_and_statistics():
  t = np.array([0.05, 0.3, 0.7, 0.95], np.float32)
  x0 = np.broadcast_to(np.array([1.7, -0.4, 3.0, 0.9], np.float32)[:, None, None], (4, 64, 256))
  noise = np.asarray(jax.random.normal(KEY, x0.shape))
  x_t = np.asarray(q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise), "cosine"))
  a, sigma = ref_a_sigma(t)
  np.testing.assert_allclose(x_t, a[:, None, None] * x0 + sigma[:, None, None] * noise,
                             atol=1e-5)
  np.testing.assert_allclose(x_t.mean(axis=(1, 2)), a * x0[:, 0, 0], atol=0.03)
  np.testing.assert_allclose(x_t.var(axis=(1, 2)), sigma ** 2, rtol=0.05)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_and_inverse_round_trip(prediction):
  cfg = DiffusionConfig(prediction=prediction)
  t = jnp.asarray([1e-3, 0.1, 0.5, 0.9, 1.0], jnp.float32)
  k0, k1 = jax.random.split(KEY)
  x0 = 2.0 * jax.random.normal(k0, (5, 7, 3))
  noise = jax.random.normal(k1, (5, 7, 3))
  out = target(x0, noise, t, cfg)
  np.testing.assert_allclose(out, ref_target(np.asarray(x0), np.asarray(noise), np.asarray(t),
                                             prediction), atol=1e-5)
  x0_hat, eps_hat = predict_x0_eps(out, q_sample(x0, t, noise, cfg.schedule), t, cfg)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


# --- 3. loss ------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_masked_mse_over_unknown(prediction):
  cfg = DiffusionConfig(prediction=prediction)
  keys = jax.random.split(KEY, 4)
  x0, noise, out = (jax.random.normal(k, (3, 6, 5)) for k in keys[:3])
  t = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  unknown = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1]], bool)
  err = (np.asarray(out, np.float64)
         - ref_target(np.asarray(x0), np.asarray(noise), np.asarray(t), prediction)) ** 2
  ref = err[unknown].sum() / (unknown.sum() * 5)
  got = loss(out, x0, noise, t, jnp.asarray(unknown), cfg)
  assert float(got) == pytest.approx(ref, rel=1e-5)
  changed = jnp.where(jnp.asarray(unknown)[..., None], out, 100.0 + out)
  assert float(loss(changed, x0, noise, t, jnp.asarray(unknown), cfg)) == float(got)
  assert float(loss(10.0 + out, x0, noise, t, jnp.asarray(unknown), cfg)) != float(got)


def test_loss_with_nothing_unknown_is_zero_not_nan():
  cfg = DiffusionConfig()
  x = jnp.ones((2, 3, 4))
  t = jnp.full((2,), 0.5)
  none = jnp.zeros((2, 3), bool)
  assert float(loss(x, x, x, t, none, cfg)) == 0.0
  grad = jax.grad(lambda o: loss(o, x, x, t, none, cfg))(x)
  assert np.all(np.asarray(grad) == 0.0)


# --- 4. samplers on known answers ---------------------------------------------

MIXTURE_CASES = [
    DiffusionConfig(prediction="eps", sampler="ddim", steps=100),
    DiffusionConfig(prediction="x0", sampler="ddim", steps=100),
    DiffusionConfig(prediction="v", sampler="ddim", steps=100),
    DiffusionConfig(prediction="v", sampler="ddim", steps=100, eta=0.5),
    DiffusionConfig(prediction="eps", sampler="ddpm", steps=200),
    DiffusionConfig(schedule="linear", prediction="v", sampler="ddim", steps=100),
]


@pytest.mark.parametrize("cfg", MIXTURE_CASES, ids=lambda c: f"{c.schedule}-{c.prediction}-"
                         f"{c.sampler}{c.steps}-eta{c.eta}")
def test_sampler_reproduces_gaussian_mixture(cfg):
  x = np.asarray(sample(denoiser(mixture_x0, cfg), KEY, (4000, 1, 1), cfg)).ravel()
  assert np.all(np.isfinite(x))
  pos, neg = x[x > 0], x[x <= 0]
  # >= 4 standard errors of 4000 (1200 / 2800 per mode) draws; seen: <= 0.007 / 0.006 / 0.011.
  assert len(pos) / len(x) == pytest.approx(MIX_W[1], abs=0.03)
  assert neg.mean() == pytest.approx(MIX_MU[0], abs=0.05)
  assert pos.mean() == pytest.approx(MIX_MU[1], abs=0.05)
  assert neg.std() == pytest.approx(MIX_S[0], abs=0.05)
  assert pos.std() == pytest.approx(MIX_S[1], abs=0.05)


def test_ddim_gaussian_flow_and_one_step_collapse():
  m, s = 1.5, 0.5
  cfg = DiffusionConfig(prediction="eps", steps=50)
  fn = denoiser(gaussian_x0(m, s), cfg)
  x = np.asarray(sample(fn, KEY, (4000, 1, 1), cfg)).ravel()
  assert x.mean() == pytest.approx(m, abs=0.03)
  assert x.std() == pytest.approx(s, abs=0.03)
  # One DDIM step returns E[x0 | x_1] = m + a s²/(a² s² + σ²)·(x_1 - a m), std ~ a·s² ≈ 8e-4.
  one = np.asarray(sample(fn, KEY, (4000, 1, 1), DiffusionConfig(prediction="eps", steps=1)))
  a, sigma = ref_a_sigma(1.0)
  assert one.mean() == pytest.approx(m * (1 - a ** 2 * s ** 2 / (a ** 2 * s ** 2 + sigma ** 2)),
                                     abs=1e-4)
  assert one.std() == pytest.approx(a * s ** 2 / (a ** 2 * s ** 2 + sigma ** 2), rel=0.05)


@pytest.mark.slow
def test_ddpm_equals_ddim_with_eta_one_and_jits():
  """Same key, same draws: the posterior step and DDIM at eta = 1 are the same update."""
  ddpm = DiffusionConfig(prediction="v", sampler="ddpm", steps=20)
  ddim = DiffusionConfig(prediction="v", sampler="ddim", steps=20, eta=1.0)
  x_p = sample(denoiser(gaussian_x0(0.5, 0.8), ddpm), KEY, (64, 2, 3), ddpm)
  fn = denoiser(gaussian_x0(0.5, 0.8), ddim)
  x_d = jax.jit(lambda key: sample(fn, key, (64, 2, 3), ddim))(KEY)
  np.testing.assert_allclose(x_p, x_d, atol=1e-4)
  x_0 = sample(denoiser(gaussian_x0(0.5, 0.8), ddim), KEY, (64, 2, 3),
               DiffusionConfig(prediction="v", steps=20))
  assert np.max(np.abs(np.asarray(x_0) - np.asarray(x_d))) > 0.1


# --- 5. inpainting ------------------------------------------------------------

RHO, X_KNOWN = 0.8, 1.5


def pair_joint_x0(x_t, t, schedule):
  """E[x0 | x_t] for x0 = (x_0, x_1) ~ N(0, [[1, ρ], [ρ, 1]]): a·Σ·(a²Σ + σ²I)^{-1}·x_t.

  The optimum of the training loss when known positions are noised like the
  rest (q_sample everywhere): it sees the known value only through x_t.
  """
  a, sigma = (v[:, None, None] for v in signal_noise(t, schedule))
  p, q = a ** 2 + sigma ** 2, a ** 2 * RHO      # a²Σ + σ²I = [[p, q], [q, p]]
  x0, x1 = x_t[:, :1], x_t[:, 1:]
  det = p * p - q * q
  y0, y1 = (p * x0 - q * x1) / det, (p * x1 - q * x0) / det
  return a * jnp.concatenate([y0 + RHO * y1, RHO * y0 + y1], axis=1)


def pair_oracle_x0(x_t, t, schedule):
  """E[x0_1 | x_t,1, x0_0 = X_KNOWN]: the exact conditional, told the clean known value."""
  a, sigma = (v[:, None, None] for v in signal_noise(t, schedule))
  m, var = RHO * X_KNOWN, 1 - RHO ** 2
  x1 = m + a * var / (a ** 2 * var + sigma ** 2) * (x_t[:, 1:] - a * m)
  return jnp.concatenate([jnp.full_like(x1, X_KNOWN), x1], axis=1)


def ref_replacement(cfg: DiffusionConfig) -> tuple[float, float]:
  """(mean, var) of the unknown x_1 that the sampler produces with `pair_joint_x0`, in float64.

  Everything is linear-Gaussian: per step x_1' = c_0·x_t,0 + c_1·x_1 (+ DDPM
  noise), with x_t,0 = a_t·X_KNOWN + σ_t·(fresh noise) re-imposed each step.
  """
  mean, var = 0.0, 1.0
  sig = np.array([[1.0, RHO], [RHO, 1.0]])
  for k in range(cfg.steps, 0, -1):
    a_t, s_t = ref_a_sigma(k / cfg.steps)
    a_s, s_s = ref_a_sigma((k - 1) / cfg.steps)
    w0, w1 = (a_t * sig @ np.linalg.inv(a_t ** 2 * sig + s_t ** 2 * np.eye(2)))[1]
    if cfg.sampler == "ddim":  # x_s = a_s x0_hat + σ_s eps_hat, eps_hat = (x_t - a_t x0_hat)/σ_t
      c0, c1, extra = (a_s - s_s * a_t / s_t) * w0, (a_s - s_s * a_t / s_t) * w1 + s_s / s_t, 0.0
    else:                      # posterior mean / variance of q(x_s | x_t, x0_hat)
      beta = 1 - a_t ** 2 / a_s ** 2
      c0 = a_s * beta / s_t ** 2 * w0
      c1 = a_s * beta / s_t ** 2 * w1 + (a_t / a_s) * s_s ** 2 / s_t ** 2
      extra = s_s ** 2 / s_t ** 2 * beta
    mean, var = c0 * a_t * X_KNOWN + c1 * mean, c0 ** 2 * s_t ** 2 + c1 ** 2 * var + extra
  return mean, var


def inpaint(x0_fn, cfg):
  b = 4000
  known = jnp.zeros((b, 2, 1)).at[:, 0].set(X_KNOWN)
  mask = jnp.zeros((b, 2), bool).at[:, 0].set(True)
  x = sample(denoiser(x0_fn, cfg), KEY, (b, 2, 1), cfg, known=known, known_mask=mask)
  return np.asarray(x)


@pytest.mark.slow
def test_inpainting_keeps_known_values_exactly():
  cfg = DiffusionConfig(steps=8, sampler="ddpm")
  keys = jax.random.split(KEY, 2)
  known = 3.0 * jax.random.normal(keys[0], (8, 5, 4))
  mask = jax.random.bernoulli(keys[1], 0.5, (8, 5))
  x = sample(denoiser(gaussian_x0(0.0, 1.0), cfg), KEY, (8, 5, 4), cfg, known=known,
             known_mask=mask)
  x, known, mask = np.asarray(x), np.asarray(known), np.asarray(mask)
  assert 0 < mask.sum() < mask.size
  np.testing.assert_array_equal(x[mask], known[mask])
  assert not np.allclose(x[~mask], known[~mask])


def test_model_sees_known_positions_noised_to_t():
  """Before each call, x_t at known positions is q_sample(known, t, fresh noise).

  An x0-predicting stub copies position 0 of its input to every position
  (masked by the known_mask it is given); two steps end with the call at
  t = 0.5, so output position 1 is what the model saw at position 0 then.
  """
  cfg = DiffusionConfig(prediction="x0", steps=2)

  def fn(x_t, t, known_mask, labels):
    return jnp.broadcast_to(jnp.where(known_mask[:, :1, None], x_t[:, :1], 0.0), x_t.shape)

  known = jnp.zeros((4000, 2, 1)).at[:, 0].set(X_KNOWN)
  mask = jnp.zeros((4000, 2), bool).at[:, 0].set(True)
  seen = np.asarray(sample(fn, KEY, (4000, 2, 1), cfg, known=known, known_mask=mask))[:, 1, 0]
  a, sigma = ref_a_sigma(0.5)
  assert seen.mean() == pytest.approx(a * X_KNOWN, abs=0.05)
  assert seen.std() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("cfg", [DiffusionConfig(prediction="eps", steps=100),
                                 DiffusionConfig(prediction="v", sampler="ddpm", steps=100)],
                         ids=["ddim", "ddpm"])
def test_inpainting_by_replacement_is_biased(cfg):
  """RePaint-style replacement (no resampling) with the optimal denoiser misses p(x_1 | x_0).

  True conditional: mean ρ·x_known = 1.2, var 1 - ρ² = 0.36. Replacement gives
  about mean 0.52 / var 0.59 (DDIM) and 0.74 / 0.47 (DDPM) at 100 steps, and
  the same at 1000 steps: a bias of the method, not of the discretization.
  The samples must match that float64 prediction, and be far from the truth.
  """
  x1 = inpaint(pair_joint_x0, cfg)[:, 1, 0]
  mean, var = ref_replacement(cfg)
  assert x1.mean() == pytest.approx(mean, abs=0.05)
  assert x1.var() == pytest.approx(var, rel=0.1)
  assert x1.mean() < RHO * X_KNOWN - 0.3


@pytest.mark.parametrize("cfg", [DiffusionConfig(prediction="eps", steps=100),
                                 DiffusionConfig(prediction="v", sampler="ddpm", steps=100)],
                         ids=["ddim", "ddpm"])
def test_inpainting_with_clean_conditioning_is_exact(cfg):
  x = inpaint(pair_oracle_x0, cfg)
  assert np.all(x[:, 0, 0] == X_KNOWN)
  assert x[:, 1, 0].mean() == pytest.approx(RHO * X_KNOWN, abs=0.05)
  assert x[:, 1, 0].var() == pytest.approx(1 - RHO ** 2, rel=0.1)


# --- 6. classifier-free guidance ----------------------------------------------

COND, UNCOND = 3.0, -1.0


def recording_stub(calls: list):
  """Outputs COND on rows whose label is not -1, else UNCOND; records each call's labels."""
  def fn(x_t, t, known_mask, labels):
    calls.append(labels)
    if labels is None:
      return jnp.full_like(x_t, UNCOND)
    return jnp.broadcast_to(jnp.where(labels == -1, UNCOND, COND)[:, None, None], x_t.shape)
  return fn


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_guidance_combines_cond_and_uncond(w):
  # One x0-prediction step from t = 1 to 0 returns the (guided) model output itself.
  cfg = DiffusionConfig(prediction="x0", steps=1, guidance=w)
  calls = []
  labels = jnp.asarray([0, 2, -1, 7])
  x = np.asarray(sample(recording_stub(calls), KEY, (4, 3, 2), cfg, labels=labels))
  expected = np.array([(1 + w) * COND - w * UNCOND] * 2 + [UNCOND] + [(1 + w) * COND - w * UNCOND])
  np.testing.assert_allclose(x, np.broadcast_to(expected[:, None, None], x.shape), rtol=1e-6)
  assert len(calls) == (2 if w else 1) and all(c is not None for c in calls)


def test_guidance_without_labels_is_one_unconditional_call():
  cfg = DiffusionConfig(prediction="x0", steps=1, guidance=2.0)
  calls = []
  x = sample(recording_stub(calls), KEY, (4, 3, 2), cfg)
  np.testing.assert_allclose(x, UNCOND, rtol=1e-6)
  assert calls == [None]


# --- 7. bad config ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("schedule", "quadratic"), ("prediction", "score"),
                                         ("sampler", "euler"), ("steps", 0), ("steps", 2.5),
                                         ("eta", -0.1), ("eta", 1.5), ("guidance", -1.0)])
def test_bad_config_names_the_field(field, value):
  cfg = DiffusionConfig(**{field: value})
  with pytest.raises(UserInputError, match=rf"bridge\.{field}="):
    sample(lambda x, t, m, y: x, KEY, (2, 3, 4), cfg)


def test_bad_schedule_and_prediction_outside_the_sampler():
  x, t = jnp.ones((2, 3, 4)), jnp.full((2,), 0.5)
  with pytest.raises(UserInputError, match=r"bridge\.schedule="):
    alpha_bar(t, "sigmoid")
  with pytest.raises(UserInputError, match=r"bridge\.prediction="):
    loss(x, x, x, t, jnp.ones((2, 3), bool), DiffusionConfig(prediction="score"))


def test_sampling_from_a_partly_noised_start_keeps_the_mixture():
  """SDEdit start: x_start = q_sample(x0, 0.5) with x0 from the mixture; denoising from t = 0.5
  with the exact denoiser must return draws from the same mixture."""
  rng = np.random.default_rng(3)
  comp = rng.random(4000) < MIX_W[1]
  x0 = np.where(comp, rng.normal(MIX_MU[1], MIX_S[1], 4000), rng.normal(MIX_MU[0], MIX_S[0], 4000))
  a, sigma = ref_a_sigma(np.array([0.5]))
  x_start = (a * x0 + sigma * rng.normal(size=4000)).reshape(4000, 1, 1).astype(np.float32)
  cfg = DiffusionConfig(prediction="v", steps=100)
  x = np.asarray(sample(denoiser(mixture_x0, cfg), KEY, (4000, 1, 1), cfg, x_start=x_start,
                        t_start=0.5)).ravel()
  pos, neg = x[x > 0], x[x <= 0]
  assert len(pos) / len(x) == pytest.approx(MIX_W[1], abs=0.03)
  assert neg.mean() == pytest.approx(MIX_MU[0], abs=0.05)
  assert pos.mean() == pytest.approx(MIX_MU[1], abs=0.05)
  assert pos.std() == pytest.approx(MIX_S[1], abs=0.05)
  with pytest.raises(ValueError, match="t_start"):
    sample(denoiser(mixture_x0, cfg), KEY, (2, 1, 1), cfg, t_start=0.0)


@pytest.mark.slow
def test_self_conditioning_feeds_the_previous_x0_estimate():
  """x0-prediction model out = x0_prev + 1. Deterministic DDIM, 3 steps: estimates 1, 2, 3, and
  the last step (σ_s = 0) returns the last estimate. Without self-conditioning: 1."""
  cfg = DiffusionConfig(prediction="x0", steps=3, eta=0.0)

  def fn(x_t, t, known_mask, labels, x0_prev=None):
    return (0.0 if x0_prev is None else x0_prev) + jnp.ones_like(x_t)

  got = np.asarray(sample(fn, KEY, (2, 4, 3), cfg, self_condition=True))
  np.testing.assert_allclose(got, 3.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sample(fn, KEY, (2, 4, 3), cfg)), 1.0, atol=1e-5)
