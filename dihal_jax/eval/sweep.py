"""`dihal sweep`: does the geometry score predict which layers are bridgeable?

Protocol (one for every layer): the config's `bridge.*` and `train.*`, with `train.steps`
set to `sweep.epochs` passes over the `train.cache_windows` cached train windows (one epoch
by default, the paper's protocol); `sweep.seeds` runs per layer (seed = config.seed + s:
the bridge's init, batch order and noise) in workdir/layer_<l>/seed_<s>. Runs that differ
only in their seed share one hidden-state cache.

Criteria per run (criteria.json beside the run; a finished run costs nothing on a rerun):
  * val_loss: the EMA model's loss on the fixed validation batch, mean of the last two
    validation rows. Each layer's states are standardized on their own, so this compares
    layers as "how predictable is the standardized state under the same protocol";
  * recovery_t<t> (t in sweep.noise_levels): the share of tokens the current-token head
    reads back from the bridge's sample started at the first `sweep.eval_windows`
    validation windows noised to t (token space: comparable across layers);
  * joint_recovery_t<t>: the samples of the first noise level read by the `joint` readout
    at temperature 0 (the costly read: the upper layers over the whole vocabulary).
Per layer: the joint readout's oracle (its token match on the true states).

Scores, all Σ_p w_p z_p on locate's z-scored proxies (geometry/locate.py): `weights`
(locate.weights, this project's prior), `paper` (+curvature +stiffness -erank), each proxy
alone, every sign pattern of the paper's three proxies, and `fitted_elsewhere` (the
proposed weights of another sweep's report, `sweep.fitted_from`: the out-of-sample check).
For each score and criterion (criteria averaged over seeds per layer): Spearman ρ over the
scored layers, a 95% percentile bootstrap interval (scipy.stats.bootstrap over layers; in
each resample the seeds of every drawn layer are drawn again), and a two-sided permutation
p (scipy.stats.permutation_test: exact up to EXACT_P_MAX_N layers, else Monte Carlo).
Higher score = better, so a predictive score has ρ < 0 against val_loss and ρ > 0 against
the recoveries. Also per score: its argmax layer and how many of its top 3 are among the
3 lowest-loss layers. Proposed weights w_p = -ρ(z_p, val_loss) (in-sample: fit and judged
on the same layers, hence optimistic; `sweep.fitted_from` judges them elsewhere).

Layer 0, the embedding, is stiffness's reference and has no score: it is trained and
measured, and left out of every ρ. Locate's report is workdir/locate/report.json; if it
is missing or does not cover a swept layer ≥ 1, locate runs again over the union of its
candidates and those layers (z-scores and ℓ* are then over that set).
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np
from scipy import stats

from dihal_jax import reports
from dihal_jax.errors import UserInputError
from dihal_jax.geometry import locate
from dihal_jax.overrides import overridden

PROXIES = locate.PROXIES
PAPER_PROXIES = ("curvature", "stiffness", "erank")
EXACT_P_MAX_N = 8  # exact permutation p up to 8! = 40,320 orderings, Monte Carlo above
MONTE_CARLO_RESAMPLES = 9999
BOOTSTRAP_RESAMPLES = 2000
TOP = 3  # the top-k overlap of score and loss
# Streams folded into the seed key: the diagnostics' noise / sampler draws of every run
# (fixed: the same noised windows for every layer and seed), and the statistics' RNG.
DIAGNOSTICS_STREAM = 3
STATISTICS_SEED = 20


def parse_layers(spec: str) -> list[int]:
  """`--layers` "0,1,2" or "1-3,5" -> sorted unique layer numbers."""
  layers = []
  try:
    for part in str(spec).split(","):
      lo, _, hi = part.strip().partition("-")
      layers += list(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise UserInputError(f"--layers={spec!r}: expected layer numbers like '0,1,2' or "
                         "'1-5'") from None
  if not layers:
    raise UserInputError(f"--layers={spec!r}: no layers")
  return sorted(set(layers))


# --- statistics ---------------------------------------------------------------------------

def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Spearman ρ with averaged ties (scipy.stats.spearmanr); None when n < 2 or either side
  is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) != len(y):
    raise ValueError(f"lengths differ: {len(x)} vs {len(y)}")
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(stats.spearmanr(x, y).statistic)


def permutation_p(x: Sequence[float], y: Sequence[float], *, seed: int = STATISTICS_SEED
                  ) -> float | None:
  """Two-sided permutation p of Spearman ρ (scipy.stats.permutation_test over pairings):
  every ordering of y for n ≤ EXACT_P_MAX_N, else MONTE_CARLO_RESAMPLES seeded ones."""
  if spearman(x, y) is None:
    return None
  rx, ry = stats.rankdata(x), stats.rankdata(y)
  result = stats.permutation_test(
      (ry,), lambda r, axis: stats.pearsonr(rx, r, axis=axis).statistic, vectorized=True,
      permutation_type="pairings", alternative="two-sided",
      n_resamples=np.inf if len(rx) <= EXACT_P_MAX_N else MONTE_CARLO_RESAMPLES,
      rng=np.random.default_rng(seed))
  return float(result.pvalue)


def bootstrap_ci(score: np.ndarray, per_seed: np.ndarray, *, seed: int = STATISTICS_SEED,
                 level: float = 0.95) -> list[float] | None:
  """Percentile interval of ρ(score, per-layer mean of per_seed [L, S]): scipy.stats.bootstrap
  resamples the layers; each resample draws every drawn layer's S seeds again (with
  replacement) before averaging. None when ρ is undefined."""
  score, per_seed = np.asarray(score, np.float64), np.asarray(per_seed, np.float64)
  if spearman(score, per_seed.mean(1)) is None:
    return None
  seeds = np.random.default_rng(seed + 1)
  count = per_seed.shape[1]

  def statistic(index):
    index = index.astype(int)
    drawn = per_seed[index[:, None], seeds.integers(0, count, (len(index), count))].mean(1)
    rho = spearman(score[index], drawn)
    return np.nan if rho is None else rho

  with warnings.catch_warnings():  # a degenerate distribution (every resample ρ = ±1) is fine
    warnings.simplefilter("ignore", stats.DegenerateDataWarning)
    result = stats.bootstrap((np.arange(len(score)),), statistic, vectorized=False,
                             n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             confidence_level=level, rng=np.random.default_rng(seed))
  # Percentiles of the resamples where ρ is defined (a resample of few layers can draw one
  # layer only, or a constant column); scipy's own interval would be NaN then.
  tail = 50 * (1 - level)
  low, high = np.nanpercentile(result.bootstrap_distribution, [tail, 100 - tail])
  return [float(low), float(high)]


def rho_entry(score: np.ndarray, per_seed: np.ndarray) -> dict:
  """{"rho", "ci", "p"} of a score against one criterion (per_seed [L, S])."""
  mean = np.asarray(per_seed, np.float64).mean(1)
  return {"rho": spearman(score, mean), "ci": bootstrap_ci(score, per_seed),
          "p": permutation_p(score, mean)}


# --- scores and criteria ------------------------------------------------------------------

def score_forms(weights: dict, fitted_elsewhere: dict | None = None) -> dict[str, dict]:
  """{name: {proxy: weight}}: the configured weights, the paper's, each proxy alone, every
  sign pattern of the paper's proxies, and (given) weights fitted on another sweep."""
  forms = {"weights": dict(weights), "paper": dict(locate.PAPER_WEIGHTS)}
  forms.update({name: {name: 1.0} for name in PROXIES})
  for signs in itertools.product((1.0, -1.0), repeat=len(PAPER_PROXIES)):
    name = "".join(f"{'+' if s > 0 else '-'}{p}" for s, p in zip(signs, PAPER_PROXIES))
    forms[name] = dict(zip(PAPER_PROXIES, signs))
  if fitted_elsewhere is not None:
    forms["fitted_elsewhere"] = dict(fitted_elsewhere)
  return forms


