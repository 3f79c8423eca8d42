"""A decoder that tolerates bridge states (the decoding branch of ELF and TEncDM): LoRA adapters
(backbone/lora.py) on the backbone's layers above the interface ℓ, trained to predict the true
next tokens from the bridge's own estimates of re-noised train states; every backbone weight
stays frozen.

Why: the upper layers were trained on the exact states of the real lower layers. A bridge's
samples lie near those states but not on them (smoothed, off the manifold), and the upper
layers read the difference as noise. The training pairs: each cached train window's h_ℓ,
normalized, noised to t ~ U(T_MIN, 1) with position 0 known (the sampler's own template),
denoised by the frozen bridge in one call (its self-conditioning pass included), mapped back
to backbone units; the loss is the cross-entropy of tokens 1..n-1 from the adapted upper
layers at positions 0..n-2. Every noise level is drawn, so the decoder learns how far to
trust a state: near t = 1 the estimate carries little of the window and the best answer is
the language's own prior.

`tolerant.enabled` trains the adapters after the bridge (`dihal train`, `dihal demo`, the
ablation's `*_tolerant` rows) into WORKDIR/decoder, resumably through the shared training loop;
`readout_backbone(workdir, backbone, mesh)` is the backbone every readout of that workdir
uses (adapted when the workdir has a trained decoder). The layers below ℓ keep their
weights, so the real lower layers (known positions, the oracles' true states) are unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.backbone import checkpoint as backbone_checkpoint
from dihal_jax.backbone.lora import ALL, LoRA, parse_targets
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.checkpoint import read_latest, stored_config
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.train import cached_splits, run_train
from dihal_jax.bridge.train_step import (T_MIN, OptimConfig, TrainState, apply_gradients,
                                         init_train_state, make_optimizer, objective)
from dihal_jax.bridge.training_loop import Cadence, run_loop
from dihal_jax.data import hidden
from dihal_jax.data.dataset import Data
from dihal_jax.errors import UserInputError
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.parallel.sharding import batch_sharding, mesh_and_rules, put_global

DIRECTORY = "decoder"  # WORKDIR/decoder: the adapters' checkpoints and metrics
STATE_SECTIONS = ("seed", "model", "data", "bridge", "train", "tolerant")
RESUMABLE = ("tolerant.steps", "tolerant.checkpoint_every", "tolerant.val_every")
VAL_SEED_OFFSET = 2  # the validation batch's fixed draws: key(seed + 2)


def check(t: ml_collections.ConfigDict) -> None:
  """One `dihal: error:` line for tolerant.* settings out of range."""
  if t.rank < 1 or t.steps < 1 or t.batch_size < 1 or t.lr <= 0 or t.alpha <= 0:
    raise UserInputError(f"--config.tolerant: rank={t.rank}, steps={t.steps}, batch_size="
                         f"{t.batch_size} (each >= 1), lr={t.lr}, alpha={t.alpha} (> 0)")


def optim_config(t: ml_collections.ConfigDict) -> OptimConfig:
  return OptimConfig(lr=t.lr, warmup_steps=max(1, t.steps // 10), total_steps=t.steps,
                     ema_decay=0.99)


def new_adapters(config: ml_collections.ConfigDict, backbone: Decoder, layer: int):
  """A maker of fresh adapters of every attention and MLP kernel of layers layer.. ."""
  t = config.tolerant
  return lambda: LoRA(backbone, rank=t.rank, alpha=t.alpha, targets=parse_targets(ALL),
                      rngs=nnx.Rngs(config.seed), first_layer=layer)


def estimated_states(bridge_model: nnx.Module, norm: Normalizer, h: jax.Array, key: jax.Array,
                     cfg: diffusion.DiffusionConfig) -> jax.Array:
  """[B, n, d] backbone units: the bridge's x0 estimate of h [B, n, d] noised to t ~ U(T_MIN, 1)
  (one level per window), position 0 known and returned as given."""
  x0 = norm.forward(h)
  k_t, k_noise = jax.random.split(key)
  b, n, _ = x0.shape
  t = jax.random.uniform(k_t, (b,), jnp.float32, T_MIN, 1.0)
  known = jnp.zeros((b, n), bool).at[:, 0].set(True)
  _, out, x_t = objective(bridge_model, x0, jax.random.normal(k_noise, x0.shape), t, known, cfg,
                          self_condition=True)
  x0_hat = diffusion.predict_x0_eps(out, x_t, t, cfg)[0]
  return jnp.where(known[..., None], h, norm.inverse(x0_hat))


def next_token_nll(decoder: Decoder, h: jax.Array, tokens: jax.Array, layer: int) -> jax.Array:
  """Mean cross-entropy of tokens[:, 1:] from the upper layers' logits of h_layer[:, :-1]."""
  logp = jax.nn.log_softmax(decoder.upper(h, layer)[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@functools.partial(jax.jit, static_argnames=("layer", "cfg", "optimizer", "optim_cfg"),
                   donate_argnums=(0,))
def train_step(state: TrainState, backbone: Decoder, bridge_model: nnx.Module, norm: Normalizer,
               h: jax.Array, tokens: jax.Array, key: jax.Array, *, layer: int,
               cfg: diffusion.DiffusionConfig, optimizer: optax.GradientTransformation,
               optim_cfg: OptimConfig):
  """One AdamW step of the adapters on the bridge's estimates of h (fresh draws per step)."""
  h_hat = jax.lax.stop_gradient(estimated_states(
      bridge_model, norm, h, jax.random.fold_in(key, state.step), cfg))

  def loss_fn(params):
    lora = nnx.merge(state.graphdef, params, state.rest)
    return next_token_nll(lora.apply(backbone), h_hat, tokens, layer)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (apply_gradients(state, grads, optimizer, optim_cfg),
          {"loss": loss, "grad_norm": optax.tree.norm(grads)})


@functools.partial(jax.jit, static_argnames=("layer",))
def validation_nll(lora: LoRA, backbone: Decoder, h: jax.Array, tokens: jax.Array, *,
                   layer: int) -> jax.Array:
  return next_token_nll(lora.apply(backbone), h, tokens, layer)


def train_tolerant_decoder(config: ml_collections.ConfigDict, workdir: str | Path, *,
                           decoder_workdir: str | Path | None = None,
                           progress: bool = True) -> dict:
  """Trains (or resumes) the adapters of workdir's bridge into DECODER_WORKDIR/decoder
  (default: workdir's own, where its readouts look for it). Returns the
  validation NLL of the fixed validation batch through the plain and the adapted upper
  layers, on the bridge's estimates and on the true states. Raises TrainingInterrupted when
  SIGTERM stopped it (saved; the same command resumes)."""
  workdir, t = Path(workdir), config.tolerant
  mesh, rules = mesh_and_rules(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  bridge = load_bridge(workdir, mesh)
  ckpt_dir = backbone_checkpoint.checkpoint_dir(config, workdir)
  backbone = backbone_checkpoint.load_backbone(config, ckpt_dir)
  caches = cached_splits(config, Data.from_config(config, workdir), backbone, ckpt_dir,
                         bridge.layer)
  optim = optim_config(t)
  optimizer = make_optimizer(optim)
  bridge_model, cfg = nnx.merge(bridge.graphdef, *bridge.params), bridge.diffusion
  key = put_global(jax.random.key(config.seed), replicated)
  shardings = (batch_sharding(mesh, rules, 3), batch_sharding(mesh, rules, 2))

  def step(state, batch):
    h, tokens = put_global((batch["h"], batch["tokens"]), shardings)
    state, metrics = train_step(state, backbone, bridge_model, bridge.norm, h, tokens, key,
                                layer=bridge.layer, cfg=cfg, optimizer=optimizer,
                                optim_cfg=optim)
    return state, metrics, tokens.size

  source = hidden.CachedLayer(caches["validation"], bridge.layer)
  val = source.rows(np.arange(min(t.batch_size, len(source))))
  val_h, val_tokens = jnp.asarray(val["h"]), jnp.asarray(val["tokens"])
  val_hat = estimated_states(bridge_model, bridge.norm, val_h,
                             jax.random.key(config.seed + VAL_SEED_OFFSET), cfg)
  fresh = new_adapters(config, backbone, bridge.layer)
  state = put_global(init_train_state(fresh(), optimizer), replicated)
  result = run_loop(
      state, workdir=Path(decoder_workdir or workdir) / DIRECTORY,
      batches=iter(hidden.cached_batches(caches["train"], bridge.layer,
                                         batch_size=t.batch_size, seed=config.seed,
                                         shard_index=jax.process_index(),
                                         shard_count=jax.process_count())),
      step=step,
      validate=lambda s: validation_nll(s.model(ema=True), backbone, val_hat, val_tokens,
                                        layer=bridge.layer),
      optim_cfg=optim, cadence=Cadence(t.steps, 10, t.val_every, t.checkpoint_every, 2),
      checkpoint_config=config.to_dict(), sections=STATE_SECTIONS, resumable_changes=RESUMABLE,
      extra={"layer": bridge.layer}, desc="tolerant decoder",
      progress=progress).finished("the tolerant decoder")
  adapters = result.state.model(ema=True)
  plain = fresh()  # a fresh adapter is the identity: the plain upper layers
  nll = lambda lora, h: float(validation_nll(lora, backbone, h, val_tokens,  # noqa: E731
                                             layer=bridge.layer))
  return {"steps": result.done, "val_nll": {
      "plain_on_estimates": nll(plain, val_hat), "adapted_on_estimates": nll(adapters, val_hat),
      "plain_on_true": nll(plain, val_h), "adapted_on_true": nll(adapters, val_h)}}


def train_with_decoder(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       progress: bool = True) -> dict:
  """The bridge at config's layer into workdir, then, with tolerant.enabled, its decoder:
  the bridge's report (bridge/train.py), with "tolerant_decoder" when the decoder trained.
  What `dihal train` and `dihal demo` run; SIGTERM inside the decoder raises
  TrainingInterrupted (saved; the same command resumes)."""
  report = run_train(config, workdir, progress=progress)
  if config.tolerant.enabled and not report["interrupted"]:
    report["tolerant_decoder"] = train_tolerant_decoder(config, workdir, progress=progress)
  return report


def load_adapters(workdir: str | Path, backbone: Decoder,
                  mesh: jax.sharding.Mesh | None = None) -> LoRA | None:
  """The EMA adapters of workdir/decoder (their shape from the checkpoint's own config), or
  None when the workdir has no tolerant decoder."""
  directory = Path(workdir) / DIRECTORY / "checkpoints"
  if not directory.is_dir():
    return None
  holder = {}

  def abstract(stored: dict, extra: dict):
    config = stored_config(stored)
    state = holder["state"] = jax.eval_shape(lambda: init_train_state(
        new_adapters(config, backbone, int(extra["layer"]))(),
        make_optimizer(optim_config(config.tolerant))))
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        state.checkpoint_items())

  _, restored, _, _ = read_latest(directory, abstract,
                                  what="tolerant decoder checkpoints (tolerant.enabled)")
  return nnx.merge(holder["state"].graphdef, restored["ema"], restored["rest"])


def readout_backbone(workdir: str | Path, backbone: Decoder,
                     mesh: jax.sharding.Mesh | None = None) -> Decoder:
  """The backbone the readouts of workdir's bridge use: with its tolerant decoder's adapters
  when it has one, the backbone itself otherwise."""
  adapters = load_adapters(workdir, backbone, mesh)
  return backbone if adapters is None else adapters.apply(backbone)
