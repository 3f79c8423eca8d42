"""A bridge's diagnostics on real windows: validation x0-MSE and token recovery per noise level.

At each t of the noise levels, real windows (normalized h_l, position 0 known) are noised
to t; the x0-MSE is the bridge's one-step denoising error, the recovery the share of
tokens that a readout reads back from the bridge's sample started at that noised window:
`{NAME}_t<t>` for each readout of `decoders` ({"recovery": the current-token head} in
`dihal eval`; `dihal sweep` adds the joint readout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.bridge import diffusion
from dihal_jax.eval import metrics
from dihal_jax.hybrid.bridge_sampler import TrainedBridge

# The sampler's key at noise level i folds in SAMPLER_STREAM + i, apart from the noise's
# (which folds in i itself); the value is fixed so that committed results stay reproducible.
SAMPLER_STREAM = 100


def bridge_diagnostics(bridge: TrainedBridge, real_tokens: np.ndarray, real_h: np.ndarray,
                       decoders: dict, noise_levels, key) -> dict:
  """{val_mse_t<t>, NAME_t<t> per decoder} at each t, val_mse (at the middle t) and the
  bridge's layer; `decoders`: {NAME: states [B, n, d] -> tokens [B, n]}."""
  z = bridge.norm.forward(jnp.asarray(real_h))
  b, n, _ = z.shape
  known = jnp.zeros((b, n), bool).at[:, 0].set(True)
  out = {}
  for i, t in enumerate(noise_levels):
    noise = jax.random.normal(jax.random.fold_in(key, i), z.shape)
    tv = jnp.full((b,), t, jnp.float32)
    z_t = diffusion.q_sample(z, tv, noise, bridge.diffusion.schedule)
    x0 = bridge.denoise_x0(z_t, tv, known, z)
    out[f"val_mse_t{t:g}"] = float(jnp.mean(jnp.square(x0[:, 1:] - z[:, 1:])))
    h = bridge.sample(jax.random.fold_in(key, SAMPLER_STREAM + i), jnp.asarray(real_h), known,
                      x_start=z_t, t_start=float(t))
    for name, decode in decoders.items():
      out[f"{name}_t{t:g}"] = metrics.token_accuracy(np.asarray(decode(h))[:, 1:],
                                                     real_tokens[:, 1:])
  out["val_mse"] = out[f"val_mse_t{noise_levels[len(noise_levels) // 2]:g}"]
  out["layer"] = bridge.layer
  return out
