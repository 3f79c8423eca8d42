"""A trained DGLM: how its parts are built (for training and for loading) and loaded back
from a `dihal dglm` workdir for sampling.

Workdir: projector/checkpoints, latent_denoiser/checkpoints (Orbax, EMA params used),
classifiers.npz (the latent classifiers' weights per attribute).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax import reports
from dihal_jax.backbone.lora import LoRA, parse_targets
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.checkpoint import read_latest, stored_config
from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
from dihal_jax.dglm import latent_diffusion, soft_prompt
from dihal_jax.dglm.attributes import LatentClassifier
from dihal_jax.dglm.passages import SPEECH, parse_books
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import mesh_and_rules, put_global

LATENT_DIM = 384  # all-MiniLM-L6-v2's sentence vectors
MISSING = "DGLM checkpoints (run `dihal dglm` first)"


def attribute_values(d: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """{attribute: its values}: the books of dglm.books, and the speech labels."""
  return {"book": tuple(parse_books(d.books)), "speech": SPEECH}


def index_batches(count: int, batch: int, seed: int):
  """A checkpointable grain iterator of shuffled index batches of range(count), forever."""
  return iter(grain.MapDataset.range(count).shuffle(seed=seed).repeat().batch(batch))


def projector_optim(d) -> OptimConfig:
  return OptimConfig(lr=d.lr, warmup_steps=max(1, d.steps // 10), total_steps=d.steps,
                     ema_decay=0.99)


def denoiser_optim(d) -> OptimConfig:
  return OptimConfig(lr=d.denoiser_lr, warmup_steps=max(1, d.denoiser_steps // 20),
                     total_steps=d.denoiser_steps)


def diffusion_config(d) -> diffusion.DiffusionConfig:
  """x0-prediction DDIM on the cosine schedule, prefix guidance dglm.prefix_guidance."""
  return diffusion.DiffusionConfig(schedule="cosine", prediction="x0", steps=d.sampler_steps,
                                   sampler="ddim", guidance=float(d.prefix_guidance))


def new_projector(config, backbone: Decoder):
  """A maker of fresh projectors whose vectors start at the scale of the backbone's token
  embeddings, with LoRA adapters of the backbone when dglm.lora_rank > 0."""
  d = config.dglm
  embed_rms = float(jnp.sqrt(jnp.mean(jnp.square(backbone.embed[...].astype(jnp.float32)))))

  def make():
    rngs = nnx.Rngs(config.seed)
    lora = LoRA(backbone, rank=d.lora_rank, alpha=d.lora_alpha,
                targets=parse_targets(d.lora_targets), rngs=rngs) if d.lora_rank else None
    return soft_prompt.Projector(LATENT_DIM, backbone.cfg.hidden_size, vectors=d.vectors,
                                 hidden=d.hidden, embed_rms=embed_rms, rngs=rngs, lora=lora)
  return make


def new_denoiser(config):
  """A maker of fresh latent denoisers."""
  d = config.dglm
  return lambda: latent_diffusion.LatentDenoiser(LATENT_DIM, width=d.width, blocks=d.blocks,
                                                 rngs=nnx.Rngs(config.seed))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: jax.sharding.Mesh):
  """Every array of `tree` replicated over `mesh` (the backbone's), so that DGLM's small
  modules and the sharded backbone meet in one jitted program."""
  return put_global(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def save_classifiers(path: Path, classifiers: dict[str, LatentClassifier]) -> None:
  reports.write_arrays(path, {f"{a}_{k}": getattr(c, k) for a, c in classifiers.items()
                              for k in ("weight", "bias")})


@dataclasses.dataclass
class TrainedDGLM:
  projector: soft_prompt.Projector
  denoiser: latent_diffusion.LatentDenoiser
  classifiers: dict[str, LatentClassifier]


def _restore(directory: Path, maker, make_optim, mesh: jax.sharding.Mesh):
  """The EMA module of the newest checkpoint in `directory`, replicated over `mesh`; its
  architecture from the checkpoint's own config (`maker(config)` -> a maker of fresh
  modules), so sampling needs no repeat of the training flags."""
  holder = {}

  def abstract(stored: dict, _extra: dict):
    config = stored_config(stored)
    fresh, optim = maker(config), make_optim(config.dglm)
    state = holder["state"] = jax.eval_shape(
        lambda: init_train_state(fresh(), make_optimizer(optim)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=replicated(mesh)),
                        state.checkpoint_items())

  _, restored, _, _ = read_latest(directory, abstract, what=MISSING)
  return nnx.merge(holder["state"].graphdef, restored["ema"], restored["rest"])


def load_dglm(config: ml_collections.ConfigDict, workdir: str | Path,
              backbone: Decoder) -> TrainedDGLM:
  """The projector (with its LoRA adapters, if trained with them), latent denoiser (EMA
  params) and latent classifiers of a workdir."""
  workdir = Path(workdir)
  mesh, _ = mesh_and_rules(config)
  projector = _restore(workdir / "projector" / "checkpoints",
                       lambda stored: new_projector(stored, backbone), projector_optim, mesh)
  denoiser = _restore(workdir / "latent_denoiser" / "checkpoints", new_denoiser, denoiser_optim,
                      mesh)
  path = workdir / "classifiers.npz"
  if not path.is_file():
    raise UserInputError(f"no {MISSING}: {path} is missing")
  with np.load(path) as saved:
    classifiers = {a: LatentClassifier(saved[f"{a}_weight"], saved[f"{a}_bias"])
                   for a in attribute_values(config.dglm)}
  return TrainedDGLM(projector, denoiser, classifiers)
