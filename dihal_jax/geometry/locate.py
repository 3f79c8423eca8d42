"""Locate: one streamed pass, geometry proxies per candidate layer, the score and ℓ*.

One pass over `locate.num_tokens` tokens of the train split runs the lower
layers once (a single scan emitting h_0..h_deepest), and per layer keeps:
  * shifted first and second moments (Σ(x-s), Σ(x-s)(x-s)ᵀ; per-batch sums in
    float32 on the devices, accumulated in float64 on the host; the shift s
    is the first batch's mean, against cancellation on massive activations);
  * a reservoir of R token states at the same, seeded token positions for
    every layer (so stiffness compares the same pairs across layers).
Memory is O(d² + R·d) per layer. Position 0 is excluded by default.

Proxies are computed on standardized states (the correlation matrix; the
reservoir standardized with the streamed mean/std) and reported raw too.
Score S(l) = Σ_k w_k z_k(l), z-scored across candidates; ℓ* = argmax.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.backbone.model import Decoder
from dihal_jax.errors import UserInputError
from dihal_jax.geometry import proxies
from dihal_jax.parallel.sharding import Rules, batch_sharding

PROXIES = ("erank", "curvature", "compactness", "stiffness")
# The paper's form of the score (locate.score = "paper"): +curvature +stiffness -erank,
# equal weights on the z-scored proxies; "weights" = locate.weights (this project's prior).
PAPER_WEIGHTS = {"curvature": 1.0, "stiffness": 1.0, "erank": -1.0}
SCORE_FORMS = ("weights", "paper")


def candidate_layers(spec: str, num_layers: int) -> list[int]:
  """"" -> 1..L-1; else a comma list with ranges, e.g. "1,2,5-9"."""
  if not spec:
    return list(range(1, num_layers))
  layers = []
  try:
    for part in spec.split(","):
      lo, _, hi = part.partition("-")
      layers += list(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise UserInputError(f"locate.layers={spec!r}: expected layer numbers like '1,2,5-9'") from None
  bad = [l for l in layers if not 1 <= l <= num_layers]
  if bad or not layers:
    raise UserInputError(f"locate.layers={spec!r}: layer {bad[0] if bad else spec} outside "
                         f"1..{num_layers}")
  return sorted(set(layers))


@dataclasses.dataclass
class Moments:
  """Streaming mean and covariance of one layer in float64 (Chan et al.'s pairwise merge).

  Each batch contributes its own mean and centred scatter matrix (computed in
  float32 on the devices, where centring avoids cancellation on the massive
  activation channels); merging happens on the host in float64.
  """

  count: int = 0
  mean: np.ndarray | None = None
  m2: np.ndarray | None = None

  def add(self, count: int, mean: np.ndarray, m2: np.ndarray):
    mean, m2 = mean.astype(np.float64), m2.astype(np.float64)
    if self.count == 0:
      self.count, self.mean, self.m2 = count, mean, m2
      return
    total = self.count + count
    delta = mean - self.mean
    self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
    self.mean = self.mean + delta * (count / total)
    self.count = total

  @property
  def cov(self) -> np.ndarray:
    return self.m2 / self.count


def collect(model: Decoder, batches: Iterable[dict], layers: Sequence[int], *, num_batches: int,
            reservoir: int, seed: int, mesh: jax.sharding.Mesh, rules: Rules,
            exclude_first: bool = True, progress: bool = True):
  """Streams `num_batches` batches; returns ({l: Moments}, {l: reservoir [R, d]}, tokens seen).

  The reservoir holds the same R token positions (seeded) for every layer.
  """
  layers = tuple(sorted(set(layers)))
  graphdef, state = nnx.split(model)
  tokens_sharding = batch_sharding(mesh, rules, 2)
  start = 1 if exclude_first else 0

  @jax.jit
  def batch_moments(state, tokens, keep):
    hidden = nnx.merge(graphdef, state).hidden_states(tokens, layers)
    h = jnp.stack([hidden[l] for l in layers])[:, :, start:].astype(jnp.float32)
    h = h.reshape(len(layers), -1, h.shape[-1])  # [layers, tokens, d]
    mean = h.mean(1)
    x = h - mean[:, None, :]
    m2 = jnp.einsum("lnd,lne->lde", x, x, preferred_element_type=jnp.float32)
    return mean, m2, h[:, keep]

  moments = {l: Moments() for l in layers}
  kept, seen, keeps, pending = [], 0, None, None

  def merge(pending):  # host side of a finished batch (overlaps the next batch's compute)
    (mean, m2, points), valid, count = jax.device_get(pending[0]), pending[1], pending[2]
    for i, l in enumerate(layers):
      moments[l].add(count, mean[i], m2[i])
    kept.append(points[:, valid])

  dispatched = 0
  for batch in tqdm(batches, total=num_batches, desc="locate", unit="batch",
                    disable=not progress):
    local = np.asarray(batch["tokens"])
    per_batch = local.shape[0] * (local.shape[1] - start) * jax.process_count()
    if keeps is None:
      keeps = reservoir_positions(num_batches, per_batch, reservoir, seed)
    keep, valid = keeps[dispatched]
    tokens = jax.make_array_from_process_local_data(tokens_sharding, local)
    result = batch_moments(state, tokens, keep)  # asynchronous dispatch
    if pending is not None:
      merge(pending)
    pending, dispatched, seen = (result, valid, per_batch), dispatched + 1, seen + per_batch
    if dispatched == num_batches:
      break
  if pending is not None:
    merge(pending)
  if len(kept) < num_batches:
    raise UserInputError(f"locate.num_tokens: the data ran out after {seen} tokens")
  points = np.concatenate(kept, axis=1)
  return moments, {l: points[i] for i, l in enumerate(layers)}, seen


def reservoir_positions(num_batches: int, per_batch: int, reservoir: int, seed: int):
  """Per batch: (positions padded to one fixed length, validity mask), for R seeded tokens.

  A fixed length keeps the jitted gather to a single compilation.
  """
  total = num_batches * per_batch
  if reservoir > total:
    raise UserInputError(f"locate.reservoir={reservoir}: more than the {total} tokens streamed "
                         "(raise locate.num_tokens or lower the reservoir)")
  chosen = np.sort(np.random.default_rng(seed).choice(total, reservoir, replace=False))
  per = [chosen[(chosen >= b * per_batch) & (chosen < (b + 1) * per_batch)] - b * per_batch
         for b in range(num_batches)]
  width = max(len(p) for p in per)
  return [(np.pad(p, (0, width - len(p))), np.arange(width) < len(p)) for p in per]


def standardize(points: np.ndarray, moments: Moments) -> np.ndarray:
  std = np.sqrt(np.diag(moments.cov))
  return ((points - moments.mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def pair_distances(points: np.ndarray, moments: Moments, key: jax.Array,
                   cfg: proxies.ProxyConfig) -> dict[str, jax.Array]:
  """Squared Mahalanobis distances of the sampled pairs, standardized and raw."""
  cov = moments.cov.astype(np.float32)
  return {"std": proxies.pair_distances(standardize(points, moments), proxies.correlation(cov),
                                        key, cfg),
          "raw": proxies.pair_distances(points, cov, key, cfg)}


def layer_proxies(points: np.ndarray, moments: Moments, reference: dict[str, jax.Array],
                  key: jax.Array, cfg: proxies.ProxyConfig) -> dict:
  """Standardized proxies (scored) and raw ones (reported) of one layer.

  `reference` holds the embedding layer's pair distances (`pair_distances`),
  computed once for all layers: stiffness compares the same pairs.
  """
  cov = moments.cov.astype(np.float32)
  x = standardize(points, moments)
  local = proxies.local_geometry(x, key, cfg)
  local_raw = proxies.local_geometry(points, key, cfg)
  distances = pair_distances(points, moments, key, cfg)
  return {
      "erank": float(proxies.effective_rank_from_cov(proxies.correlation(cov))),
      "curvature": float(local["curvature"]),
      "compactness": float(local["compactness"]),
      "stiffness": float(proxies.spearman(distances["std"], reference["std"])),
      "erank_raw": float(proxies.effective_rank_from_cov(cov)),
      "curvature_raw": float(local_raw["curvature"]),
      "compactness_raw": float(local_raw["compactness"]),
      "stiffness_raw": float(proxies.spearman(distances["raw"], reference["raw"])),
  }


def score_layers(rows: list[dict], weights: dict[str, float]) -> int:
  """Adds z_<proxy> and score to each row (z across rows); returns the argmax layer."""
  unknown = set(weights) - set(PROXIES)
  if unknown:
    raise UserInputError(f"locate.weights: unknown proxy {sorted(unknown)[0]!r}; expected "
                         f"{PROXIES}")
  for name in PROXIES:
    values = np.array([row[name] for row in rows])
    spread = values.std()
    z = (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
    for row, value in zip(rows, z):
      row[f"z_{name}"] = float(value)
  for row in rows:
    row["score"] = float(sum(w * row[f"z_{name}"] for name, w in weights.items()))
  return max(rows, key=lambda row: row["score"])["layer"]


def score_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The weights of locate.score's form: locate.weights or PAPER_WEIGHTS."""
  form = config.locate.score
  if form not in SCORE_FORMS:
    raise UserInputError(f"locate.score={form!r}: expected one of {', '.join(SCORE_FORMS)}")
  return dict(config.locate.weights) if form == "weights" else dict(PAPER_WEIGHTS)


def proxy_config(config: ml_collections.ConfigDict) -> proxies.ProxyConfig:
  c = config.locate
  return proxies.ProxyConfig(k=c.k, flat_dim=c.flat_dim, anchors=c.anchors, pairs=c.pairs,
                             ridge=c.ridge)


def run_locate(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> dict:
  """`dihal locate`: stream the train split, score every candidate layer, pick ℓ*."""
  from dihal_jax.backbone import checkpoint
  from dihal_jax.data.dataset import Data
  from dihal_jax.parallel.sharding import mesh_and_rules

  c = config.locate
  t0 = time.perf_counter()
  data = Data.from_config(config, workdir)
  model = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  mesh, rules = mesh_and_rules(config)
  candidates = candidate_layers(c.layers, model.cfg.num_layers)
  per_batch = c.batch_size * (data.window - (1 if c.exclude_first else 0))
  num_batches = c.num_tokens // per_batch
  if num_batches < 1:
    raise UserInputError(f"locate.num_tokens={c.num_tokens}: fewer than one batch "
                         f"({per_batch} tokens)")
  weights = score_weights(config)
  pcfg = proxy_config(config)
  proxies.validate(pcfg, c.reservoir)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  batches = data.windows("train", batch_size=c.batch_size, shuffle=True)
  moments, points, seen = collect(model, batches, [0] + candidates, num_batches=num_batches,
                                  reservoir=c.reservoir, seed=config.seed, mesh=mesh,
                                  rules=rules, exclude_first=c.exclude_first, progress=progress)
  stream_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  key = jax.random.key(config.seed)
  reference = pair_distances(points[0], moments[0], key, pcfg)
  rows = [{"layer": l, **layer_proxies(points[l], moments[l], reference, key, pcfg)}
          for l in tqdm(candidates, desc="proxies", disable=not progress)]
  selected = score_layers(rows, weights)
  proxies_s = time.perf_counter() - t0
  return {"layers": rows, "selected_layer": selected, "num_tokens": seen,
          "candidates": candidates, "score_form": c.score, "weights": weights,
          "timings": {"setup_s": setup_s, "stream_s": stream_s, "proxies_s": proxies_s}}


def locate_into(config: ml_collections.ConfigDict, directory, *, plot_path=None,
                progress: bool = True) -> dict:
  """`run_locate` into `directory`, then its report.json and its plot (default
  directory/geometry.png): what `dihal train` (bridge.layer=auto), the sweep and the demo
  keep of a locate run."""
  directory = Path(directory)
  report = run_locate(config, directory, progress=progress)
  reports.write_json(directory / "report.json", report)
  plot(report, plot_path or directory / "geometry.png")
  return report


def plot(report: dict, path):
  """Each proxy (z-scored, with its sign in the score) and the score per layer, ℓ* marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["layers"]
  layers = [r["layer"] for r in rows]
  fig, axes = plt.subplots(1, len(PROXIES) + 1, figsize=(17, 3.2), sharex=True)
  for ax, name in zip(axes, PROXIES + ("score",)):
    ax.plot(layers, [r[name] for r in rows], marker="o", ms=3)
    ax.axvline(report["selected_layer"], color="tab:red", ls="--", lw=1)
    weight = report["weights"].get(name)
    ax.set_title(name if weight is None else f"{name} (weight {weight:+g})")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
  fig.suptitle(f"Geometry per layer, {report['num_tokens']} tokens; "
               f"selected layer {report['selected_layer']} (red)")
  fig.tight_layout()
  reports.save_figure(fig, path)


def summary(report: dict) -> str:
  rows = [[r["layer"], r["erank"], r["erank_raw"], r["curvature"], r["compactness"],
           r["stiffness"], r["score"]] for r in report["layers"]]
  table = reports.markdown_table(
      ["layer", "erank", "erank_raw", "curvature", "compactness", "stiffness", "score"], rows)
  return table + f"\nselected layer ℓ* = {report['selected_layer']} ({report['num_tokens']} tokens)"
