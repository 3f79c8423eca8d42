"""`dihal sweep`: the fixed bridge protocol at each listed layer, against the geometry score.

What: for every requested layer l, train the bridge with the config's `train.*`
and `bridge.*` settings (only `bridge.layer` changes) into `workdir/layer_<l>`,
then ask whether locate's score (geometry/locate.py) ranks the layers the way
their validation losses do. Reported:

  * per layer: the validation loss, locate's score and every proxy;
  * ρ(score, val_loss), Spearman across the swept layers. The score means
    "higher = better", so a score that predicts the loss has ρ < 0 (ideal -1);
  * each proxy's own ρ against the loss, the standardized proxies (the ones
    the score weights; ρ of z_p equals ρ of p, as z-scoring is increasing and
    affine) and the *_raw ones (reported by locate, not scored);
  * proposed weights w_p = -ρ_p: each proxy signed so that a higher score
    means a lower loss, and the ρ that score, Σ_p w_p z_p on locate's z-scores,
    reaches. That ρ is in-sample (fit and judged on the same layers), an
    optimistic number, not a validated one;
  * the lowest-loss layer next to locate's selected layer ℓ*;
  * for n ≤ 8 layers, the exact two-sided permutation p of each ρ (with n ≤ 4
    layers no ρ can reach p < 0.05: the smallest possible p is 2/n!).

Why: the score weights (docs/design.md, "Geometry proxies and the score") are a
prior. The sweep is the experiment that checks them, and says so plainly when
they do not predict the loss.

Validation loss of a layer: the EMA model's loss on the fixed validation batch
(bridge/train.py), read from `layer_<l>/metrics.jsonl`. It is the mean of the
last two validation rows when there are at least two (less noise from where
the EMA trajectory happens to end), else the last one. Caveat: each layer's
states are normalized on their own (per-channel standardized by default), so
losses at different layers live in different spaces. They compare only as
"how predictable is the standardized state under the same protocol", which is
what the fixed protocol measures, not as distances in one common space.

Layers: a swept layer must be trainable (0..L-1). Layer 0, the embedding, is
locate's reference and has no score: it is trained and shown, but left out of
every ρ. Locate's report is `workdir/locate/report.json` (as `dihal train`
uses it). If it is missing, or does not cover a swept layer ≥ 1, locate runs
again with `locate.layers` extended to those layers and the report is
rewritten (its z-scores and ℓ* are then over the extended candidate set).
Each layer's run is resumable: a finished layer costs only its setup on a
rerun; a run from another config is refused by its checkpointer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
from scipy import stats

from dihal_jax import reports
from dihal_jax.errors import UserInputError
from dihal_jax.geometry import locate
from dihal_jax.overrides import overridden

PROXIES = locate.PROXIES  # scored: the score is Σ_p w_p z_p over these
RAW_PROXIES = tuple(f"{p}_raw" for p in PROXIES)  # reported by locate, not scored
EXACT_P_MAX_N = 8  # exact permutation p-values up to 8! = 40320 permutations


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


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Spearman ρ with averaged ties (scipy.stats.spearmanr); None when n < 2 or either side
  is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) != len(y):
    raise ValueError(f"lengths differ: {len(x)} vs {len(y)}")
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(stats.spearmanr(x, y).statistic)


def permutation_p(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Exact two-sided p of Spearman ρ over all n! orderings of y (n ≤ 8), else None
  (scipy.stats.permutation_test, every pairing enumerated)."""
  if spearman(x, y) is None or len(x) > EXACT_P_MAX_N:
    return None
  rx, ry = stats.rankdata(x), stats.rankdata(y)
  result = stats.permutation_test(
      (ry,), lambda r, axis: stats.pearsonr(rx, r, axis=axis).statistic, vectorized=True,
      permutation_type="pairings", alternative="two-sided", n_resamples=np.inf)
  return float(result.pvalue)


