"""`dihal eval`: every method's samples and the reference rows, measured the same way.

Rows (DESIGN.md "Evaluation" and "crux"; `eval.methods` picks them):
  real_text            held-out windows themselves (the reference gen PPL).
  oracle               the default readout (sample.readout; `refine` reads as `lm_head`)
                       applied to the *true* h_l* of held-out windows: a perfect bridge.
  oracle_lm_head       per-position LM-head draws (sample.temperature / top_p) of the
                       true h_l*: the literal readout, not self-consistent (DESIGN.md crux).
  ar_backbone          the backbone's own samples from the separator (temperature 1).
  dihal                the bridge at l* with the default readout (sample.readout);
  dihal_<mode>         ... with each other readout mode (by default not the
                       default one again).
  dihal_l0             the same protocol at l = 0 (embedding interface, transformer
                       readout, default mode).
  embedding_rounding   the l = 0 bridge's samples rounded to the nearest embedding
                       row (Diffusion-LM style), no transformer.
The two bridges share one protocol (UNet size, optimizer, steps, batch, windows:
the config's `bridge` and `train`); the l = 0 one is trained into `workdir/l0`
on first use (resumable).

Metrics per row (eval/metrics.py): gen PPL under the full backbone (token-
weighted, first token excluded), distinct-1/2/3, diversity Π(1 - rep_n),
unigram entropy, 4-gram memorization against the whole train split. Bridge
rows add: spread ratio (RMS per-channel std of generated / real h_l, in the
bridge's normalized space, position 0 excluded), validation x0-MSE of the
bridge at t ∈ eval.noise_levels, and token recovery: real windows noised to t
and denoised by the bridge, read with the current-token readout (class-mean
head at l*, nearest embedding at l = 0), accuracy vs the real tokens. Every
evaluation set (Austen test, Moby Dick OOD) gets its own table; generated rows
are the same samples in each, the reference rows and bridge diagnostics differ.

Writes workdir/report.json ({"results": {METHOD: metrics} for the first set,
"sets": {set: {METHOD: metrics}}, "samples": {METHOD: [text, ...]}}),
report.md and eval.png.
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
from dihal_jax.backbone.generate import generate
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.train import interface_layer, run_train
from dihal_jax.data.dataset import Data
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import make_mesh
from dihal_jax.eval import metrics
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.hybrid.readout import MODES, Readout, nearest_embedding
from dihal_jax.hybrid.sample import identity_head, readout_config

REFERENCE_ROWS = ("real_text", "oracle", "oracle_lm_head", "ar_backbone")
METHODS = REFERENCE_ROWS + ("dihal",) + tuple(f"dihal_{m}" for m in MODES) + (
    "dihal_l0", "embedding_rounding")


def default_methods(readout: str) -> list[str]:
  """Every row once: `dihal` is the default readout, so `dihal_<readout>` would repeat it
  (and `oracle_lm_head` would repeat `oracle` when the default readout is lm_head)."""
  return [m for m in METHODS if m not in (f"dihal_{readout}", f"oracle_{readout}")]


class TrueStates:
  """Stands in for a bridge in the oracle rows: its samples are the true h_l of held-out
  windows, except at the positions the readout passes in as known."""

  def __init__(self, h):
    self.h = jnp.asarray(h)

  def sample(self, key, known_h, known_mask, *, steps=None, x_start=None, t_start=None):
    del key, steps, x_start, t_start
    return jnp.where(known_mask[..., None], known_h, self.h)


def oracle_tokens(reader: Readout, real_h: np.ndarray, key, cfg, mode: str, head,
                  batch: int) -> np.ndarray:
  """Readout `mode` (lm_head, blockwise or identity) of the true states real_h [N, n, d]."""
  rows = []
  for i in range(0, len(real_h), batch):
    h = real_h[i:i + batch]
    tokens, known = reader.template(len(h), h.shape[1])
    out = reader.fill(TrueStates(h), jax.random.fold_in(key, i), tokens, known, mode=mode,
                      cfg=cfg, identity_head=head)
    rows.append(np.asarray(out["tokens"]))
  return np.concatenate(rows)


SET_NAMES = {"test": "Austen test", "ood": "Moby Dick (OOD)"}


def _l0_bridge(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> TrainedBridge:
  """The l = 0 bridge of the same protocol, trained into workdir/l0 if needed."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.bridge.layer = "0"
  run_train(cfg, workdir / "l0", progress=progress)
  return load_bridge(workdir / "l0", make_mesh(config.mesh.to_dict()))


