"""`dihal ablate`: which bridge knows language, at a matched budget and matched entropy.

Rows (ROWS): the same interface layer, normalization, steps, batch, windows, learning
rate and sampler; only the denoiser, its initialization and the token loss differ:
  unet_scratch                 the 1D UNet (bridge.unet), from scratch
  transformer_scratch          m blocks of the backbone's architecture, random init
  transformer_backbone         the same blocks copied from the backbone (ℓ+1..ℓ+m)
  transformer_backbone_ce      ... plus the auxiliary token loss (train.token_ce)
Each bridge trains into workdir/NAME (resumable: an interrupted ablation restarts where
it stopped; finished rows are reused). `ablate.rows` picks a subset (e.g. the winner
alone at another layer, for the ℓ* vs ℓ = 0 comparison).

Every row samples eval.num unconditional windows once (sample.steps) and reads them three
ways: `joint` at the temperature that brings its unigram entropy within ENTROPY_TOL nats of
real text's (bisection on T over the same states: the row's headline values), `joint` at
sample.temperature (untuned) and `identity`. Perplexity falls steeply as entropy falls,
so only the entropy-matched reads are compared. Judges: the backbone (self-judged gen
PPL), the Kneser–Ney n-gram judge, MAUVE against held-out test windows, 95% bootstrap
intervals. Oracle rows read the *true* states of the held-out windows with `joint` and
`identity`: a readout whose oracle does not return real text is not measuring the bridge.

SIGTERM during training saves the row's checkpoint and stops the ablation (returns
{"interrupted": NAME}). Writes workdir/report.json ({"rows": {NAME: {...}}, "winner", "real_text", "oracle",
"budget", ...}) and report.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.backbone import checkpoint
from dihal_jax.bridge.train import interface_layer, run_train
from dihal_jax.data.dataset import Data, cache_root
from dihal_jax.errors import UserInputError
from dihal_jax.eval import metrics
from dihal_jax.eval.diagnostics import bridge_diagnostics
from dihal_jax.eval.evaluate import evaluation_sets
from dihal_jax.eval.judges import Judges
from dihal_jax.hybrid.bridge_sampler import load_bridge
from dihal_jax.hybrid.readout import Readout
from dihal_jax.hybrid.sample import current_token_head, readout_config
from dihal_jax.overrides import overridden
from dihal_jax.parallel.sharding import mesh_and_rules

ROWS = {
    "unet_scratch": {"bridge.denoiser": "unet", "bridge.init": "scratch", "train.token_ce": 0.0},
    "transformer_scratch": {"bridge.denoiser": "transformer", "bridge.init": "scratch",
                            "train.token_ce": 0.0},
    "transformer_backbone": {"bridge.denoiser": "transformer", "bridge.init": "backbone",
                             "train.token_ce": 0.0},
    "transformer_backbone_ce": {"bridge.denoiser": "transformer", "bridge.init": "backbone",
                                "train.token_ce": None},  # None: the config's train.token_ce
}
ENTROPY_TOL = 0.1  # nats
T_RANGE = (0.05, 4.0)  # the bisection's bracket
T_ITERS = 12
JUDGED = ("gen_ppl", "gen_ppl_ci", "ngram_ppl", "ngram_ppl_ci", "mauve", "entropy", "entropy_ci",
          "distinct_2", "diversity")


def row_config(config: ml_collections.ConfigDict, overrides: dict,
               layer: int) -> ml_collections.ConfigDict:
  """config with one row's overrides at a fixed layer (a None value keeps the config's)."""
  changes = {path: value for path, value in overrides.items() if value is not None}
  return overridden(config, {"bridge.layer": str(layer), **changes})


def matched_temperature(read, target: float) -> tuple[float, np.ndarray, bool]:
  """(T, tokens, matched): bisection on T in T_RANGE for unigram entropy within ENTROPY_TOL
  of target (entropy rises with T); `read(T)` -> tokens. Unmatched: the closest end."""
  lo, hi = T_RANGE
  best = None
  for _ in range(T_ITERS):
    t = float(np.sqrt(lo * hi))  # geometric midpoint
    tokens = read(t)
    h = metrics.unigram_entropy(tokens[:, 1:])
    if best is None or abs(h - target) < abs(best[2] - target):
      best = (t, tokens, h)
    if abs(h - target) <= ENTROPY_TOL:
      return t, tokens, True
    lo, hi = (t, hi) if h < target else (lo, t)
  return best[0], best[1], False


def _judged(judges: Judges, tokens: np.ndarray, reference: np.ndarray) -> dict:
  row = judges.score(tokens, reference=reference)
  return {k: row[k] for k in JUDGED if k in row}


def run_ablation(config: ml_collections.ConfigDict, workdir: str | Path, *,
                 progress: bool = True) -> dict:
  workdir = Path(workdir)
  t0 = time.perf_counter()
  names = [r.strip() for r in config.ablate.rows.split(",") if r.strip()] or list(ROWS)
  unknown = [r for r in names if r not in ROWS]
  if unknown:
    raise UserInputError(f"--config.ablate.rows: unknown {unknown}; known: {', '.join(ROWS)}")
  chosen = {name: ROWS[name] for name in names}
  layer = interface_layer(config, workdir)
  timings = {}
  for name, overrides in chosen.items():
    tick = time.perf_counter()
    trained = run_train(row_config(config, overrides, layer), workdir / name, progress=progress)
    timings[f"train_{name}_s"] = time.perf_counter() - tick
    if trained["interrupted"]:  # SIGTERM: saved; the same command resumes
      return {"interrupted": name, "step": trained["steps"]}

  e, s = config.eval, config.sample
  data = Data.from_config(config, workdir)
  backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  judges = Judges.build(backbone, data.tokenizer, data.first_windows("train"),
                        order=e.ngram_order, encoder=e.encoder, cache=cache_root(config),
                        batch=s.batch, seed=config.seed)
  real, reference_windows = evaluation_sets(data, e.num)["test"]
  reference = judges.features(reference_windows)
  reader = Readout(backbone, layer, data.separator)
  cfg = readout_config(config)
  key = jax.random.key(config.seed)
  real_row = _judged(judges, real, reference)
  target = real_row["entropy"]
  real_h = np.asarray(reader.lower(real))
  mesh, _ = mesh_and_rules(config)

  rows, head, oracle = {}, None, {}
  for i, (name, overrides) in enumerate(tqdm(chosen.items(), desc="ablate: eval",
                                             disable=not progress)):
    tick = time.perf_counter()
    bridge = load_bridge(workdir / name, mesh)
    if head is None:  # the same layer and normalizer in every row: one head
      head = current_token_head(bridge, backbone.cfg.vocab_size)
      truth = {"joint": _joint_tokens(reader, real_h, head, key, cfg, s.batch),
               "identity": _with_separator(np.asarray(head(real_h)), real)}
      for read, tokens in truth.items():
        oracle[read] = dict(_judged(judges, tokens, reference),
                            token_accuracy=metrics.token_accuracy(tokens[:, 1:], real[:, 1:]))
        oracle[read]["gen_ppl_vs_real"] = oracle[read]["gen_ppl"] / real_row["gen_ppl"]
    k = jax.random.fold_in(key, i)
    template, known = reader.template(e.num, real.shape[1])
    states = np.concatenate([np.asarray(bridge.sample(jax.random.fold_in(k, j),
                                                      reader.lower(template[j:j + s.batch]),
                                                      known[j:j + s.batch], steps=s.steps))
                             for j in range(0, e.num, s.batch)])
    gen_z = np.asarray(bridge.norm.forward(jnp.asarray(states)))[:, 1:]
    real_z = np.asarray(bridge.norm.forward(jnp.asarray(real_h)))[:, 1:]
    scores = [reader.joint_scores(states[j:j + s.batch], head, cfg.beta)
              for j in range(0, e.num, s.batch)]  # sorted once, drawn at every temperature
    read = lambda t: np.concatenate([  # noqa: E731
        np.asarray(reader.draw(sc, jax.random.fold_in(jax.random.fold_in(k, 1), j), t,
                               cfg.top_p)) for j, sc in enumerate(scores)])
    temperature, matched_tokens, matched = matched_temperature(read, target)
    reads = {"joint_matched": _judged(judges, matched_tokens, reference),
             "joint_untuned": _judged(judges, read(cfg.temperature), reference),
             "identity": _judged(judges, _with_separator(np.asarray(head(states)), template),
                                 reference)}
    reads["joint_matched"].update(temperature=temperature, entropy_matched=matched)
    reads["joint_untuned"]["temperature"] = cfg.temperature
    train_cfg = row_config(config, overrides, layer)
    rows[name] = {
        "denoiser": bridge.kind, "init": train_cfg.bridge.init,
        "token_ce": float(train_cfg.train.token_ce), "tolerant_decoder": False,
        "readout": "joint", "params": bridge.params_count, "steps": bridge.step,
        "batch_size": train_cfg.train.batch_size, "lr": train_cfg.train.lr,
        **{k: v for k, v in reads["joint_matched"].items()},
        "spread_ratio": metrics.spread_ratio(gen_z, real_z),
        **bridge_diagnostics(bridge, real, real_h, head, tuple(e.noise_levels),
                             jax.random.fold_in(k, 2)),
        "reads": reads,
        "samples": [data.tokenizer.decode(r[1:].tolist()) for r in matched_tokens[:e.show]],
        "eval_s": time.perf_counter() - tick}

  winner = _winner(rows, target)
  report = {
      "rows": rows, "winner": winner, "real_text": real_row, "oracle": oracle,
      "layer": layer, "num": e.num, "length": int(real.shape[1]),
      "budget": {"steps": config.train.steps, "batch_size": config.train.batch_size,
                 "cache_windows": config.train.cache_windows, "lr": config.train.lr,
                 "sampler_steps": s.steps, "sampler": config.bridge.diffusion.sampler,
                 "eta": config.bridge.diffusion.eta},
      "readout": {"beta": cfg.beta, "top_p": cfg.top_p, "untuned_temperature": cfg.temperature,
                  "head_temperature": head.temperature, "entropy_tolerance": ENTROPY_TOL},
      "verdict": _verdict(rows, winner, real_row),
      "timings": dict(timings, total_s=time.perf_counter() - t0)}
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  return report


def _with_separator(tokens: np.ndarray, given: np.ndarray) -> np.ndarray:
  """The identity head's tokens with position 0 (the known separator) restored."""
  out = tokens.copy()
  out[:, 0] = given[:, 0]
  return out