def correlate(rows: list[dict], weights: dict[str, float]) -> dict:
  """ρ of the score and of each proxy against `val_loss`, and the proposed weights.

  `rows`: per layer {"layer", "val_loss", "score", <proxy>, <proxy>_raw, z_<proxy>};
  rows whose score is None (layer 0) are left out. `weights`: the score's
  weights (locate.weights), for the record.
  """
  scored = [r for r in rows if r.get("score") is not None]
  loss = [r["val_loss"] for r in scored]

  def rho_of(values):
    return {"rho": spearman(values, loss), "p": permutation_p(values, loss)}

  per_proxy = {name: rho_of([r[name] for r in scored])
               for name in PROXIES + RAW_PROXIES if all(r.get(name) is not None for r in scored)}
  proposed = {name: (0.0 if per_proxy.get(name, {}).get("rho") is None
                     else -per_proxy[name]["rho"]) for name in PROXIES}
  proposed_score = [sum(w * r[f"z_{name}"] for name, w in proposed.items()) for r in scored]
  return {"n": len(scored), "layers": [r["layer"] for r in scored], "weights": dict(weights),
          "score": rho_of([r["score"] for r in scored]), "proxies": per_proxy,
          "proposed_weights": proposed, "proposed": rho_of(proposed_score)}


def verdict(report: dict) -> str:
  """One paragraph: does the default score predict the loss, and what the data propose."""
  c = report["correlation"]
  n, rho = c["n"], c["score"]["rho"]
  best, selected = report["best_layer"], report["selected_layer"]
  pick = (f"Lowest validation loss at layer {best}; locate selected layer {selected}"
          f"{' (agree)' if best == selected else ' (disagree)'}.")
  if rho is None:
    return (f"The score's ρ is undefined ({n} scored layer(s), or a constant column): "
            f"no verdict. {pick}")
  p = c["score"]["p"]
  p_text = f", exact p = {p:.3g}" if p is not None else ""
  if rho < 0:
    head = (f"The default weights rank layers in the loss's direction: ρ(score, val_loss) = "
            f"{rho:+.3f} over {n} layers (ideal -1{p_text}).")
  else:
    head = (f"The default weights do NOT predict the validation loss: ρ(score, val_loss) = "
            f"{rho:+.3f} over {n} layers (a predictive score has ρ < 0{p_text}).")
  w = ", ".join(f"{k} {v:+.2f}" for k, v in c["proposed_weights"].items())
  prho = c["proposed"]["rho"]
  proposal = (f"Proposed weights from these data (w_p = -ρ_p): {w}; ρ = "
              f"{'undefined' if prho is None else f'{prho:+.3f}'} in-sample (fit and "
              "judged on the same layers, so optimistic; confirm on other layers or models).")
  small = (f" With only {n} layers no ρ can reach p < 0.05 (smallest exact p = 2/{n}!)."
           if n <= 4 else "")
  return f"{head} {proposal}{small} {pick}"


def _val_loss(metrics_path: Path) -> tuple[float, list[int]]:
  """(mean of the last two validation losses, or the last one; their steps)."""
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  val = [r for r in rows if "val_loss" in r][-2:]
  if not val:
    raise UserInputError(f"{metrics_path}: no validation row (train.val_every > train.steps?)")
  return float(np.mean([r["val_loss"] for r in val])), [int(r["step"]) for r in val]


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


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path, layers: list[int], *,
              progress: bool = True) -> dict:
  """`dihal sweep`: train at each layer, correlate the validation losses with the score.

  Raises `bridge.training_loop.TrainingStopped` if a layer's loss goes non-finite
  (the finished layers stay cached; a rerun resumes).
  """
  from dihal_jax.backbone import checkpoint
  from dihal_jax.bridge import train

  workdir = Path(workdir)
  layers = sorted(set(int(l) for l in layers))
  num_layers = checkpoint.backbone_config(config).num_layers
  bad = [l for l in layers if not 0 <= l < num_layers]
  if not layers or bad:
    raise UserInputError(f"--layers={','.join(map(str, layers))}: layer "
                         f"{bad[0] if bad else '(none)'} outside the trainable 0..{num_layers - 1}")
  located, reran = ensure_locate(config, workdir, layers, num_layers, progress=progress)
  by_layer = {r["layer"]: r for r in located["layers"]}

  as_config = int if isinstance(config.bridge.layer, int) else str  # keep the field's type
  rows = []
  for layer in layers:
    if progress:
      print(f"sweep: layer {layer} ({layers.index(layer) + 1}/{len(layers)})")
    run = train.run_train(overridden(config, {"bridge.layer": as_config(layer)}),
                          workdir / f"layer_{layer}", progress=progress)
    val_loss, val_steps = _val_loss(workdir / f"layer_{layer}" / "metrics.jsonl")
    geometry = by_layer.get(layer, {})
    row = {"layer": layer, "val_loss": val_loss, "val_steps": val_steps,
           "train_loss": run["final"]["loss"] if run["final"] else None, "steps": run["steps"],
           "train_s": run["timings"]["total_s"],
           "score": geometry.get("score")}
    for name in PROXIES + RAW_PROXIES + tuple(f"z_{p}" for p in PROXIES):
      row[name] = geometry.get(name)
    rows.append(row)

  best = min(rows, key=lambda r: r["val_loss"])["layer"]
  report = {"layers": rows, "selected_layer": located["selected_layer"], "best_layer": best,
            "correlation": correlate(rows, located["weights"]),
            "locate": {"candidates": located["candidates"], "num_tokens": located["num_tokens"],
                       "weights": located["weights"], "reran": reran,
                       "report": str(workdir / "locate" / "report.json")},
            "protocol": {"train": config.train.to_dict(),
                         "bridge": {k: v for k, v in config.bridge.to_dict().items()
                                    if k != "layer"}},
            "val_loss_definition": "EMA loss on the fixed validation batch; mean of the last two "
                                   "validation rows (the last one if only one)"}
  report["verdict"] = verdict(report)
  return report