def form_score(row: dict, weights: dict) -> float:
  return float(sum(w * row[f"z_{name}"] for name, w in weights.items()))


def criteria_names(noise_levels: Sequence[float]) -> list[str]:
  return (["val_loss"] + [f"recovery_t{t:g}" for t in noise_levels]
          + [f"joint_recovery_t{noise_levels[0]:g}"])


def correlate(rows: list[dict], forms: dict[str, dict], criteria: Sequence[str]) -> dict:
  """ρ table {form: {criterion: {rho, ci, p}}}, each form's picks, and the proposed weights.

  `rows`: per layer {"layer", "score", z_<proxy>..., "seeds": [{criterion: value}]}; rows
  whose score is None (layer 0) are left out.
  """
  scored = [r for r in rows if r.get("score") is not None]
  per_seed = {c: np.array([[s[c] for s in r["seeds"]] for r in scored]) for c in criteria}
  loss = per_seed["val_loss"].mean(1)
  layers = np.array([r["layer"] for r in scored])
  lowest = set(layers[np.argsort(loss, kind="stable")[:TOP]].tolist())
  proposed = {}
  for name in PROXIES:
    rho = spearman([r[f"z_{name}"] for r in scored], loss)
    proposed[name] = 0.0 if rho is None else -rho
  forms = dict(forms, proposed_in_sample=proposed)
  table, picks = {}, {}
  for name, weights in forms.items():
    score = np.array([form_score(r, weights) for r in scored])
    table[name] = {c: rho_entry(score, per_seed[c]) for c in criteria}
    top = layers[np.argsort(-score, kind="stable")[:TOP]].tolist()
    picks[name] = {"argmax_layer": int(top[0]) if top else None,
                   "equals_argmin_loss": bool(top and top[0] == layers[np.argmin(loss)]),
                   f"top{TOP}": top, f"top{TOP}_overlap": len(lowest & set(top))}
  return {"n": len(scored), "layers": layers.tolist(), "rho": table, "picks": picks,
          "forms": forms, "proposed_weights": proposed}


