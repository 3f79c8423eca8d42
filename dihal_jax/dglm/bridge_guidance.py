"""DiHAL's own attribute control: the bridge trained on labelled passages, sampled with
classifier-free guidance (the `dihal_cfg` rows of `dihal dglm`).

The bridge (config `bridge`, a UNet with class labels) learns h_l of the same passages DGLM
trains on, the separator and prefix known, the continuation generated. Its label is the
window's *partial assignment* of attributes: each attribute holds one of its values or
"unspecified", and the label id enumerates these assignments (the all-unspecified one is
NULL_LABEL). Training drops each attribute independently with probability
`dglm.bridge_label_dropout` (and the whole label with the train step's own 0.1), so one
model holds p(h | book), p(h | speech), p(h | book, speech) and p(h): a target names only
its attributes, the rest stay unspecified, and guidance is (1 + w)·out(target) - w·out(null).

Windows are 1 + prefix + continuation tokens; the UNet needs a multiple of its downsampling
factor, so separators are prepended. Prepended, not appended: the backbone is causal, so the
states of leading separators depend on nothing after them (appended positions would be known
states computed from the true continuation: a leak in training, noise in sampling).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.backbone import checkpoint
from dihal_jax.bridge import denoiser
from dihal_jax.bridge.diffusion import NULL_LABEL
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.train import validation_loss_fn
from dihal_jax.bridge.train_step import (OptimConfig, init_train_state, make_optimizer,
                                         make_train_step)
from dihal_jax.bridge.training_loop import Cadence, run_loop
from dihal_jax.data import hidden
from dihal_jax.data.dataset import cache_root
from dihal_jax.dglm.trained import index_batches
from dihal_jax.errors import UserInputError
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.hybrid.readout import Readout
from dihal_jax.hybrid.sample import current_token_head, readout_config
from dihal_jax.parallel.sharding import mesh_and_rules, put_global

UNSPECIFIED = -1  # an attribute a label leaves open


class Labels:
  """Partial attribute assignments <-> class ids of the bridge's label embedding.

  `values`: {attribute: its values}, in a fixed order. An assignment gives each attribute a
  value index or UNSPECIFIED; its id is the mixed-radix number of (index + 1) digits minus 1,
  so the all-unspecified assignment is NULL_LABEL and the rest are 0 .. count - 1.
  """

  def __init__(self, values: dict[str, tuple[str, ...]]):
    self.names = tuple(values)
    self.sizes = tuple(len(values[a]) for a in self.names)

  @property
  def count(self) -> int:
    """Class ids besides NULL_LABEL: prod(size + 1) - 1."""
    return int(np.prod([s + 1 for s in self.sizes])) - 1

  def ids(self, labels: dict[str, np.ndarray]) -> np.ndarray:
    """[N] class ids of per-attribute value indices ({attribute: [N] int, UNSPECIFIED ok});
    an attribute missing from `labels` is unspecified."""
    n = len(next(iter(labels.values())))
    out, radix = np.zeros(n, np.int64), 1
    for name, size in zip(self.names, self.sizes):
      digit = np.asarray(labels.get(name, np.full(n, UNSPECIFIED))) + 1
      out += digit * radix
      radix *= size + 1
    return (out - 1).astype(np.int32)

  def of_target(self, target, n: int) -> np.ndarray:
    """[n] the class id of a parsed target ((attribute, value index), ...)."""
    return self.ids({a: np.full(n, v) for a, v in target})

  def dropped(self, labels: dict[str, np.ndarray], rng: np.random.Generator,
              rate: float) -> dict[str, np.ndarray]:
    """Each attribute of each row made UNSPECIFIED independently with probability `rate`."""
    return {a: np.where(rng.random(len(y)) < rate, UNSPECIFIED, y) for a, y in labels.items()}



def padded(tokens: np.ndarray, factor: int, separator: int) -> np.ndarray:
  """[N, T + p]: `separator` prepended p = -T mod factor times (see the module docstring)."""
  pad = -tokens.shape[1] % factor
  return np.concatenate([np.full((len(tokens), pad), separator, tokens.dtype), tokens], axis=1)


def check(config: ml_collections.ConfigDict) -> None:
  """One `dihal: error:` line for settings the labelled bridge cannot train with."""
  if config.bridge.denoiser != "unet":
    raise UserInputError(f"--config.bridge.denoiser={config.bridge.denoiser!r}: the dihal_cfg "
                         "rows need class labels, which only the UNet takes (set "
                         "bridge.denoiser=unet or dglm.bridge_steps=0)")
  if config.train.warmup_steps >= config.dglm.bridge_steps:
    raise UserInputError(f"--config.train.warmup_steps={config.train.warmup_steps}: the "
                         f"dihal_cfg bridge trains {config.dglm.bridge_steps} steps "
                         "(dglm.bridge_steps); warm-up must be shorter")


def _config(config: ml_collections.ConfigDict, labels: Labels) -> ml_collections.ConfigDict:
  """The run's config with the bridge's label count and length (what its checkpoint holds)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.bridge.unet.num_classes = labels.count
  c.train.steps = config.dglm.bridge_steps
  return c