def _text_metrics(tokens: np.ndarray, backbone, train_ngrams: np.ndarray, batch: int) -> dict:
  body = [row[1:] for row in tokens]  # the separator is not generated
  return {"gen_ppl": metrics.gen_ppl(backbone, tokens, batch_size=batch)["gen_ppl"],
          "distinct_1": metrics.distinct_n(body, 1), "distinct_2": metrics.distinct_n(body, 2),
          "distinct_3": metrics.distinct_n(body, 3), "diversity": metrics.diversity(body),
          "entropy": metrics.unigram_entropy(body),
          "memorization_4gram": metrics.memorization(body, train_ngrams, 4)}


def _bridge_diagnostics(bridge: TrainedBridge, real_tokens: np.ndarray, real_h: np.ndarray,
                        decode, noise_levels, key) -> dict:
  """val x0-MSE and token recovery at each t (normalized space, position 0 known)."""
  z = bridge.norm.forward(jnp.asarray(real_h))
  b, n, _ = z.shape
  known = jnp.zeros((b, n), bool).at[:, 0].set(True)
  out = {}
  for i, t in enumerate(noise_levels):
    noise = jax.random.normal(jax.random.fold_in(key, i), z.shape)
    tv = jnp.full((b,), t, jnp.float32)
    z_t = diffusion.q_sample(z, tv, noise, bridge.diffusion.schedule)
    x0 = bridge.denoise_x0(z_t, tv, known, z)
    out[f"val_mse_t{t:g}"] = float(jnp.mean(jnp.square(x0[:, 1:] - z[:, 1:])))
    h = bridge.sample(jax.random.fold_in(key, 100 + i), jnp.asarray(real_h), known, x_start=z_t,
                      t_start=float(t))
    out[f"recovery_t{t:g}"] = metrics.token_accuracy(np.asarray(decode(h))[:, 1:],
                                                     real_tokens[:, 1:])
  return out