def plot(report: dict, path):
  """Validation loss per layer and the min-max scaled score (twin axis); ℓ* and the best marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["layers"]
  fig, ax = plt.subplots(figsize=(7, 3.8))
  ax.plot([r["layer"] for r in rows], [r["val_loss"] for r in rows], "o-", color="tab:blue",
          label="val loss")
  ax.set_xlabel("layer")
  ax.set_ylabel("validation loss", color="tab:blue")
  ax.grid(alpha=0.3)
  scored = [r for r in rows if r["score"] is not None]
  twin = ax.twinx()
  if scored:
    s = np.array([r["score"] for r in scored])
    spread = s.max() - s.min()
    scaled = (s - s.min()) / spread if spread > 0 else np.full_like(s, 0.5)
    twin.plot([r["layer"] for r in scored], scaled, "s--", color="tab:orange",
              label="score (min-max)")
  twin.set_ylabel("score, min-max scaled (higher = better)", color="tab:orange")
  twin.set_ylim(-0.05, 1.05)
  ax.axvline(report["selected_layer"], color="tab:red", ls="--", lw=1, label="locate ℓ*")
  ax.axvline(report["best_layer"], color="tab:green", ls=":", lw=1.5, label="lowest loss")
  rho = report["correlation"]["score"]["rho"]
  ax.set_title(f"Sweep: ρ(score, val loss) = {'n/a' if rho is None else f'{rho:+.2f}'} over "
               f"{report['correlation']['n']} layers (predictive: < 0)")
  handles = ax.get_legend_handles_labels()
  twin_handles = twin.get_legend_handles_labels()
  ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8, loc="best")
  fig.tight_layout()
  reports.save_figure(fig, path)


def summary(report: dict) -> str:
  """Markdown table (layer, score, val_loss, proxies), the ρ lines and the verdict."""

  def cell(v):
    return "–" if v is None else v

  header = ["layer", "score", "val_loss", *PROXIES]
  rows = [[r["layer"], cell(r["score"]), r["val_loss"], *(cell(r[p]) for p in PROXIES)]
          for r in report["layers"]]
  c = report["correlation"]

  def rho_text(entry):
    rho, p = entry["rho"], entry["p"]
    return ("n/a" if rho is None else f"{rho:+.3f}") + ("" if p is None else f" (p={p:.3g})")

  lines = [reports.markdown_table(header, rows), "",
           f"ρ(score, val_loss) = {rho_text(c['score'])} over layers {c['layers']} "
           "(score: higher = better, so predictive means ρ < 0)",
           "ρ(proxy, val_loss): " + ", ".join(f"{k} {rho_text(v)}"
                                              for k, v in c["proxies"].items()),
           "default weights: " + ", ".join(f"{k} {v:+g}" for k, v in c["weights"].items()),
           "proposed weights (-ρ_p): " + ", ".join(f"{k} {v:+.3f}"
                                                  for k, v in c["proposed_weights"].items())
           + f"; in-sample ρ = {rho_text(c['proposed'])}",
           f"lowest val loss: layer {report['best_layer']}; locate ℓ* = "
           f"{report['selected_layer']}", "", report["verdict"]]
  return "\n".join(lines)