def verdict(report: dict) -> str:
  """One paragraph: do `weights` and `paper` predict the loss, and what the data propose."""
  rho, n = report["rho"], report["n"]
  parts = []
  for name in ("weights", "paper", "fitted_elsewhere"):
    if name not in rho:
      continue
    e = rho[name]["val_loss"]
    if e["rho"] is None:
      parts.append(f"{name}: ρ undefined.")
      continue
    predictive = e["rho"] < 0 and e["ci"] is not None and e["ci"][1] < 0 and e["p"] < 0.05
    parts.append(f"score `{name}`: ρ(score, val_loss) = {e['rho']:+.2f} "
                 f"[{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}], p = {e['p']:.3g} over {n} layers "
                 f"({'predicts the loss' if predictive else 'does not predict the loss'}).")
  defined = [k for k in rho if rho[k]["val_loss"]["rho"] is not None]
  if defined:
    best = max(defined, key=lambda k: abs(rho[k]["val_loss"]["rho"]))
    e = rho[best]["val_loss"]
    parts.append(f"Strongest |ρ| against val_loss: `{best}` ({e['rho']:+.2f}, p = "
                 f"{e['p']:.3g}; chosen after seeing the losses among {len(rho)} forms).")
  parts.append(f"Lowest loss at layer {report['argmin_loss_layer']}; locate selected "
               f"{report['selected_layer']}.")
  return " ".join(parts)


# --- the runs -----------------------------------------------------------------------------

def ensure_locate(config: ml_collections.ConfigDict, workdir: Path, layers: Sequence[int],
                  num_layers: int, *, progress: bool = True) -> tuple[dict, bool]:
  """(locate report covering every swept layer ≥ 1, whether locate ran now)."""
  path = workdir / "locate" / "report.json"
  needed = {l for l in layers if l >= 1}
  report = json.loads(path.read_text()) if path.is_file() else None
  if report is not None and needed <= {r["layer"] for r in report["layers"]}:
    return report, False
  base = (report["candidates"] if report is not None
          else locate.candidate_layers(config.locate.layers, num_layers))
  cfg = config
  if not needed <= set(base):
    spec = ",".join(str(l) for l in sorted(set(base) | needed))
    print(f"sweep: running locate with locate.layers={spec} (to cover layers "
          f"{sorted(needed)})")
    cfg = overridden(config, {"locate.layers": spec})
  return locate.locate_into(cfg, workdir / "locate", progress=progress), True


