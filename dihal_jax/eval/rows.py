"""The generators behind `dihal eval`'s rows: each fills the unknown positions of windows.

One call shape for every generator: `given` [N, n] tokens whose first `prefix`
positions are known (1 = the separator only: unconditional generation; 32 = a
prefix continuation); the rest is generated. Returns (tokens [N, n], the bridge's
first sample of h_l [N, n, d] or None).

  ar_backbone          the backbone's own ancestral samples (temperature 1).
  unigram_sampler      independent draws from the train split's token frequencies.
  bigram_sampler       draws from the train split's successors of the previous token.
  dihal                the bridge at l* read by the default readout (sample.readout);
  dihal_<mode>         ... by each other readout mode (hybrid/readout.py).
  dihal_l0             the bridge at l = 0, default readout.
  embedding_rounding   the l = 0 bridge's states rounded to the nearest embedding row
                       (Diffusion-LM style), no transformer.
  mdm                  the backbone post-trained into a masked diffusion model (`dihal mdm`),
                       sample.mdm_steps reveal steps (sample.unmask, sample.mdm_block).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.backbone.generate import generate
from dihal_jax.backbone.model import Decoder
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.hybrid.bridge_sampler import TrainedBridge
from dihal_jax.bridge.token_head import ClassMeanHead
from dihal_jax.hybrid.readout import ReadoutConfig, nearest_embedding
from dihal_jax.mdm import sampler as mdm_sampler
from dihal_jax.mdm.train import TrainedMDM

CALIBRATION_ROWS = ("unigram_sampler", "bigram_sampler")
L0_ROWS = ("dihal_l0", "embedding_rounding")


@dataclasses.dataclass
class RowGenerators:
  backbone: Decoder
  counts: CountSampler
  readout: ReadoutConfig
  default_mode: str  # sample.readout
  batch: int
  main: TrainedBridge | None = None  # the bridge at l*
  l0: TrainedBridge | None = None  # the bridge at l = 0
  head: ClassMeanHead | None = None  # the current-token head (identity / joint readouts)
  readers: dict = dataclasses.field(default_factory=dict)  # "main" / "l0" -> Readout
  mdm: TrainedMDM | None = None  # the masked diffusion model
  unmask: str = "confidence"  # its sampler's order (sample.unmask)
  mdm_block: int = 0  # its semi-AR block (sample.mdm_block)
  mdm_steps: int = 32  # its reveal steps (sample.mdm_steps)

  def mode(self, method: str) -> str | None:
    """The readout mode of a bridge row (None for the rows without a bridge)."""
    if method == "embedding_rounding":
      return "nearest_embedding"
    if not method.startswith("dihal"):
      return None
    return self.default_mode if method in ("dihal", "dihal_l0") else method[len("dihal_"):]

  def __call__(self, method: str, key: jax.Array, given: np.ndarray,
               prefix: int) -> tuple[np.ndarray, np.ndarray | None]:
    given = np.asarray(given, np.int32)
    num, n = given.shape
    if method == "ar_backbone":
      start = jnp.asarray(given[:, :prefix])
      new = generate(self.backbone, start, max_new_tokens=n - prefix, key=key, temperature=1.0)
      return np.concatenate([given[:, :prefix], np.asarray(new)], axis=1), None
    if method == "mdm":
      known = np.broadcast_to(np.arange(n) < prefix, (num, n))
      rows = [mdm_sampler.sample(
          self.mdm.model, given[i:i + self.batch], known[i:i + self.batch],
          jax.random.fold_in(key, i), mask_id=self.mdm.mask_id, shift=self.mdm.shift,
          steps=self.mdm_steps, unmask=self.unmask, block=self.mdm_block,
          temperature=self.readout.temperature, top_p=self.readout.top_p)
              for i in range(0, num, self.batch)]
      return np.concatenate(rows), None
    if method in CALIBRATION_ROWS:
      rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
      draw = (self.counts.unigram_sample if method == "unigram_sampler"
              else self.counts.bigram_sample)
      return draw(rng, given[:, :prefix], n), None
    bridge, reader = ((self.l0, self.readers["l0"]) if method in L0_ROWS
                      else (self.main, self.readers["main"]))
    known = np.broadcast_to(np.arange(n) < prefix, (num, n))
    rows, states = [], []
    for i in range(0, num, self.batch):
      tokens, k = given[i:i + self.batch], jax.random.fold_in(key, i)
      if method == "embedding_rounding":
        h = bridge.sample(k, reader.lower(tokens), known[:len(tokens)], steps=self.readout.steps)
        out = {"tokens": jnp.where(known[:len(tokens)], tokens,
                                   nearest_embedding(h, self.backbone.embed[...])), "states": h}
      else:
        out = reader.fill(bridge, k, tokens, known[:len(tokens)], mode=self.mode(method),
                          cfg=self.readout, identity_head=self.head)
      rows.append(np.asarray(out["tokens"]))
      states.append(np.asarray(out["states"]))
    return np.concatenate(rows), np.concatenate(states)
