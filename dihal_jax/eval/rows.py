"""The generated rows of `dihal eval`: each row's name and how its tokens are made.

One call shape for every row: `given` [N, n] tokens whose first `prefix` positions are
known (1 = the separator only: unconditional generation; 32 = a prefix continuation);
the rest is generated. Returns (tokens [N, n], the bridge's first sample of h_l
[N, n, d] or None).

ROWS is the table (row name -> Row); a new row is one entry, plus a loader in
eval/evaluate.py's MODEL_LOADERS when it samples a model eval does not load yet.
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
  mdm_block            the same post-training as block diffusion (BD3-LM, blocks of
                       eval.mdm_block), sampled block by block, sample.mdm_steps per block.
Batched generators give each batch the row's key folded with the batch's first row index.
With eval.match_entropy a bridge row read by `joint` is drawn at the temperature that
matches real text's unigram entropy (eval/entropy_match.py), recorded in `matched_read`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.backbone.generate import generate
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge.token_head import ClassMeanHead
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.eval.entropy_match import matched_joint_read
from dihal_jax.hybrid.readout import ReadoutConfig, nearest_embedding
from dihal_jax.mdm import sampler as mdm_sampler
from dihal_jax.mdm.train import TrainedMDM

BRIDGES = ("main", "l0")  # the bridge models: at l* and at l = 0


@dataclasses.dataclass
class RowGenerators:
  """The models and settings the rows sample with; `gens(method, key, given, prefix)`."""
  backbone: Decoder
  counts: CountSampler
  readout: ReadoutConfig
  default_mode: str  # sample.readout
  batch: int
  bridges: dict = dataclasses.field(default_factory=dict)  # "main" / "l0" -> TrainedBridge
  readers: dict = dataclasses.field(default_factory=dict)  # "main" / "l0" -> Readout
  # "main" / "l0" -> each bridge's current-token head (identity / joint readouts)
  heads: dict[str, ClassMeanHead] = dataclasses.field(default_factory=dict)
  mdms: dict = dataclasses.field(default_factory=dict)  # "mdm" / "mdm_block" -> TrainedMDM
  unmask: str = "confidence"  # their sampler's order (sample.unmask)
  mdm_block: int = 0  # the semi-AR block of an MDM trained without blocks (sample.mdm_block)
  mdm_steps: int = 32  # reveal steps (per block) (sample.mdm_steps)
  # eval.match_entropy: real test windows [N, n]; a joint-read bridge row's temperature is
  # bisected to their unigram entropy over the generated positions. None: sample.temperature.
  entropy_reference: np.ndarray | None = None
  # The last call's matched read, {"temperature", "entropy_matched"}; None when not matched.
  matched_read: dict | None = None

  def mode(self, method: str) -> str | None:
    """The readout mode of a bridge row (None for every other row)."""
    row = ROWS.get(method)
    return (row.mode or self.default_mode) if row and row.model in BRIDGES else None

  def __call__(self, method: str, key: jax.Array, given: np.ndarray,
               prefix: int) -> tuple[np.ndarray, np.ndarray | None]:
    row = ROWS[method]
    self.matched_read = None
    return row.make(self, row, key, np.asarray(given, np.int32), prefix)


Make = Callable[[RowGenerators, "Row", jax.Array, np.ndarray, int],
                tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Row:
  """How one generated row makes its tokens."""
  # Folded into the task's key: the row's own random stream. A fixed number, not the row's
  # place in the table, so committed results stay reproducible; a new row takes an unused one.
  stream: int
  make: Make  # (generators, this row, key, given, prefix) -> (tokens, states or None)
  model: str | None = None  # the trained model it samples ("main", "l0", "mdm", ...), if any
  mode: str | None = None  # a bridge row's readout mode; None = the default (sample.readout)
  reference: bool = False  # a reference row (what the methods are read against), not a method


def _known(given: np.ndarray, prefix: int) -> np.ndarray:
  """[N, n] True at the given positions."""
  return np.broadcast_to(np.arange(given.shape[1]) < prefix, given.shape)


def _batches(key: jax.Array, num: int, batch: int):
  """(key, rows) per batch: the key folds in the batch's first row index."""
  for i in range(0, num, batch):
    yield jax.random.fold_in(key, i), slice(i, i + batch)


def _ancestral(g: RowGenerators, row: Row, key, given, prefix):
  start = jnp.asarray(given[:, :prefix])
  new = generate(g.backbone, start, max_new_tokens=given.shape[1] - prefix, key=key,
                 temperature=1.0)
  return np.concatenate([given[:, :prefix], np.asarray(new)], axis=1), None


