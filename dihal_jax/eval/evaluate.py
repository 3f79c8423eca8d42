"""`dihal eval`: every method's samples and the reference rows, measured by the same judges.

Rows (docs/design.md, "Evaluation protocol" and "the crux"; `eval.methods` picks them):
  real_text            held-out windows themselves.
  oracle               the default readout (sample.readout; `refine` reads as `lm_head`)
                       applied to the *true* h_l* of held-out windows: a perfect bridge.
  oracle_lm_head       per-position LM-head draws (sample.temperature / top_p) of the
                       true h_l*: the literal readout, not self-consistent (the crux).
  ar_backbone, unigram_sampler, bigram_sampler, dihal, dihal_<mode>, dihal_l0,
  embedding_rounding   generated rows (eval/rows.py); the two samplers are calibration
                       rows: what a trivial generator scores under each judge.
  mdm                  the backbone post-trained into a masked diffusion model (config
                       `mdm`; mdm.steps = -1 sees as many training windows as the bridge).
The two bridges share one protocol (UNet size, optimizer, steps, batch, windows:
the config's `bridge` and `train`); the l = 0 one is trained into `workdir/l0`
and the MDM into `workdir/mdm` on first use (both resumable).

Tasks:
  unconditional  windows generated from the separator; judged against each evaluation
                 set (Austen test, Moby Dick OOD): the generated rows are the same
                 samples in each, the reference rows and bridge diagnostics differ.
  continuation   the first eval.prefix tokens (separator included) of held-out test
                 windows given, the rest generated, by every row that takes a prefix
                 (not the oracles); MAUVE against the true continuations, and the share
                 of continuations whose first token repeats the prefix's last.
                 `real_text` here is the true continuations of other test windows.

Judges per row (eval/judges.py): gen PPL under the backbone (self-judged), the
Kneser–Ney n-gram PPL (train split only), MAUVE on sentence-encoder features against
real text, diversity, memorization, and 95% bootstrap intervals; eval.seeds > 1
repeats the sampling with other keys (eval.num samples per seed, pooled). Real
text for MAUVE: every set draws 2 x eval.num windows, the first half is the
`real_text` row and the bridges' diagnostics, the second half the MAUVE reference.
Bridge rows add: spread ratio (RMS per-channel std of generated / real h_l, in the
bridge's normalized space, position 0 excluded), validation x0-MSE of the bridge
at t ∈ eval.noise_levels, and token recovery: real windows noised to t and
denoised by the bridge, read with the current-token readout (class-mean head at
l*, nearest embedding at l = 0), accuracy vs the real tokens.

Writes workdir/report.json ({"results": {METHOD: metrics} for the first set,
"sets": {set: {METHOD: metrics}}, "continuation": {METHOD: metrics}, "judges",
"samples": {METHOD: [text, ...]}}), report.md and eval.png.
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
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.train import interface_layer, run_train
from dihal_jax.data.dataset import Data, cache_root
from dihal_jax.errors import UserInputError
from dihal_jax.eval import metrics
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.eval.judges import Judges
from dihal_jax.eval.rows import CALIBRATION_ROWS, L0_ROWS, RowGenerators
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.hybrid.readout import MODES, Readout, nearest_embedding
from dihal_jax.hybrid.sample import current_token_head, readout_config
from dihal_jax.mdm import sampler as mdm_sampler
from dihal_jax.mdm.train import TrainedMDM, load_mdm, run_mdm
from dihal_jax.overrides import overridden
from dihal_jax.parallel.sharding import mesh_and_rules

REFERENCE_ROWS = ("real_text", "oracle", "oracle_lm_head", "ar_backbone") + CALIBRATION_ROWS
METHODS = (REFERENCE_ROWS + ("dihal",) + tuple(f"dihal_{m}" for m in MODES) + L0_ROWS
           + ("mdm",))
TASKS = ("unconditional", "continuation")  # key streams: fold_in(seed key, task index)
# The other key streams of the seed key, apart from the tasks' 0 and 1 (values fixed so that
# committed results stay reproducible): the oracle rows' readout draws, and the bridge
# diagnostics (whose key then folds in i for the noise, 100 + i for the sampler, at noise
# level i).
ORACLE_STREAM = 7
DIAGNOSTICS_STREAM = 1000
SET_NAMES = {"test": "Austen test", "ood": "Moby Dick (OOD)"}


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


def _l0_bridge(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> TrainedBridge:
  """The l = 0 bridge of the same protocol, trained into workdir/l0 if needed."""
  run_train(overridden(config, {"bridge.layer": "0"}), workdir / "l0", progress=progress)
  return load_bridge(workdir / "l0", mesh_and_rules(config)[0], kind=config.bridge.denoiser)


def _mdm(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> TrainedMDM:
  """The masked diffusion model (`dihal mdm`'s protocol), trained into workdir/mdm if needed."""
  run_mdm(config, workdir / "mdm", progress=progress)
  return load_mdm(config, workdir / "mdm")


def bridge_diagnostics(bridge: TrainedBridge, real_tokens: np.ndarray, real_h: np.ndarray,
                        decode, noise_levels, key) -> dict:
  """Spread reference, val x0-MSE and token recovery at each t (normalized space, position 0
  known)."""
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
  out["val_mse"] = out[f"val_mse_t{noise_levels[len(noise_levels) // 2]:g}"]
  out["layer"] = bridge.layer
  return out


def evaluation_sets(data: Data, num: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{set: (real windows [num, n], MAUVE reference windows [num, n])}, disjoint draws of the
  set's seeded shuffled windows."""
  sets = {}
  for name in ("test", "ood"):
    if name not in data.sources:
      continue
    have = data.statistics[name]["windows"]
    if have < 2 * num:
      raise UserInputError(f"eval.num={num}: split {name!r} holds {have} windows of "
                           f"data.window={data.window}, fewer than the 2 x {num} eval needs "
                           "(real_text + the MAUVE reference); lower eval.num or add text")
    windows = data.first_windows(name, 2 * num, shuffle=True)
    sets[name] = (windows[:num], windows[num:])
  return sets


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
  n = config.sample.length or config.data.window
  if n != config.data.window:
    raise UserInputError(f"sample.length={n}: eval compares with real windows of "
                         f"data.window={config.data.window}; use the same length")
  data = Data.from_config(config, workdir)
  num, batch, seeds = e.num, config.sample.batch, e.seeds
  sets = evaluation_sets(data, num)
  backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  train = data.first_windows("train")
  judges = Judges.build(backbone, data.tokenizer, train, order=e.ngram_order,
                        encoder=e.encoder, cache=cache_root(config), batch=batch,
                        seed=config.seed)
  key = jax.random.key(config.seed)
  cfg = readout_config(config)

  needs_main = any(m.startswith("dihal") and m not in L0_ROWS for m in methods)
  needs_l0 = any(m in L0_ROWS for m in methods)
  gens = RowGenerators(backbone, CountSampler.fit(train, backbone.cfg.vocab_size), cfg,
                       config.sample.readout, batch)
  if needs_main:
    gens.main = load_bridge(workdir, mesh_and_rules(config)[0],
                            kind=config.bridge.denoiser)
    gens.readers["main"] = Readout(backbone, gens.main.layer, data.separator)
    gens.head = current_token_head(gens.main, backbone.cfg.vocab_size)
  if needs_l0:
    gens.l0 = _l0_bridge(config, workdir, progress)
    gens.readers["l0"] = Readout(backbone, 0, data.separator)
  if "mdm" in methods:
    s = config.sample
    mdm_sampler.check(s.mdm_steps, s.unmask, s.mdm_block, n)
    gens.mdm = _mdm(config, workdir, progress)
    gens.unmask, gens.mdm_block, gens.mdm_steps = s.unmask, s.mdm_block, s.mdm_steps
  oracle_mode = config.sample.readout if config.sample.readout != "refine" else "lm_head"
  if oracle_mode in ("identity", "joint") and gens.head is None:
    oracle_mode = "lm_head"  # the current-token head comes with a trained bridge
  if any(m.startswith("oracle") for m in methods) and "main" not in gens.readers:
    gens.readers["main"] = Readout(backbone, interface_layer(config, workdir), data.separator)

  generated = [m for m in methods if m not in ("real_text", "oracle", "oracle_lm_head")]
  prefix = e.prefix
  test_real, test_reference = sets["test"]
  tasks = {"unconditional": (np.full((num, n), data.separator, np.int32), 1)}
  if prefix:
    given = test_real.copy()
    given[:, prefix:] = data.separator
    tasks["continuation"] = (given, prefix)
  samples, states = {task: {} for task in tasks}, {}
  bar = tqdm(total=len(generated) * len(tasks) * seeds, desc="eval: sampling",
             disable=not progress)
  for task, (given, start) in tasks.items():
    for method in generated:
      k = jax.random.fold_in(jax.random.fold_in(key, TASKS.index(task)), METHODS.index(method))
      parts = []
      for s in range(seeds):
        tokens, h = gens(method, jax.random.fold_in(k, s), given, start)
        parts.append(tokens)
        if task == "unconditional" and s == 0 and h is not None:
          states[method] = h
        bar.update()
      samples[task][method] = np.concatenate(parts)
  bar.close()

  # A generated row is the same samples in every set: all but MAUVE is judged once.
  judged = {m: judges.score(samples["unconditional"][m], seeds=seeds) for m in generated}
  results, diagnostics, oracle_text = {}, {}, {}
  for set_name, (real, reference) in sets.items():
    reference_features = judges.features(reference)
    real_h = {name: np.asarray(r.lower(real)) for name, r in gens.readers.items()}
    rows = {}
    for method in tqdm(methods, desc=f"eval: judges ({set_name})", disable=not progress):
      if method in judged:
        row = {**judged[method],
               **judges.mauve(samples["unconditional"][method], reference_features)}
      else:
        tokens = real
        if method.startswith("oracle"):
          mode = oracle_mode if method == "oracle" else "lm_head"
          tokens = oracle_tokens(gens.readers["main"], real_h["main"],
                                 jax.random.fold_in(key, ORACLE_STREAM), cfg, mode, gens.head,
                                 batch)
          if set_name == "test":
            oracle_text[method] = tokens
        row = judges.score(tokens, reference=reference_features)
      if method == "oracle" and oracle_mode == "blockwise":
        row["ar_share"] = 1.0 / cfg.block
      if method in states:
        which = "l0" if method in L0_ROWS else "main"
        bridge = gens.l0 if which == "l0" else gens.main
        if (which, set_name) not in diagnostics:
          decode = ((lambda h: nearest_embedding(h, backbone.embed[...])) if which == "l0"
                    else gens.head)
          diagnostics[which, set_name] = bridge_diagnostics(
              bridge, real, real_h[which], decode, tuple(e.noise_levels),
              jax.random.fold_in(key, DIAGNOSTICS_STREAM))
        gen_z = np.asarray(bridge.norm.forward(jnp.asarray(states[method])))[:, 1:]
        real_z = np.asarray(bridge.norm.forward(jnp.asarray(real_h[which])))[:, 1:]
        row["spread_ratio"] = metrics.spread_ratio(gen_z, real_z)
        row.update(diagnostics[which, set_name])
        if gens.mode(method) == "blockwise":  # block-initial tokens are the backbone's draws
          row["ar_share"] = 1.0 / cfg.block
      rows[method] = row
    results[set_name] = rows

  continuation = {}
  if prefix:
    truth = judges.features(test_real, prefix)
    for method in tqdm(["real_text"] + generated if "real_text" in methods else generated,
                       desc="eval: judges (continuation)", disable=not progress):
      tokens, draws = ((test_reference, 1) if method == "real_text"
                       else (samples["continuation"][method], seeds))
      row = judges.score(tokens, start=prefix, reference=truth, seeds=draws)
      row["first_token_repeat"] = float(np.mean(tokens[:, prefix] == tokens[:, prefix - 1]))
      if gens.mode(method) == "blockwise":
        row["ar_share"] = 1.0 / cfg.block
      continuation[method] = row

  tokenizer = data.tokenizer
  shown = {m: samples["unconditional"][m] for m in generated}
  if "real_text" in methods:
    shown["real_text"] = test_real
  shown.update(oracle_text)
  text = {m: [tokenizer.decode(r[1:].tolist()) for r in rows[:e.show]] for m, rows in shown.items()}
  continued = {m: [{"prefix": tokenizer.decode(r[1:prefix].tolist()),
                    "continuation": tokenizer.decode(r[prefix:].tolist())}
                   for r in (samples["continuation"][m][:e.show])]
               for m in generated} if prefix else {}
  first_set = next(iter(results))
  report = {"results": results[first_set], "sets": results, "continuation": continuation,
            "samples": text, "continuation_samples": continued,
            "methods": methods, "num": num, "seeds": seeds, "length": n, "prefix": prefix,
            "judges": {
                "gen_ppl": "the backbone itself (self-judged: the hybrid reads out with it)",
                "ngram": {"order": judges.ngram.order, "discounts": judges.ngram.discounts,
                          "train_windows": int(len(train))},
                "mauve": {"encoder": e.encoder, "samples": num * seeds, "reference": num},
                "ci": "95% bootstrap over samples (BCa for perplexities; entropy: "
                      "estimate ± z·bootstrap SE)"},
            "bridge": {"layer": gens.main.layer if gens.main else None,
                       "step": gens.main.step if gens.main else None,
                       "l0_step": gens.l0.step if gens.l0 else None},
            "mdm": ({"step": gens.mdm.step, "mask_id": gens.mdm.mask_id,
                     "shift": gens.mdm.shift, "unmask": gens.unmask,
                     "steps": gens.mdm_steps,
                     "block": gens.mdm_block} if gens.mdm else None),
            "readout": dict(mode=config.sample.readout, oracle_mode=oracle_mode,
                            **cfg.__dict__),
            "timings": {"total_s": time.perf_counter() - t0}}
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  plot(report, workdir / "eval.png")
  return report


# (column, header) of the tables; `_ci` columns print `value [lo, hi]`.
COLUMNS = (("gen_ppl", "gen PPL (self-judged)"), ("ngram_ppl", "n-gram PPL"),
           ("mauve", "MAUVE"), ("entropy", "entropy"), ("distinct_2", "distinct-2"),
           ("diversity", "diversity"), ("memorization_4gram", "memo 4-gram"),
           ("spread_ratio", "spread"), ("val_mse", "val MSE"),
           ("recovery_t0.3", "recovery t=0.3"), ("ar_share", "ar_share"))
CONTINUATION_COLUMNS = (("mauve", "MAUVE"), ("ngram_ppl", "n-gram PPL"),
                        ("gen_ppl", "gen PPL (self-judged)"), ("entropy", "entropy"),
                        ("distinct_2", "distinct-2"),
                        ("first_token_repeat", "first token repeats prefix"),
                        ("ar_share", "ar_share"))


def summary(report: dict) -> str:
  parts = []
  seeds = report.get("seeds", 1)
  draws = f"{report['num']} samples x {seeds} seeds" if seeds > 1 else f"{report['num']} samples"
  seen = report["judges"]["mauve"]
  # MAUVE is biased upward with few samples: its header says how many it compared.
  mauve = f"MAUVE ({seen['samples']} vs {seen['reference']})"
  for set_name, rows in report["sets"].items():
    parts.append(f"### {SET_NAMES.get(set_name, set_name)}: unconditional ({draws} x "
                 f"{report['length']} tokens per generated row)\n\n"
                 + _table(rows, COLUMNS, mauve))
  if report.get("continuation"):
    parts.append(f"### Prefix continuation (Austen test: {report['prefix']} tokens given, "
                 f"{report['length'] - report['prefix']} generated; {draws})\n\n"
                 + _table(report["continuation"], CONTINUATION_COLUMNS,
                          f"{mauve}, vs the true continuations"))
  parts.append("gen PPL is judged by the backbone itself (the hybrid reads out with it); the "
               "n-gram PPL (Kneser–Ney, train split only) and MAUVE (all-MiniLM-L6-v2 "
               "features) are independent judges. [lo, hi]: 95% bootstrap interval over "
               "samples; overlapping intervals = no difference.")
  return "\n\n".join(parts)


def _table(rows: dict, columns, mauve_header: str) -> str:
  present = [(c, mauve_header if c == "mauve" else h) for c, h in columns
             if any(r.get(c) is not None for r in rows.values())]
  table = [[m] + [_cell(r, c) for c, _ in present] for m, r in rows.items()]
  return reports.markdown_table(["method", *(h for _, h in present)], table)


def _cell(row: dict, column: str) -> str:
  value, ci = row.get(column), row.get(f"{column}_ci")
  if value is None:
    return "-"
  text = _fmt(value)
  return f"{text} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else text


def _fmt(v) -> str:
  if v is None or not np.isfinite(v):
    return "-" if v is None else "nan"
  return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def plot(report: dict, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = report["results"]
  names = list(rows)
  panels = (("gen_ppl", "gen PPL, self-judged (log)", True),
            ("ngram_ppl", "n-gram PPL, train-split KN (log)", True),
            ("mauve", "MAUVE vs real text", False), ("entropy", "unigram entropy (nats)", False))
  fig, axes = plt.subplots(1, len(panels), figsize=(18, 4))
  for ax, (key, label, log) in zip(axes, panels):
    values = np.array([rows[m].get(key, np.nan) for m in names], float)
    ci = [rows[m].get(f"{key}_ci") for m in names]
    err = np.array([[v - c[0], c[1] - v] if c else [0.0, 0.0] for v, c in zip(values, ci)]).T
    colors = ["tab:gray" if m in REFERENCE_ROWS else "tab:blue" for m in names]
    ax.bar(range(len(names)), values, color=colors, yerr=np.maximum(err, 0), capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(label, fontsize=9)
    if log:
      ax.set_yscale("log")
  fig.tight_layout()
  reports.save_figure(fig, path)
