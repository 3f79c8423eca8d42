"""`dihal train`: fit the bridge to h_l of the train split, resumably.

Flow: pick l ("auto" = l* of the locate report, running locate when there is
none) -> cache h_l of the first `train.cache_windows` train windows and
`train.val_windows` validation windows (data/hidden.py) -> normalization
(per_channel / global / pca_whiten) from the cached statistics -> seeded, checkpointable batches
(grain over the cache) -> jitted data-parallel steps (bridge/train_step.py)
-> metrics.jsonl, periodic validation loss, Orbax checkpoints
(bridge/checkpoint.py), loss.png.

Resume, SIGTERM, a non-finite loss and the metrics rows: bridge/training_loop.py
(the state restored is params, EMA, optimizer state, step and the grain iterator's
position; the RNG is fold_in(seed, step)).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.backbone import checkpoint as backbone_checkpoint
from dihal_jax.bridge import denoiser
from dihal_jax.bridge.normalization import Normalizer, covariance, pca_components
from dihal_jax.bridge.train_step import (OptimConfig, UpperCE, draw_corruption,
                                         init_train_state, make_optimizer, make_train_step,
                                         objective)
from dihal_jax.bridge.training_loop import Cadence, run_loop
from dihal_jax.bridge.token_head import ClassMeanHead
from dihal_jax.data import hidden
from dihal_jax.data.dataset import Data, cache_root
from dihal_jax.errors import UserInputError
from dihal_jax.geometry import locate
from dihal_jax.parallel.sharding import mesh_and_rules, put_global


# The config sections that shape the trained state (a resume checks them), and the fields
# in them that may change on resume: the run's length and its logging / saving cadence.
STATE_SECTIONS = ("seed", "model", "data", "bridge", "train")
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.val_every",
                     "train.checkpoint_every", "train.max_to_keep", "data.cache_dir",
                     "data.read_threads")


def interface_layer(config: ml_collections.ConfigDict, workdir: Path) -> int:
  """config.bridge.layer, or l* from workdir/locate/report.json (running locate if missing)."""
  spec = str(config.bridge.layer)
  if spec != "auto":
    try:
      return int(spec)
    except ValueError:
      raise UserInputError(f"bridge.layer={spec!r}: expected 'auto' or a layer number") from None
  report_path = workdir / "locate" / "report.json"
  if not report_path.is_file():
    locate.locate_into(config, workdir / "locate")
  return int(json.loads(report_path.read_text())["selected_layer"])


def run_train(config: ml_collections.ConfigDict, workdir: str | Path, *,
              progress: bool = True) -> dict:
  workdir = Path(workdir)
  t = config.train
  t0 = time.perf_counter()
  data = Data.from_config(config, workdir)
  ckpt_dir = backbone_checkpoint.checkpoint_dir(config, workdir)
  backbone = backbone_checkpoint.load_backbone(config, ckpt_dir)
  layer = interface_layer(config, workdir)
  if not 0 <= layer < backbone.cfg.num_layers:
    raise UserInputError(f"bridge.layer={layer}: expected 0..{backbone.cfg.num_layers - 1}")
  mesh, rules = mesh_and_rules(config)
  caches = cached_splits(config, data, backbone, ckpt_dir, layer)
  denoiser.validate(config.bridge, backbone.cfg.num_layers, layer)
  stats = json.loads((caches["train"] / "stats.json").read_text())[str(layer)]
  train_states = np.load(caches["train"] / f"layer_{layer}.npy", mmap_mode="r")
  cov = None
  if config.bridge.normalization == "pca_whiten" or config.bridge.pca_init:
    cov = covariance(train_states)
  norm = Normalizer.from_stats(stats, config.bridge.normalization, cov=cov)
  dim = len(stats["mean"])
  model = denoiser.build(config.bridge, dim, norm, seed=config.seed, backbone=backbone,
                         layer=layer)
  vocab_size = backbone.cfg.vocab_size
  upper_ce = upper = None
  if t.upper_ce:
    upper_ce = UpperCE(weight=float(t.upper_ce), windows=int(t.upper_ce_windows), layer=layer,
                       graphdef=nnx.graphdef(backbone))
    upper = {"backbone": nnx.state(backbone), "norm": norm}
  del backbone
  if config.bridge.pca_init:
    if config.bridge.denoiser != "unet":
      raise UserInputError("bridge.pca_init: only the UNet has a PCA-initialized input "
                           "projection (set bridge.denoiser=unet or pca_init=False)")
    model.init_input_projection(pca_components(norm.normalized_covariance(cov),
                                               model.cfg.channels))
  token_head = None
  if t.token_ce:
    head = ClassMeanHead.fit(np.load(caches["train"] / "tokens.npy"), train_states, norm,
                             vocab_size=vocab_size, seed=config.seed)
    class_of = np.zeros(vocab_size, np.int32)
    class_of[head.ids] = np.arange(len(head.ids))
    token_head = {"means": head.means, "class_of": class_of,
                  "tau": np.float32(head.temperature)}
  setup_s = time.perf_counter() - t0

  optim_cfg = OptimConfig(lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                          weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                          ema_decay=t.ema_decay)
  diffusion_cfg = denoiser.diffusion_config(config.bridge.to_dict())
  state = init_train_state(model, make_optimizer(optim_cfg))
  step_fn = make_train_step(diffusion_cfg, optim_cfg, mesh, rules,
                            self_condition_prob=t.self_condition_prob, token_ce=t.token_ce,
                            token_head=token_head, logit_normal=time_distribution(t),
                            upper_ce=upper_ce, upper=upper)
  batches = iter(hidden.cached_batches(caches["train"], layer, batch_size=t.batch_size,
                                       seed=config.seed, shard_index=jax.process_index(),
                                       shard_count=jax.process_count()))
  val_x0 = put_global(np.asarray(norm.forward(
      np.load(caches["validation"] / f"layer_{layer}.npy")[:t.batch_size])),
      NamedSharding(mesh, PartitionSpec()))  # the same fixed batch, replicated
  key = jax.random.key(config.seed)
  val_loss_fn = validation_loss_fn(state, diffusion_cfg, jax.random.key(config.seed + 1))
  logged = (("loss", "grad_norm") + (("mse",) if t.token_ce or t.upper_ce else ())
            + (("token_ce",) if t.token_ce else ()) + (("upper_ce",) if t.upper_ce else ()))

  def step(state, batch):
    x0 = norm.forward(batch["h"])
    state, metrics = step_fn(state, x0, key, tokens=batch["tokens"])
    return state, {k: metrics[k] for k in logged}, x0.shape[0] * x0.shape[1]

  extra = {"layer": layer, "normalizer": norm.to_dict(), "train_cache": str(caches["train"]),
           "denoiser": denoiser.describe(model), "params": denoiser.num_params(model)}
  result = run_loop(
      state, workdir=workdir, batches=batches, step=step,
      validate=lambda state: val_loss_fn(state, val_x0), optim_cfg=optim_cfg,
      cadence=Cadence(t.steps, t.log_every, t.val_every, t.checkpoint_every, t.max_to_keep),
      checkpoint_config=config.to_dict(), sections=STATE_SECTIONS,
      resumable_changes=RESUMABLE_CHANGES, extra=extra, desc="train", flops=step_fn.flops,
      progress=progress)
  return {"layer": layer, "steps": result.done, "start_step": result.start,
          "final": result.rows[-1] if result.rows else None,
          "interrupted": result.interrupted,
          "cache": {k: str(v) for k, v in caches.items()},
          "timings": {"setup_s": setup_s, "total_s": time.perf_counter() - t0}}


def cached_splits(config: ml_collections.ConfigDict, data: Data, backbone, ckpt_dir: Path,
                  layer: int) -> dict[str, Path]:
  """{"train", "validation"}: the hidden-state caches of h_layer the bridge trains and
  validates on (the first train.cache_windows / train.val_windows windows; built once)."""
  t = config.train
  mesh, rules = mesh_and_rules(config)
  # The cached windows are the first of each split, unshuffled: the seed does not enter the
  # key, so runs that differ only in their seed (the sweep's) share one cache.
  key_fields = {"model": hidden.checkpoint_fingerprint(ckpt_dir), "data": config.data.to_dict()}
  return {split: hidden.cache_hidden_states(
      backbone, data.first_windows(split, count), [layer], mesh=mesh, rules=rules,
      batch_size=t.batch_size, cache_root=cache_root(config) / "hidden",
      key_fields=dict(key_fields, split=split))
      for split, count in (("train", t.cache_windows), ("validation", t.val_windows))}


def time_distribution(t: ml_collections.ConfigDict) -> tuple[float, float] | None:
  """train.time_sampling as `draw_corruption`'s logit_normal argument (None: uniform)."""
  if t.time_sampling == "uniform":
    return None
  return float(t.logit_normal[0]), float(t.logit_normal[1])


def validation_loss_fn(state, diffusion_cfg, key):
  """A jitted (state, x0) -> the unconditional loss of the EMA params on x0 with draws fixed by
  `key` (comparable over time)."""
  graphdef = state.graphdef

  @jax.jit
  def val_loss(state, x0):
    model = nnx.merge(graphdef, state.ema, state.rest)
    t, mask, noise = draw_corruption(jax.random.split(key, 3), x0)
    return objective(model, x0, noise, t, mask, diffusion_cfg)[0]

  return val_loss