def run_eval(config: ml_collections.ConfigDict, workdir: str | Path, *,
             progress: bool = True) -> dict:
  workdir = Path(workdir)
  e = config.eval
  t0 = time.perf_counter()
  methods = ([m.strip() for m in e.methods.split(",") if m.strip()] if e.methods
             else default_methods(config.sample.readout))
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise UserInputError(f"eval.methods: unknown {unknown}; known: {', '.join(METHODS)}")
  data = Data.from_config(config, workdir)
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  backbone = checkpoint.load_backbone(config, ckpt)
  tokenizer = data.tokenizer
  n = config.sample.length or config.data.window
  if n != config.data.window:
    raise UserInputError(f"sample.length={n}: eval compares with real windows of "
                         f"data.window={config.data.window}; use the same length")
  num, batch = e.num, config.sample.batch
  key = jax.random.key(config.seed)
  cfg = readout_config(config)

  needs_main = any(m.startswith("dihal") and m != "dihal_l0" for m in methods)
  needs_l0 = "dihal_l0" in methods or "embedding_rounding" in methods
  main = load_bridge(workdir, make_mesh(config.mesh.to_dict())) if needs_main else None
  l0 = _l0_bridge(config, workdir, progress) if needs_l0 else None
  readers = {}
  if main is not None:
    readers["main"] = Readout(backbone, main.layer, data.separator)
  if l0 is not None:
    readers["l0"] = Readout(backbone, 0, data.separator)
  head = identity_head(main) if main is not None else None
  embed = backbone.embed[...]

  train_ngrams = metrics.ngram_set([row[1:] for row in data.first_windows("train")], 4)
  sets = {name: data.first_windows(name, num, shuffle=True) for name in ("test", "ood")
          if name in data.sources}

  oracle_mode = config.sample.readout if config.sample.readout != "refine" else "lm_head"
  if oracle_mode == "identity" and head is None:
    oracle_mode = "lm_head"  # the class-mean head comes with a trained bridge
  if any(m.startswith("oracle") for m in methods) and "main" not in readers:
    readers["main"] = Readout(backbone, interface_layer(config, workdir), data.separator)
  generated, states, modes, oracle_text = {}, {}, {}, {}
  bar = tqdm(total=len(methods), desc="eval: sampling", disable=not progress)
  for method in methods:
    k = jax.random.fold_in(key, METHODS.index(method))
    if method == "ar_backbone":
      prompt = jnp.full((num, 1), data.separator, jnp.int32)
      new = generate(backbone, prompt, max_new_tokens=n - 1, key=k, temperature=1.0)
      generated[method] = np.concatenate([np.asarray(prompt), np.asarray(new)], axis=1)
    elif method.startswith("dihal") or method == "embedding_rounding":
      bridge, reader = (l0, readers["l0"]) if method in ("dihal_l0", "embedding_rounding") else (
          main, readers["main"])
      mode = "nearest_embedding" if method == "embedding_rounding" else (
          config.sample.readout if method in ("dihal", "dihal_l0") else method[len("dihal_"):])
      modes[method] = mode
      rows, first = [], []
      for i in range(0, num, batch):
        tokens, known = reader.template(min(batch, num - i), n)
        if method == "embedding_rounding":
          h = bridge.sample(jax.random.fold_in(k, i), reader.lower(tokens), known,
                            steps=cfg.steps)
          out = {"tokens": jnp.where(known, tokens, nearest_embedding(h, embed)), "states": h}
        else:
          out = reader.fill(bridge, jax.random.fold_in(k, i), tokens, known, mode=mode, cfg=cfg,
                            identity_head=head)
        rows.append(np.asarray(out["tokens"]))
        first.append(np.asarray(out["states"]))
      generated[method], states[method] = np.concatenate(rows), np.concatenate(first)
    bar.update()
  bar.close()

  text_rows = {m: _text_metrics(generated[m], backbone, train_ngrams, batch) for m in generated}
  results = {}
  for set_name, real in sets.items():
    rows = {}
    real_main = np.asarray(readers["main"].lower(real)) if "main" in readers else None
    real_l0 = np.asarray(readers["l0"].lower(real)) if l0 is not None else None
    for method in tqdm(methods, desc=f"eval: metrics ({set_name})", disable=not progress):
      if method == "real_text":
        tokens = real
      elif method.startswith("oracle"):
        mode = oracle_mode if method == "oracle" else "lm_head"
        tokens = oracle_tokens(readers["main"], real_main, jax.random.fold_in(key, 7), cfg,
                               mode, head, batch)
        if set_name == "test":
          oracle_text[method] = tokens
      else:
        tokens = None
      row = dict(text_rows[method]) if tokens is None else _text_metrics(tokens, backbone,
                                                                         train_ngrams, batch)
      if method == "oracle" and oracle_mode == "blockwise":
        row["ar_share"] = 1.0 / cfg.block
      if method in states:
        at_l0 = method in ("dihal_l0", "embedding_rounding")
        bridge, real_h = (l0, real_l0) if at_l0 else (main, real_main)
        gen_z = np.asarray(bridge.norm.forward(jnp.asarray(states[method])))[:, 1:]
        real_z = np.asarray(bridge.norm.forward(jnp.asarray(real_h)))[:, 1:]
        row["spread_ratio"] = metrics.spread_ratio(gen_z, real_z)
        decode = (lambda h: nearest_embedding(h, embed)) if at_l0 else head
        row.update(_bridge_diagnostics(bridge, real, real_h, decode, tuple(e.noise_levels),
                                       jax.random.fold_in(key, 1000)))
        row["val_mse"] = row[f"val_mse_t{e.noise_levels[len(e.noise_levels) // 2]:g}"]
        row["layer"] = bridge.layer
        if modes[method] == "blockwise":  # block-initial tokens are the backbone's own draws
          row["ar_share"] = 1.0 / cfg.block
      rows[method] = row
    results[set_name] = rows

  samples = {m: [tokenizer.decode(r[1:].tolist()) for r in generated[m][:e.show]]
             for m in generated}
  shown = {"real_text": sets["test"] if "real_text" in methods else None, **oracle_text}
  for m, rows in shown.items():
    if rows is not None:
      samples[m] = [tokenizer.decode(r[1:].tolist()) for r in rows[:e.show]]
  first_set = next(iter(results))
  report = {"results": results[first_set], "sets": results, "samples": samples,
            "methods": methods, "num": num, "length": n,
            "bridge": {"layer": main.layer if main else None, "step": main.step if main else None,
                       "l0_step": l0.step if l0 else None},
            "readout": dict(mode=config.sample.readout, oracle_mode=oracle_mode,
                            **cfg.__dict__),
            "timings": {"total_s": time.perf_counter() - t0}}
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  plot(report, workdir / "eval.png")
  return report


COLUMNS = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "diversity",
           "memorization_4gram", "spread_ratio", "val_mse", "recovery_t0.3", "ar_share")


def summary(report: dict) -> str:
  parts = []
  for set_name, rows in report["sets"].items():
    table = [[m] + [_fmt(r.get(c)) for c in COLUMNS] for m, r in rows.items()]
    parts.append(f"### {SET_NAMES.get(set_name, set_name)} ({report['num']} samples x "
                 f"{report['length']} tokens)\n\n"
                 + reports.markdown_table(["method", *COLUMNS], table))
  return "\n\n".join(parts)


def _fmt(v) -> str:
  if v is None:
    return "-"
  return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


def plot(report: dict, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = report["results"]
  names = list(rows)
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for ax, key, label in ((axes[0], "gen_ppl", "gen PPL (log)"), (axes[1], "entropy",
                                                                   "unigram entropy (nats)")):
    values = [rows[m][key] for m in names]
    colors = ["tab:gray" if m in REFERENCE_ROWS else "tab:blue" for m in names]
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_title(label)
    if key == "gen_ppl":
      ax.set_yscale("log")
  fig.tight_layout()
  reports.save_figure(fig, path)