def _val_loss(metrics_path: Path) -> tuple[float, list[int]]:
  """(mean of the last two validation losses, or the last one; their steps)."""
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  val = [r for r in rows if "val_loss" in r][-2:]
  if not val:
    raise UserInputError(f"{metrics_path}: no validation row (train.val_every > train.steps?)")
  return float(np.mean([r["val_loss"] for r in val])), [int(r["step"]) for r in val]


def protocol_steps(config: ml_collections.ConfigDict) -> int:
  """train.steps of the sweep's protocol: sweep.epochs passes over the cached train windows."""
  t = config.train
  return max(1, int(round(config.sweep.epochs * (t.cache_windows // t.batch_size))))


def check(config: ml_collections.ConfigDict) -> int:
  """The sweep's settings, before anything loads (settings.check): the protocol's steps."""
  s, t = config.sweep, config.train
  if s.epochs <= 0 or s.seeds < 1 or s.eval_windows < 1:
    raise UserInputError(f"--config.sweep: epochs={s.epochs}, seeds={s.seeds}, eval_windows="
                         f"{s.eval_windows}: expected > 0, >= 1 and >= 1")
  if s.eval_windows > t.val_windows:
    raise UserInputError(f"--config.sweep.eval_windows={s.eval_windows}: more than the "
                         f"train.val_windows={t.val_windows} cached validation windows")
  if not s.noise_levels or not all(0 < float(x) <= 1 for x in s.noise_levels):
    raise UserInputError(f"--config.sweep.noise_levels={tuple(s.noise_levels)}: expected "
                         "levels in (0, 1]")
  steps = protocol_steps(config)
  if t.warmup_steps >= steps:
    raise UserInputError(f"--config.train.warmup_steps={t.warmup_steps}: not below the "
                         f"protocol's {steps} steps (sweep.epochs x cache_windows / batch_size)")
  fitted_weights(s.fitted_from)
  return steps


class Probe:
  """What every run is measured with: the backbone's readouts, one current-token head per
  layer (fit on that layer's train cache, shared by its seeds) and the evaluation windows."""

  def __init__(self, config: ml_collections.ConfigDict, backbone, separator: int, mesh):
    from dihal_jax.hybrid.sample import readout_config
    self.config, self.backbone, self.separator, self.mesh = config, backbone, separator, mesh
    self.readout_cfg = readout_config(config)
    self.layers: dict[int, tuple] = {}

  def layer(self, bridge, validation_cache: str):
    """(readout, head, eval tokens, eval states, joint oracle match) of the bridge's layer."""
    from dihal_jax.eval import metrics
    from dihal_jax.hybrid.readout import Readout
    from dihal_jax.hybrid.sample import current_token_head

    l = bridge.layer
    if l not in self.layers:
      n = self.config.sweep.eval_windows
      tokens = np.load(Path(validation_cache) / "tokens.npy")[:n]
      states = np.asarray(np.load(Path(validation_cache) / f"layer_{l}.npy",
                                  mmap_mode="r")[:n])
      reader = Readout(self.backbone, l, self.separator)
      head = current_token_head(bridge, self.backbone.cfg.vocab_size)
      oracle = metrics.token_accuracy(np.asarray(self.joint(reader, head, states))[:, 1:],
                                      tokens[:, 1:])
      self.layers = {l: (reader, head, tokens, states, oracle)}  # one layer held at a time
    return self.layers[l]

  def joint(self, reader, head, states):
    return reader.joint(states, head, jax.random.key(0), self.readout_cfg, temperature=0.0)

  def measure(self, bridge, validation_cache: str) -> dict:
    """The current-token head's recovery at every noise level; the joint readout's at the
    first (it runs the upper layers over the whole vocabulary: the costly read)."""
    from dihal_jax.eval.diagnostics import bridge_diagnostics
    reader, head, tokens, states, oracle = self.layer(bridge, validation_cache)
    first, *rest = self.config.sweep.noise_levels
    key = jax.random.fold_in(jax.random.key(self.config.seed), DIAGNOSTICS_STREAM)
    out = bridge_diagnostics(bridge, tokens, states, {
        "recovery": head, "joint_recovery": lambda h: self.joint(reader, head, h)},
        (first,), jax.random.fold_in(key, 0))
    if rest:
      out.update(bridge_diagnostics(bridge, tokens, states, {"recovery": head}, tuple(rest),
                                    jax.random.fold_in(key, 1)))
    return {**out, "joint_oracle": oracle}


def run_one(config: ml_collections.ConfigDict, run_dir: Path, probe: Probe, *,
            progress: bool) -> dict:
  """Train one (layer, seed) run and measure it; criteria.json makes a finished run free."""
  from dihal_jax.bridge import train
  from dihal_jax.bridge.training_loop import TrainingInterrupted
  from dihal_jax.hybrid.bridge_sampler import load_bridge

  path = run_dir / "criteria.json"
  if path.is_file():
    return json.loads(path.read_text())
  run = train.run_train(config, run_dir, progress=progress)
  if run["interrupted"]:
    raise TrainingInterrupted(f"the bridge of {run_dir}")
  val_loss, val_steps = _val_loss(run_dir / "metrics.jsonl")
  tick = time.perf_counter()
  measured = probe.measure(load_bridge(run_dir, probe.mesh), run["cache"]["validation"])
  criteria = {"seed": int(config.seed), "val_loss": val_loss, "val_steps": val_steps,
              "train_loss": run["final"]["loss"] if run["final"] else None,
              "steps": run["steps"], "train_s": run["timings"]["total_s"],
              "measure_s": time.perf_counter() - tick, **measured}
  reports.write_json(path, criteria)
  return criteria


def layer_row(layer: int, geometry: dict, runs: list[dict], criteria: Sequence[str]) -> dict:
  """The contract's per-layer row: score, score_paper, criteria means (val_loss mean and sd),
  the proxies, every seed's values."""
  row = {"layer": layer, "score": geometry.get("score"),
         "score_paper": (form_score(geometry, locate.PAPER_WEIGHTS)
                         if geometry.get("score") is not None else None)}
  values = {c: np.array([r[c] for r in runs], np.float64) for c in criteria}
  row["val_loss_mean"] = float(values["val_loss"].mean())
  row["val_loss_sd"] = float(values["val_loss"].std(ddof=1)) if len(runs) > 1 else 0.0
  for c in criteria[1:]:
    row[c] = float(values[c].mean())
    row[f"{c}_sd"] = float(values[c].std(ddof=1)) if len(runs) > 1 else 0.0
  row["joint_oracle"] = runs[0]["joint_oracle"]
  for name in PROXIES + tuple(f"{p}_raw" for p in PROXIES) + tuple(f"z_{p}" for p in PROXIES):
    row[name] = geometry.get(name)
  row["seeds"] = runs
  return row


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path, layers: list[int], *,
              progress: bool = True) -> dict:
  """`dihal sweep`: every (layer, seed) run, then the ρ table; writes report.md.

  Raises `bridge.training_loop.TrainingInterrupted` when SIGTERM stopped a run (it saved;
  the same command resumes), `TrainingStopped` on a non-finite loss.
  """
  from dihal_jax.backbone import checkpoint
  from dihal_jax.data.dataset import Data
  from dihal_jax.parallel.sharding import mesh_and_rules

  workdir, t0 = Path(workdir), time.perf_counter()
  layers = sorted(set(int(l) for l in layers))
  backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  num_layers = backbone.cfg.num_layers
  bad = [l for l in layers if not 0 <= l < num_layers]
  if not layers or bad:
    raise UserInputError(f"--layers={','.join(map(str, layers))}: layer "
                         f"{bad[0] if bad else '(none)'} outside the trainable 0..{num_layers - 1}")
  steps = check(config)
  fitted = fitted_weights(config.sweep.fitted_from)
  located, reran = ensure_locate(config, workdir, layers, num_layers, progress=progress)
  by_layer = {r["layer"]: r for r in located["layers"]}
  probe = Probe(config, backbone, Data.from_config(config, workdir).separator,
                mesh_and_rules(config)[0])
  criteria = criteria_names(config.sweep.noise_levels)

  rows = []
  for i, layer in enumerate(layers):
    runs = []
    for s in range(config.sweep.seeds):
      if progress:
        print(f"sweep: layer {layer} ({i + 1}/{len(layers)}), seed {s + 1}/{config.sweep.seeds}")
      cfg = overridden(config, {"bridge.layer": str(layer), "seed": config.seed + s,
                                "train.steps": steps})
      runs.append(run_one(cfg, workdir / f"layer_{layer}" / f"seed_{s}", probe,
                          progress=progress))
    rows.append(layer_row(layer, by_layer.get(layer, {}), runs, criteria))

  correlation = correlate(rows, score_forms(located["weights"], fitted), criteria)
  loss_by_layer = {r["layer"]: r["val_loss_mean"] for r in rows}
  report = {
      "layers": rows, "rho": correlation["rho"], "picks": correlation["picks"],
      "forms": correlation["forms"], "proposed_weights": correlation["proposed_weights"],
      "n": correlation["n"], "scored_layers": correlation["layers"],
      "selected_layer": located["selected_layer"],
      "argmin_loss_layer": min(loss_by_layer, key=loss_by_layer.get),
      "criteria": criteria,
      "protocol": {"steps": steps, "epochs": config.sweep.epochs, "seeds": config.sweep.seeds,
                   "cache_windows": config.train.cache_windows,
                   "batch_size": config.train.batch_size, "eval_windows": config.sweep.eval_windows,
                   "noise_levels": list(config.sweep.noise_levels),
                   "sampler_steps": config.bridge.diffusion.steps, "joint_beta": config.sample.beta,
                   "data": config.data.dir, "train": config.train.to_dict(),
                   "bridge": {k: v for k, v in config.bridge.to_dict().items() if k != "layer"}},
      "locate": {"candidates": located["candidates"], "num_tokens": located["num_tokens"],
                 "score_form": located.get("score_form", "weights"),
                 "weights": located["weights"], "reran": reran},
      "fitted_from": config.sweep.fitted_from or None,
      "timings": {"total_s": time.perf_counter() - t0}}
  report["verdict"] = verdict(report)
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  return report


def fitted_weights(path: str) -> dict | None:
  """The proposed weights of another sweep's report.json (sweep.fitted_from), or None."""
  if not path:
    return None
  try:
    return dict(json.loads(Path(path).read_text())["proposed_weights"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserInputError(f"sweep.fitted_from={path!r}: not a sweep report.json with "
                         f"proposed_weights ({type(e).__name__}: {e})") from None


# --- outputs ------------------------------------------------------------------------------

def plot(report: dict, path):
  """Left: val loss per layer (mean ± sd over seeds) with the `weights` and `paper` scores
  (min-max scaled, twin axis). Right: ρ against val_loss with its interval, per form."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["layers"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
  x = [r["layer"] for r in rows]
  ax.errorbar(x, [r["val_loss_mean"] for r in rows], yerr=[r["val_loss_sd"] for r in rows],
              fmt="o-", color="tab:blue", capsize=3, label="val loss (mean ± sd)")
  ax.set_xlabel("layer")
  ax.set_ylabel("validation loss (normalized units)", color="tab:blue")
  ax.grid(alpha=0.3)
  twin = ax.twinx()
  scored = [r for r in rows if r["score"] is not None]
  for key, style, color, label in (("score", "s--", "tab:orange", "score (weights)"),
                                   ("score_paper", "^:", "tab:purple", "score (paper)")):
    s = np.array([r[key] for r in scored])
    if len(s):
      spread = np.ptp(s)
      twin.plot([r["layer"] for r in scored],
                (s - s.min()) / spread if spread > 0 else np.full_like(s, 0.5), style,
                color=color, label=label)
  twin.set_ylabel("score, min-max scaled (higher = better)")
  twin.set_ylim(-0.05, 1.05)
  ax.axvline(report["selected_layer"], color="tab:red", ls="--", lw=1, label="locate ℓ*")
  ax.axvline(report["argmin_loss_layer"], color="tab:green", ls=":", lw=1.5,
             label="lowest loss")
  handles, labels = ax.get_legend_handles_labels()
  h2, l2 = twin.get_legend_handles_labels()
  ax.legend(handles + h2, labels + l2, fontsize=7, loc="best")
  ax.set_title(f"{len(rows)} layers × {report['protocol']['seeds']} seeds")

  names = list(report["rho"])
  entries = [report["rho"][n]["val_loss"] for n in names]
  y = np.arange(len(names))
  rho = np.array([np.nan if e["rho"] is None else e["rho"] for e in entries])
  lo = np.array([np.nan if e["ci"] is None else e["ci"][0] for e in entries])
  hi = np.array([np.nan if e["ci"] is None else e["ci"][1] for e in entries])
  bx.errorbar(rho, y, xerr=[rho - lo, hi - rho], fmt="o", capsize=3)
  bx.axvline(0, color="gray", lw=1)
  bx.set_yticks(y, names, fontsize=7)
  bx.invert_yaxis()
  bx.set_xlim(-1.05, 1.05)
  bx.set_xlabel("Spearman ρ(score, val loss), 95% bootstrap CI (predictive: < 0)")
  bx.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  reports.save_figure(fig, path)


def _rho_text(e: dict) -> str:
  if e["rho"] is None:
    return "n/a"
  ci = "" if e["ci"] is None else f" [{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}]"
  return f"{e['rho']:+.2f}{ci} p={e['p']:.2g}"


def summary(report: dict) -> str:
  """Markdown: the per-layer table, the ρ table (every form × criterion), picks, verdict."""
  criteria = report["criteria"]

  def cell(v, fmt="{:.4f}"):
    return "–" if v is None else fmt.format(v)

  layer_rows = [[r["layer"], cell(r["score"], "{:+.2f}"), cell(r["score_paper"], "{:+.2f}"),
                 f"{r['val_loss_mean']:.4f} ± {r['val_loss_sd']:.4f}",
                 *(f"{r[c]:.3f} ± {r[c + '_sd']:.3f}" for c in criteria[1:]),
                 f"{r['joint_oracle']:.3f}"] for r in report["layers"]]
  header = ["layer", "score", "score_paper", "val_loss", *criteria[1:], "joint oracle"]
  rho_rows = [[name, *(_rho_text(report["rho"][name][c]) for c in criteria),
               report["picks"][name]["argmax_layer"],
               report["picks"][name][f"top{TOP}_overlap"]] for name in report["rho"]]
  p = report["protocol"]
  lines = [
      f"Protocol: {p['steps']} steps ({p['epochs']} epoch(s) of {p['cache_windows']} cached "
      f"windows, batch {p['batch_size']}), {p['seeds']} seeds per layer, data {p['data']}; "
      f"recoveries on {p['eval_windows']} validation windows, sampler {p['sampler_steps']} "
      f"steps.", "",
      reports.markdown_table(header, layer_rows), "",
      f"Spearman ρ over the {report['n']} scored layers (criteria averaged over seeds), 95% "
      "bootstrap CI (layers and seeds resampled), permutation p. Predictive: ρ < 0 against "
      f"val_loss, > 0 against the recoveries. top{TOP}: how many of the form's top {TOP} "
      f"are among the {TOP} lowest-loss layers.", "",
      reports.markdown_table(["score", *criteria, "argmax", f"top{TOP}"], rho_rows), "",
      "proposed weights (-ρ(z_p, val_loss), in-sample): "
      + ", ".join(f"{k} {v:+.3f}" for k, v in report["proposed_weights"].items()),
      f"lowest val loss: layer {report['argmin_loss_layer']}; locate ℓ* = "
      f"{report['selected_layer']}", "", report["verdict"]]
  return "\n".join(lines)