def _counted(draw, key, given, prefix):
  """A calibration sampler's draws, its numpy generator seeded by the key's data."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  return draw(rng, given[:, :prefix], given.shape[1]), None


def _unigram(g: RowGenerators, row: Row, key, given, prefix):
  return _counted(g.counts.unigram_sample, key, given, prefix)


def _bigram(g: RowGenerators, row: Row, key, given, prefix):
  return _counted(g.counts.bigram_sample, key, given, prefix)


def _masked_diffusion(g: RowGenerators, row: Row, key, given, prefix):
  known = _known(given, prefix)
  mdm = g.mdms[row.model]
  return np.concatenate([mdm_sampler.sample(
      mdm.model, given[rows], known[rows], k, mask_id=mdm.mask_id, shift=mdm.shift,
      steps=g.mdm_steps, unmask=g.unmask, block=g.mdm_block, trained_block=mdm.block,
      temperature=g.readout.temperature, top_p=g.readout.top_p)
      for k, rows in _batches(key, len(given), g.batch)]), None


def _read_out(g: RowGenerators, row: Row, key, tokens, known) -> dict:
  """One batch of the bridge's states, read out by the row's readout mode."""
  return g.readers[row.model].fill(g.bridges[row.model], key, tokens, known,
                                   mode=row.mode or g.default_mode, cfg=g.readout,
                                   identity_head=g.heads.get(row.model))


def _round_to_embeddings(g: RowGenerators, row: Row, key, tokens, known) -> dict:
  """One batch of the bridge's states, each unknown position rounded to its nearest embedding
  row."""
  h = g.bridges[row.model].sample(key, g.readers[row.model].lower(tokens), known,
                                  steps=g.readout.steps)
  return {"tokens": jnp.where(known, tokens, nearest_embedding(h, g.backbone.embed[...])),
          "states": h}


def _bridge(read_batch) -> Make:
  """A bridge row: the bridge samples each batch's states, `read_batch` makes its tokens."""
  def make(g: RowGenerators, row: Row, key, given, prefix):
    known = _known(given, prefix)
    tokens, states = [], []
    for k, rows in _batches(key, len(given), g.batch):
      out = read_batch(g, row, k, given[rows], known[rows])
      tokens.append(np.asarray(out["tokens"]))
      states.append(np.asarray(out["states"]))
    return np.concatenate(tokens), np.concatenate(states)
  return make


def _matched_joint(g: RowGenerators, row: Row, key, given, prefix):
  """A joint-read bridge row at the temperature that brings the unigram entropy of its
  generated positions within entropy_match.ENTROPY_TOL of real text's at the same positions
  (g.entropy_reference): the states are sampled once (the keys `Readout.fill` uses), then
  read at each T of the bisection (entropy_match.matched_joint_read)."""
  known = _known(given, prefix)
  reader, bridge = g.readers[row.model], g.bridges[row.model]
  parts = []  # (states, the read's key, rows) per batch
  for k, rows in _batches(key, len(given), g.batch):
    k_first, k_rest = jax.random.split(k)
    h = bridge.sample(k_first, reader.lower(given[rows]), jnp.asarray(known[rows]),
                      steps=g.readout.steps)
    parts.append((h, jax.random.fold_in(k_rest, 0), rows))
  tokens, t, matched = matched_joint_read(reader, g.heads[row.model], parts, given, known,
                                          g.entropy_reference, max(prefix, 1), g.readout)
  g.matched_read = {"temperature": t, "entropy_matched": matched}
  return tokens, np.concatenate([np.asarray(h) for h, _, _ in parts])


_read_each_batch = _bridge(_read_out)
_round_bridge = _bridge(_round_to_embeddings)


def _read_bridge(g: RowGenerators, row: Row, key, given, prefix):
  """A bridge row read by its mode; a joint read at matched entropy with g.entropy_reference."""
  if g.entropy_reference is not None and (row.mode or g.default_mode) == "joint":
    return _matched_joint(g, row, key, given, prefix)
  return _read_each_batch(g, row, key, given, prefix)

# Streams 0-2 belong to the rows read off held-out windows (real_text, the oracles), which
# draw no samples.
ROWS = {
    "ar_backbone": Row(3, _ancestral, reference=True),
    "unigram_sampler": Row(4, _unigram, reference=True),
    "bigram_sampler": Row(5, _bigram, reference=True),
    "dihal": Row(6, _read_bridge, model="main"),
    "dihal_blockwise": Row(7, _read_bridge, model="main", mode="blockwise"),
    "dihal_lm_head": Row(8, _read_bridge, model="main", mode="lm_head"),
    "dihal_refine": Row(9, _read_bridge, model="main", mode="refine"),
    "dihal_identity": Row(10, _read_bridge, model="main", mode="identity"),
    "dihal_joint": Row(11, _read_bridge, model="main", mode="joint"),
    "dihal_l0": Row(12, _read_bridge, model="l0"),
    "embedding_rounding": Row(13, _round_bridge, model="l0", mode="nearest_embedding"),
    "mdm": Row(14, _masked_diffusion, model="mdm"),
    "mdm_block": Row(15, _masked_diffusion, model="mdm_block"),
}
