"""LoRA adapters for the backbone (Hu et al., 2021): W' = W + (alpha / r) A B per chosen kernel,
A [in, r] drawn as PEFT does (uniform, bound 1/sqrt(in)), B [r, out] zero, so a fresh adapter
leaves the backbone exactly as it was.

Applied as a weight-space delta on a copy of the backbone (`LoRA.apply`): the model code is
unchanged and every path (teacher-forced loss, KV-cached generation) runs the adapted
weights. Inside a jitted step the merge is one small matmul per kernel. Merged kernels are
float32 (a bfloat16 kernel would round a young adapter's delta away); the matmuls still run
in the backbone's compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.backbone.model import Decoder
from dihal_jax.errors import UserInputError

# kernel name -> (the block's sub-module holding it, how many axes after the layer axis are
# its input: o_proj [L, heads, head_dim, D] reads all heads at once)
KERNELS = {"q_proj": ("attn", 1), "k_proj": ("attn", 1), "v_proj": ("attn", 1),
           "o_proj": ("attn", 2), "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1),
           "down_proj": ("mlp", 1)}


ALL = ",".join(KERNELS)


def parse_targets(spec: str) -> tuple[str, ...]:
  """"q_proj,v_proj" (dglm.lora_targets) -> ("q_proj", "v_proj"); one `dihal: error:` line
  for unknown names."""
  names = tuple(p.strip() for p in spec.split(",") if p.strip())
  unknown = [n for n in names if n not in KERNELS]
  if unknown or not names:
    raise UserInputError(f"--config.dglm.lora_targets={spec!r}: expected kernel names from "
                         f"{', '.join(KERNELS)}")
  return names


class LoRA(nnx.Module):
  """Rank-`rank` adapters of `targets` in the layers first_layer.. of `backbone` (shapes read
  from it; the layers below keep their weights: the tolerant decoder adapts only the layers
  above the bridge's interface)."""

  def __init__(self, backbone: Decoder, *, rank: int, alpha: float, targets: tuple[str, ...],
               rngs: nnx.Rngs, first_layer: int = 0):
    self.scale = alpha / rank
    self.targets = tuple(targets)
    self.first_layer = first_layer
    a, b = {}, {}
    for name in self.targets:
      shape = self._kernel(backbone, name).shape
      fan_in, fan_out = self._fans(name, shape)
      bound = 1 / math.sqrt(fan_in)
      layers = shape[0] - first_layer
      a[name] = nnx.Param(jax.random.uniform(rngs.params(), (layers, fan_in, rank),
                                             minval=-bound, maxval=bound))
      b[name] = nnx.Param(jnp.zeros((layers, rank, fan_out)))
    self.a, self.b = nnx.Dict(a), nnx.Dict(b)

  @staticmethod
  def _kernel(backbone: Decoder, name: str) -> nnx.Param:
    part, _ = KERNELS[name]
    return getattr(getattr(backbone.layers, part), name)

  @staticmethod
  def _fans(name: str, shape) -> tuple[int, int]:
    split = 1 + KERNELS[name][1]
    return math.prod(shape[1:split]), math.prod(shape[split:])

  def delta(self, name: str, shape) -> jax.Array:
    """(alpha / r) A B in the kernel's layout [L, ...] (zero below first_layer)."""
    ab = self.scale * jnp.einsum("lir,lro->lio", self.a[name][...], self.b[name][...])
    ab = jnp.pad(ab, ((self.first_layer, 0), (0, 0), (0, 0)))
    return ab.reshape(shape)

  def apply(self, backbone: Decoder) -> Decoder:
    """A copy of `backbone` whose target kernels carry the adapters (the original is kept)."""
    graphdef, state = nnx.split(backbone)
    for name in self.targets:
      part, _ = KERNELS[name]
      kernel = state["layers"][part][name]
      merged = kernel[...].astype(jnp.float32) + self.delta(name, kernel.shape)
      state["layers"][part][name] = kernel.replace(merged)
    return nnx.merge(graphdef, state)
