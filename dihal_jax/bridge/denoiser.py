"""Which network denoises the bridge, built from the config (`dihal train`) or a checkpoint.

  bridge.denoiser = "unet"         bridge/unet.py: a 1D UNet from scratch (the default).
  bridge.denoiser = "transformer"  bridge/transformer.py: blocks of the backbone's
                                   architecture; bridge.init = "backbone" copies them
                                   from the backbone (blocks ℓ+1..ℓ+m by default),
                                   "scratch" initializes them randomly.
  bridge.diffusion.prediction = "auto": x0 for the transformer (ε-prediction is reported
  to collapse in high-dimensional latents; x0 lets the token loss act on the estimate
  directly), v for the UNet.

The checkpoint's `extra["denoiser"]` records the kind and the blocks' architecture, so
`load_bridge` rebuilds the same network without the backbone's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.transformer import TransformerConfig, TransformerDenoiser
from dihal_jax.bridge.unet import UNet, UNetConfig
from dihal_jax.errors import UserInputError

DENOISERS = ("unet", "transformer")
INITS = ("scratch", "backbone")
DTYPES = ("float32", "bfloat16")


def _bridge(config) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def kind(bridge: dict) -> str:
  """bridge.denoiser of a (stored) bridge config section; bridges saved before there was a
  choice are UNets."""
  return bridge.get("denoiser", "unet")


def diffusion_config(bridge: dict) -> diffusion.DiffusionConfig:
  """The DiffusionConfig of a bridge config section, prediction "auto" resolved."""
  fields = dict(bridge["diffusion"])
  if fields.get("prediction") == "auto":
    fields["prediction"] = "x0" if kind(bridge) == "transformer" else "v"
  return diffusion.DiffusionConfig(**fields)


def unet_config(stored: dict) -> UNetConfig:
  """UNetConfig from a (JSON round-tripped) config dict (lists back to tuples)."""
  return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def transformer_config(stored: dict) -> TransformerConfig:
  return TransformerConfig(**stored)


def first_block(bridge: dict, layer: int) -> int:
  """The first backbone block (1-based) a backbone-initialized transformer copies."""
  first = int(bridge["transformer"]["first_block"])
  return layer + 1 if first == 0 else first


def validate(config, num_layers: int, layer: int) -> None:
  """Raises UserInputError naming the first bad bridge.* field for a bridge at `layer`."""
  bridge = _bridge(config)
  if kind(bridge) not in DENOISERS:
    raise UserInputError(f"--config.bridge.denoiser={bridge['denoiser']!r}: expected one of "
                         f"{', '.join(DENOISERS)}")
  if bridge.get("init", "scratch") not in INITS:
    raise UserInputError(f"--config.bridge.init={bridge['init']!r}: expected one of "
                         f"{', '.join(INITS)}")
  if bridge.get("dtype", "float32") not in DTYPES:
    raise UserInputError(f"--config.bridge.dtype={bridge['dtype']!r}: expected one of "
                         f"{', '.join(DTYPES)}")
  if kind(bridge) != "transformer":
    return
  m = int(bridge["transformer"]["blocks"])
  if m < 1:
    raise UserInputError(f"--config.bridge.transformer.blocks={m}: expected >= 1")
  if bridge["init"] == "backbone":
    first = first_block(bridge, layer)
    if first < 1 or first + m - 1 > num_layers:
      raise UserInputError(
          f"--config.bridge.init=backbone: blocks {first}..{first + m - 1} do not exist (the "
          f"model has blocks 1..{num_layers}); lower bridge.transformer.blocks or set "
          "bridge.transformer.first_block")


def build(config, dim: int, norm: Normalizer, *, seed: int, backbone: Decoder | None = None,
          block_cfg: BackboneConfig | None = None, layer: int = 0) -> nnx.Module:
  """A fresh denoiser for states of width `dim` at `layer`. The transformer takes its
  architecture from `backbone` (and, with init=backbone, its blocks) or from `block_cfg`."""
  bridge = _bridge(config)
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(bridge.get("dtype", "float32"))  # bridges saved before the choice: float32
  if kind(bridge) == "unet":
    return UNet(dim, unet_config(bridge["unet"]), dtype=dtype, rngs=rngs)
  block_cfg = backbone.cfg if backbone is not None else block_cfg
  model = TransformerDenoiser(block_cfg, transformer_config(bridge["transformer"]), norm,
                              dtype=dtype, rngs=rngs)
  if bridge.get("init") == "backbone" and backbone is not None:
    model.load_blocks(backbone, first_block(bridge, layer))
  return model


def describe(model: nnx.Module) -> dict:
  """What `load_bridge` needs to rebuild `model` (stored in the checkpoint's extra)."""
  if isinstance(model, TransformerDenoiser):
    return {"kind": "transformer", "block_cfg": model.block_cfg.to_hf_config()}
  return {"kind": "unet"}


def from_description(described: dict | None, config: dict, dim: int,
                     norm: Normalizer) -> nnx.Module:
  """An (untrained) denoiser of the stored kind, the shapes of the checkpoint's."""
  if (described or {}).get("kind") == "transformer":
    return build(config["bridge"], dim, norm, seed=0,
                 block_cfg=BackboneConfig.from_hf_config(described["block_cfg"]))
  return build(dict(config["bridge"], denoiser="unet"), dim, norm, seed=0)


def factor(model: nnx.Module) -> int:
  """Window lengths must be multiples of this (the UNet downsamples; attention does not)."""
  if isinstance(model, UNet):
    return 2 ** (len(model.cfg.channel_mults) - 1)
  return 1


def num_params(model: nnx.Module) -> int:
  """Trained parameters (the transformer's normalizer constants are not)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