def _states(backbone, windows: np.ndarray, layer: int, config, fingerprint: str, mesh,
            rules) -> Path:
  """The hidden-state cache of `windows` at `layer` (data/hidden.py)."""
  return hidden.cache_hidden_states(
      backbone, windows, [layer], mesh=mesh, rules=rules, batch_size=config.train.batch_size,
      cache_root=cache_root(config) / "hidden",
      key_fields={"model": fingerprint,
                  "dglm_windows": hashlib.sha256(windows.tobytes()).hexdigest()})


def train(config: ml_collections.ConfigDict, workdir: Path, backbone, passages: dict,
          layer: int, separator: int, *, sections: tuple[str, ...], resumable: tuple[str, ...],
          progress: bool) -> TrainedBridge:
  """The labelled bridge at `layer` on passages["train"] (validated on "validation"),
  resumably in workdir/dihal_cfg/; returns its EMA bridge."""
  labels = Labels(passages["train"].values)
  c = _config(config, labels)
  t, d = c.train, c.dglm
  mesh, rules = mesh_and_rules(c)
  model = denoiser.build(c.bridge, backbone.cfg.hidden_size, None, seed=c.seed)  # a UNet
  factor = denoiser.factor(model)
  fingerprint = hidden.checkpoint_fingerprint(checkpoint.checkpoint_dir(c, workdir))
  caches = {split: _states(backbone, padded(passages[split].tokens, factor, separator), layer,
                           c, fingerprint, mesh, rules) for split in ("train", "validation")}
  states = np.load(caches["train"] / f"layer_{layer}.npy", mmap_mode="r")
  stats = json.loads((caches["train"] / "stats.json").read_text())[str(layer)]
  norm = Normalizer.from_stats(stats, c.bridge.normalization)
  optim_cfg = OptimConfig(lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                          weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                          ema_decay=t.ema_decay)
  diffusion_cfg = denoiser.diffusion_config(c.bridge.to_dict())
  step_fn = make_train_step(diffusion_cfg, optim_cfg, mesh, rules,
                            self_condition_prob=t.self_condition_prob)
  per_attribute = {a: y[:len(states)] for a, y in passages["train"].labels.items()}
  key = jax.random.key(c.seed)

  def step(state, index):
    rng = np.random.default_rng([c.seed, int(state.step)])
    ids = labels.ids(labels.dropped({a: y[index] for a, y in per_attribute.items()}, rng,
                                    d.bridge_label_dropout))
    x0 = norm.forward(np.stack([states[i] for i in index]))
    state, metrics = step_fn(state, x0, key, labels=ids)
    return state, {k: metrics[k] for k in ("loss", "grad_norm")}, x0.shape[0] * x0.shape[1]

  state = init_train_state(model, make_optimizer(optim_cfg))
  val_loss = validation_loss_fn(state, diffusion_cfg, jax.random.key(c.seed + 1))
  val_x0 = put_global(np.asarray(norm.forward(
      np.load(caches["validation"] / f"layer_{layer}.npy")[:t.batch_size])),
      NamedSharding(mesh, PartitionSpec()))
  extra = {"layer": layer, "normalizer": norm.to_dict(), "train_cache": str(caches["train"]),
           "denoiser": denoiser.describe(model), "params": denoiser.num_params(model),
           "labels": {"attributes": {a: list(v) for a, v in passages["train"].values.items()},
                      "count": labels.count}}
  run_loop(state, workdir=workdir / "dihal_cfg",
           batches=index_batches(len(states), t.batch_size, c.seed), step=step,
           validate=lambda s: val_loss(s, val_x0), optim_cfg=optim_cfg,
           cadence=Cadence(t.steps, d.log_every, d.checkpoint_every, d.checkpoint_every, 2),
           checkpoint_config=c.to_dict(), sections=sections, resumable_changes=resumable,
           extra=extra, desc="dihal_cfg bridge", flops=step_fn.flops,
           progress=progress).finished("the dihal_cfg bridge")
  return load_bridge(workdir / "dihal_cfg", mesh)


def continuations(bridge: TrainedBridge, backbone, config, prompts: np.ndarray,
                  continuation: int, separator: int, key: jax.Array, *,
                  class_ids: np.ndarray | None, guidance: float) -> np.ndarray:
  """[N, continuation] tokens the bridge writes after each prompt [N, 1 + P] (separator and
  prefix known), read out by `sample.readout`, guided toward `class_ids` [N] with weight
  `guidance` (None: unconditional)."""
  s = config.sample
  reader = Readout(backbone, bridge.layer, separator)
  head = (current_token_head(bridge, backbone.cfg.vocab_size)
          if s.readout in ("identity", "joint") else None)
  body = np.concatenate([prompts, np.full((len(prompts), continuation), separator,
                                          prompts.dtype)], axis=1)
  tokens = padded(body, bridge.factor, separator)
  known = np.arange(tokens.shape[1]) < tokens.shape[1] - continuation
  out = []
  for i in range(0, len(tokens), s.batch):
    rows = slice(i, i + s.batch)
    sampler = bridge if class_ids is None else bridge.conditioned(class_ids[rows], guidance)
    filled = reader.fill(sampler, jax.random.fold_in(key, i), tokens[rows],
                         np.broadcast_to(known, tokens[rows].shape), mode=s.readout,
                         cfg=readout_config(config), identity_head=head)
    out.append(np.asarray(filled["tokens"])[:, -continuation:])
  return np.concatenate(out)
