"""Settings that cannot work together, caught before any work starts.

Each check names the flag to change (`--config.a.b`) in one `UserInputError` line.
`check(config, command)` runs on the effective config of a command (for `dihal demo`,
after its preset): the CLI calls it before dispatching, so nothing is built, trained or
written when it fails.
"""

from __future__ import annotations

import ml_collections

from dihal_jax.backbone.model import check_attention
from dihal_jax.errors import UserInputError
from dihal_jax.geometry.locate import score_weights
from dihal_jax.mdm import sampler as mdm_sampler
from dihal_jax.mdm import train as mdm_train

TRAINS = ("train", "sweep", "eval", "ablate", "demo")  # commands that may train a bridge
EVALUATES = ("eval", "ablate", "demo")


def _need(ok: bool, message: str) -> None:
  if not ok:
    raise UserInputError(message)


def check(config: ml_collections.ConfigDict, command: str) -> None:
  check_attention(config.model.attention)
  d = config.data
  _need(d.window >= 2, f"--config.data.window={d.window}: expected >= 2 (the separator and at "
        "least one token)")
  _need(d.batch_size >= 1, f"--config.data.batch_size={d.batch_size}: expected >= 1")
  layers = config.model.hf_config.get("num_hidden_layers")
  positions = config.model.hf_config.get("max_position_embeddings")
  if positions:
    _need(d.window <= positions, f"--config.data.window={d.window}: longer than the model's "
          f"{positions} positions")
  spec = str(config.bridge.layer)
  if spec != "auto":
    _need(spec.lstrip("-").isdigit(), f"--config.bridge.layer={spec!r}: expected 'auto' or a "
          "layer number")
    if layers:
      _need(0 <= int(spec) < layers, f"--config.bridge.layer={spec}: outside 0..{layers - 1} "
            f"(the model has {layers} layers)")
  _check_bridge(config.bridge, layers, spec)
  _need(config.sample.beta >= 0, f"--config.sample.beta={config.sample.beta}: expected >= 0 (the "
        "joint readout's weight of the current-token head)")
  mdm_train.check(config.mdm, d.window)
  _need(config.sample.method in ("bridge", "mdm", "dglm"), f"--config.sample.method="
        f"{config.sample.method!r}: expected bridge, mdm or dglm")
  if command == "dglm" or config.sample.method == "dglm":
    from dihal_jax.dglm import run as dglm_run
    dglm_run.check(config.dglm)
    if config.sample.attribute:
      from dihal_jax.dglm.attributes import parse_target
      from dihal_jax.dglm.trained import attribute_values
      parse_target(config.sample.attribute, attribute_values(config.dglm))
  mdm_sampler.check(config.sample.mdm_steps, config.sample.unmask, config.sample.mdm_block,
                    config.sample.length or d.window)
  if command == "mechanism":
    from dihal_jax.analysis import mechanism
    mechanism.check(config.mechanism, d.window)
  score_weights(config)
  if command == "sweep":
    from dihal_jax.eval import sweep
    sweep.check(config)
  if command in TRAINS:
    _check_train(config.train)
    from dihal_jax.hybrid import tolerant_decoder
    tolerant_decoder.check(config.tolerant)
  if command in EVALUATES:
    _check_eval(config.eval, d.window)
  if command == "ablate":
    betas = tuple(config.ablate.betas)
    _need(len(betas) > 0 and all(b >= 0 for b in betas), f"--config.ablate.betas={betas}: "
          "expected one or more β >= 0 (the joint readout's weights of the current-token head)")


def _check_bridge(b, layers, spec: str) -> None:
  from dihal_jax.bridge import denoiser  # the model code only when a config is checked
  # The layer is known here only when given; `dihal train` checks again once "auto" resolves.
  known_layer = layers and spec.lstrip("-").isdigit()
  denoiser.validate(b, layers if known_layer else 10 ** 9, int(spec) if known_layer else 0)


def _check_train(t) -> None:
  _need(t.steps >= 1, f"--config.train.steps={t.steps}: expected >= 1")
  _need(t.batch_size >= 1, f"--config.train.batch_size={t.batch_size}: expected >= 1")
  _need(t.lr > 0, f"--config.train.lr={t.lr}: expected > 0")
  _need(0 <= t.warmup_steps < t.steps,
        f"--config.train.warmup_steps={t.warmup_steps}: expected 0 <= warm-up < "
        f"train.steps={t.steps} (the schedule must warm up, then decay)")
  # checkpoint_every > steps is fine: the last step is always saved.
  _need(t.checkpoint_every >= 1,
        f"--config.train.checkpoint_every={t.checkpoint_every}: expected >= 1")
  _need(t.val_every >= 1, f"--config.train.val_every={t.val_every}: expected >= 1")
  _need(t.log_every >= 1, f"--config.train.log_every={t.log_every}: expected >= 1")
  _need(t.cache_windows >= t.batch_size,
        f"--config.train.cache_windows={t.cache_windows}: fewer than one batch of "
        f"train.batch_size={t.batch_size}")
  _need(t.val_windows >= 1, f"--config.train.val_windows={t.val_windows}: expected >= 1")
  _need(t.upper_ce >= 0 and 1 <= t.upper_ce_windows <= t.batch_size,
        f"--config.train.upper_ce={t.upper_ce}, upper_ce_windows={t.upper_ce_windows}: "
        f"expected a weight >= 0 and 1 <= windows <= train.batch_size={t.batch_size}")
  _need(t.time_sampling in ("uniform", "logit_normal"), f"--config.train.time_sampling="
        f"{t.time_sampling!r}: expected uniform or logit_normal")
  _need(len(t.logit_normal) == 2 and t.logit_normal[1] > 0, f"--config.train.logit_normal="
        f"{tuple(t.logit_normal)}: expected (mean, std) with std > 0")


def _check_eval(e, window: int) -> None:
  from dihal_jax.eval import evaluate  # the eval code only when its section is checked
  _need(e.num >= 2, f"--config.eval.num={e.num}: expected >= 2 samples per row")
  _need(e.seeds >= 1, f"--config.eval.seeds={e.seeds}: expected >= 1")
  _need(2 <= e.ngram_order <= window,
        f"--config.eval.ngram_order={e.ngram_order}: expected 2..data.window={window}")
  _need(e.mdm_block >= 0 and window % max(e.mdm_block, 1) == 0, f"--config.eval.mdm_block="
        f"{e.mdm_block}: expected 0 (no mdm_block row) or a block size that divides "
        f"data.window={window}")
  _need(e.mdm_block or "mdm_block" not in evaluate.named_methods(e),
        "--config.eval.mdm_block=0 (no block-diffusion row) but eval.methods names mdm_block; "
        "give a block size that divides data.window")
  _need(not e.prefix or 2 <= e.prefix <= window - 1,
        f"--config.eval.prefix={e.prefix}: expected 0 (no continuation task) or 2..{window - 1} "
        "(separator included, at least one token generated)")