def _joint_tokens(reader, states, head, key, cfg, batch) -> np.ndarray:
  return np.concatenate([np.asarray(reader.joint(states[j:j + batch], head,
                                                 jax.random.fold_in(key, j), cfg))
                         for j in range(0, len(states), batch)])


def _winner(rows: dict, target: float) -> str:
  """The lowest entropy-matched n-gram PPL among rows whose entropy is >= 0.9 x real's."""
  eligible = {n: r for n, r in rows.items() if r["entropy"] >= 0.9 * target} or rows
  return min(eligible, key=lambda n: eligible[n]["ngram_ppl"])


def _verdict(rows: dict, winner: str, real: dict) -> dict:
  """Does the winner beat unet_scratch on the n-gram judge outside the 95% intervals (None
  without that row), and how far is it from real text under each judge."""
  w, u = rows[winner], rows.get("unet_scratch")
  return {"beats_unet_outside_ci": (None if u is None else
                                    bool(w["ngram_ppl_ci"][1] < u["ngram_ppl_ci"][0])),
          "ngram_vs_real": w["ngram_ppl"] / real["ngram_ppl"],
          "gen_ppl_vs_real": w["gen_ppl"] / real["gen_ppl"]}


def summary(report: dict) -> str:
  real = report["real_text"]
  lines = [f"Bridge ablation at layer {report['layer']}: {report['budget']['steps']} steps x "
           f"{report['budget']['batch_size']} windows of {report['length']} tokens per row, "
           f"{report['num']} samples; joint readout at the temperature matching real text's "
           f"entropy ({real['entropy']:.2f} nats ± {ENTROPY_TOL}).", ""]
  header = ["row", "params", "T", "entropy", "gen PPL (self)", "n-gram PPL", "MAUVE", "spread",
            "x0-MSE t=0.3", "recovery t=0.3", "n-gram (untuned T)", "n-gram (identity)"]
  table = [["real_text", "-", "-", _f(real["entropy"]), _ci(real, "gen_ppl"),
            _ci(real, "ngram_ppl"), _f(real.get("mauve")), "-", "-", "-", "-", "-"]]
  for name in ("joint", "identity"):
    o = report["oracle"][name]
    table.append([f"oracle ({name}, true states)", "-", "-", _f(o["entropy"]),
                  _ci(o, "gen_ppl"), _ci(o, "ngram_ppl"), _f(o.get("mauve")), "-", "-", "-", "-",
                  f"{o['token_accuracy']:.1%} of tokens"])
  for name, r in report["rows"].items():
    table.append([name + (" (winner)" if name == report["winner"] else ""), f"{r['params']:,}",
                  _f(r["temperature"]), _f(r["entropy"]), _ci(r, "gen_ppl"),
                  _ci(r, "ngram_ppl"), _f(r.get("mauve")), _f(r["spread_ratio"]),
                  _f(r.get("val_mse_t0.3")), _f(r.get("recovery_t0.3")),
                  _ci(r["reads"]["joint_untuned"], "ngram_ppl"),
                  _ci(r["reads"]["identity"], "ngram_ppl")])
  lines.append(reports.markdown_table(header, table))
  v = report["verdict"]
  beats = v["beats_unet_outside_ci"]
  lines += ["", f"Winner {report['winner']}: n-gram PPL {v['ngram_vs_real']:.1f}x real text's, "
            f"gen PPL {v['gen_ppl_vs_real']:.1f}x; beats unet_scratch outside the 95% "
            f"intervals: {'n/a (no unet_scratch row)' if beats is None else beats}."]
  return "\n".join(lines)


def _f(v) -> str:
  if v is None:
    return "-"
  return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def _ci(row: dict, key: str) -> str:
  lo, hi = row[f"{key}_ci"]
  return f"{_f(row[key])} [{_f(lo)}, {_f(hi)}]"
