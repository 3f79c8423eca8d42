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
  mdm_block            the same, trained as block diffusion (BD3-LM) with blocks of
                       eval.mdm_block positions.
The two bridges share one protocol (UNet size, optimizer, steps, batch, windows:
the config's `bridge` and `train`); the l = 0 one is trained into `workdir/l0`,
the MDMs into `workdir/mdm` and `workdir/mdm_block` on first use (all resumable).

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

eval.match_entropy: every row read by `joint` (the generated bridge rows and the oracle) is
drawn at the temperature that brings its unigram entropy within 0.1 nats of real text's
(over the generated positions of the test set's windows for the generated rows, of each
set's windows for the oracle; eval/entropy_match.py); those rows report `temperature` and
`entropy_matched`.

Writes workdir/report.json ({"results": {METHOD: metrics} for the first set,
"sets": {set: {METHOD: metrics}}, "continuation": {METHOD: metrics}, "judges",
"samples": {METHOD: [text, ...]}}), report.md and eval.png.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.backbone import checkpoint
from dihal_jax.bridge.train import interface_layer
from dihal_jax.bridge.training_loop import TrainingInterrupted
from dihal_jax.data.dataset import Data, cache_root
from dihal_jax.errors import UserInputError
from dihal_jax.eval import metrics
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.eval.diagnostics import bridge_diagnostics
from dihal_jax.eval.entropy_match import matched_joint_read
from dihal_jax.eval.judges import Judges
from dihal_jax.eval.rows import ROWS, RowGenerators
from dihal_jax.hybrid.bridge_sampler import load_bridge
from dihal_jax.hybrid.readout import Readout, nearest_embedding
from dihal_jax.hybrid.sample import current_token_head, readout_config
from dihal_jax.hybrid.tolerant_decoder import readout_backbone, train_with_decoder
from dihal_jax.mdm import sampler as mdm_sampler
from dihal_jax.mdm.train import load_mdm, run_mdm
from dihal_jax.overrides import overridden
from dihal_jax.parallel.sharding import mesh_and_rules

ORACLE_ROWS = ("oracle", "oracle_lm_head")
WINDOW_ROWS = ("real_text",) + ORACLE_ROWS  # read off held-out windows, not generated
METHODS = WINDOW_ROWS + tuple(ROWS)
REFERENCE_ROWS = WINDOW_ROWS + tuple(m for m, row in ROWS.items() if row.reference)
SET_NAMES = {"test": "Austen test", "ood": "Moby Dick (OOD)"}

# The streams folded into the seed key; the values are fixed so that committed results
# stay reproducible.
TASK_STREAMS = {"unconditional": 0, "continuation": 1}  # then the row's stream, then the seed
ORACLE_STREAM = 7  # the oracle rows' readout draws (the same in every set)
DIAGNOSTICS_STREAM = 1000  # the bridge diagnostics' noise and sampler (eval/diagnostics.py)


def default_methods(config: ml_collections.ConfigDict) -> list[str]:
  """Every row once: `dihal` is the default readout, so `dihal_<readout>` would repeat it
  (and `oracle_lm_head` would repeat `oracle` when the default readout is lm_head);
  `mdm_block` only with eval.mdm_block > 0."""
  readout = config.sample.readout
  skip = {f"dihal_{readout}", f"oracle_{readout}"}
  if not config.eval.mdm_block:
    skip.add("mdm_block")
  return [m for m in METHODS if m not in skip]


def named_methods(e: ml_collections.ConfigDict) -> list[str]:
  """The rows eval.methods names, in its order (none when it is empty)."""
  return [m.strip() for m in e.methods.split(",") if m.strip()]


def chosen_methods(config: ml_collections.ConfigDict) -> list[str]:
  """eval.methods (empty: default_methods), checked before anything loads."""
  methods = named_methods(config.eval) or default_methods(config)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise UserInputError(f"eval.methods: unknown {unknown}; known: {', '.join(METHODS)}")
  n = config.sample.length or config.data.window
  if n != config.data.window:
    raise UserInputError(f"sample.length={n}: eval compares with real windows of "
                         f"data.window={config.data.window}; use the same length")
  return methods


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


def oracle_mode(readout: str, head) -> str:
  """The `oracle` row's readout: the default one, `refine` read as lm_head, and lm_head for
  identity / joint without a trained bridge's current-token head."""
  mode = readout if readout != "refine" else "lm_head"
  return "lm_head" if mode in ("identity", "joint") and head is None else mode


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


def _load_main(gens: RowGenerators, config, workdir: Path, separator: int, progress: bool):
  """The bridge at l* (`dihal train`'s), its readout and its current-token head."""
  mesh = mesh_and_rules(config)[0]
  gens.bridges["main"] = load_bridge(workdir, mesh, kind=config.bridge.denoiser)
  gens.readers["main"] = Readout(readout_backbone(workdir, gens.backbone, mesh),
                                 gens.bridges["main"].layer, separator)
  gens.heads["main"] = current_token_head(gens.bridges["main"], gens.backbone.cfg.vocab_size)


def _load_l0(gens: RowGenerators, config, workdir: Path, separator: int, progress: bool):
  """The l = 0 bridge of the same protocol (and, with tolerant.enabled, its decoder), trained
  into workdir/l0 if needed; its own current-token head when the readout needs one."""
  if train_with_decoder(overridden(config, {"bridge.layer": "0"}), workdir / "l0",
                        progress=progress)["interrupted"]:
    raise TrainingInterrupted("the l = 0 bridge")
  mesh = mesh_and_rules(config)[0]
  gens.bridges["l0"] = load_bridge(workdir / "l0", mesh, kind=config.bridge.denoiser)
  gens.readers["l0"] = Readout(readout_backbone(workdir / "l0", gens.backbone, mesh), 0,
                               separator)
  if config.sample.readout in ("identity", "joint"):
    gens.heads["l0"] = current_token_head(gens.bridges["l0"], gens.backbone.cfg.vocab_size)


def _mdm_loader(name: str, block):
  """A loader of the masked diffusion model (`dihal mdm`'s protocol; `block(config)`: its
  mdm.block), trained into workdir/`name` if needed."""
  def load(gens: RowGenerators, config, workdir: Path, separator: int, progress: bool):
    s = config.sample
    mdm_sampler.check(s.mdm_steps, s.unmask, s.mdm_block, config.data.window)
    config = overridden(config, {"mdm.block": block(config)})
    if run_mdm(config, workdir / name, progress=progress)["interrupted"]:
      raise TrainingInterrupted(f"the {name} model")
    gens.mdms[name] = load_mdm(config, workdir / name)
    gens.unmask, gens.mdm_block, gens.mdm_steps = s.unmask, s.mdm_block, s.mdm_steps
  return load


MODEL_LOADERS = {"main": _load_main, "l0": _load_l0,  # Row.model -> loader
                 "mdm": _mdm_loader("mdm", lambda c: c.mdm.block),
                 "mdm_block": _mdm_loader("mdm_block", lambda c: c.eval.mdm_block)}


@dataclasses.dataclass
class Setup:
  """What every step of one eval reads: the chosen rows, the data, the judges, the models."""
  config: ml_collections.ConfigDict
  methods: list[str]
  data: Data
  sets: dict  # evaluation_sets
  train: np.ndarray  # the train split's windows
  judges: Judges
  gens: RowGenerators
  key: jax.Array  # the seed key
  oracle_mode: str

  @property
  def generated(self) -> list[str]:
    return [m for m in self.methods if m in ROWS]

  @property
  def seeds(self) -> int:
    return self.config.eval.seeds

  @property
  def prefix(self) -> int:
    return self.config.eval.prefix


def load(config: ml_collections.ConfigDict, workdir: Path, methods: list[str],
         progress: bool) -> Setup:
  """Data, evaluation sets, backbone and judges, then the models the rows sample (trained
  into the workdir first where missing)."""
  data = Data.from_config(config, workdir)
  sets = evaluation_sets(data, config.eval.num)
  backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  train = data.first_windows("train")
  judges = Judges.build(backbone, data.tokenizer, train, order=config.eval.ngram_order,
                        encoder=config.eval.encoder, cache=cache_root(config),
                        batch=config.sample.batch, seed=config.seed)
  gens = RowGenerators(backbone, CountSampler.fit(train, backbone.cfg.vocab_size),
                       readout_config(config), config.sample.readout, config.sample.batch)
  models = {ROWS[m].model for m in methods if m in ROWS}
  for model, load_model in MODEL_LOADERS.items():
    if model in models:
      load_model(gens, config, workdir, data.separator, progress)
  if config.eval.match_entropy:
    gens.entropy_reference = sets["test"][0]
  if any(m in ORACLE_ROWS for m in methods) and "main" not in gens.readers:
    gens.readers["main"] = Readout(backbone, interface_layer(config, workdir), data.separator)
  return Setup(config, methods, data, sets, train, judges, gens, jax.random.key(config.seed),
               oracle_mode(config.sample.readout, gens.heads.get("main")))


def task_inputs(s: Setup) -> dict[str, tuple[np.ndarray, int]]:
  """{task: (given windows [num, n], known positions)}: the separator alone, and with
  eval.prefix the first eval.prefix tokens of the test set's real windows."""
  num, n, separator = s.config.eval.num, s.config.data.window, s.data.separator
  tasks = {"unconditional": (np.full((num, n), separator, np.int32), 1)}
  if s.prefix:
    given = s.sets["test"][0].copy()
    given[:, s.prefix:] = separator
    tasks["continuation"] = (given, s.prefix)
  return tasks


def sampling_key(key: jax.Array, task: str, method: str, seed: int) -> jax.Array:
  """The key of one task's samples of one row at one sampling seed."""
  task_key = jax.random.fold_in(key, TASK_STREAMS[task])
  return jax.random.fold_in(jax.random.fold_in(task_key, ROWS[method].stream), seed)


def sample_rows(s: Setup, progress: bool) -> tuple[dict, dict, dict]:
  """({task: {method: tokens [seeds x num, n]}}, {method: the bridge's states of its first
  unconditional seed}, {task: {method: {"temperature": mean over seeds, "temperature_seeds",
  "entropy_matched": every seed's}}} of the rows read at matched entropy) for every generated
  row."""
  tasks = task_inputs(s)
  samples, states, matched = {task: {} for task in tasks}, {}, {task: {} for task in tasks}
  bar = tqdm(total=len(s.generated) * len(tasks) * s.seeds, desc="eval: sampling",
             disable=not progress)
  for task, (given, start) in tasks.items():
    for method in s.generated:
      parts = []
      for seed in range(s.seeds):
        tokens, h = s.gens(method, sampling_key(s.key, task, method, seed), given, start)
        parts.append(tokens)
        if s.gens.matched_read is not None:
          m = matched[task].setdefault(method, {"temperature_seeds": [],
                                                "entropy_matched": True})
          m["temperature_seeds"].append(s.gens.matched_read["temperature"])
          m["temperature"] = float(np.mean(m["temperature_seeds"]))
          m["entropy_matched"] &= s.gens.matched_read["entropy_matched"]
        if task == "unconditional" and seed == 0 and h is not None:
          states[method] = h
        bar.update()
      samples[task][method] = np.concatenate(parts)
  bar.close()
  return samples, states, matched


def ar_share(s: Setup, method: str) -> dict:
  """{"ar_share": 1 / block} for a blockwise row (each block's first token is the backbone's
  own draw), else {}."""
  mode = s.oracle_mode if method == "oracle" else s.gens.mode(method)
  return {"ar_share": 1.0 / s.gens.readout.block} if mode == "blockwise" else {}


def window_rows(s: Setup, real: np.ndarray, real_h: dict) -> tuple[dict, dict]:
  """({method: tokens} of the chosen rows read off one set's held-out windows, {method:
  {"temperature", "entropy_matched"}} of those read by `joint` at matched entropy)."""
  tokens, matched = {}, {}
  key = jax.random.fold_in(s.key, ORACLE_STREAM)
  for method in (m for m in s.methods if m in WINDOW_ROWS):
    mode = s.oracle_mode if method == "oracle" else "lm_head"
    if method == "real_text":
      tokens[method] = real
    elif mode == "joint" and s.config.eval.match_entropy:
      tokens[method], t, ok = matched_oracle(s, real, real_h["main"], key)
      matched[method] = {"temperature": t, "entropy_matched": ok}
    else:
      tokens[method] = oracle_tokens(s.gens.readers["main"], real_h["main"], key, s.gens.readout,
                                     mode, s.gens.heads.get("main"), s.gens.batch)
  return tokens, matched


def matched_oracle(s: Setup, real: np.ndarray, real_h: np.ndarray, key) -> tuple:
  """(tokens, T, matched): the joint oracle of the true states real_h at the temperature that
  matches real's entropy; each batch drawn as `oracle_tokens` draws it at that T."""
  reader, n = s.gens.readers["main"], real_h.shape[1]
  given, known = reader.template(len(real_h), n)
  parts = [(real_h[i:i + s.gens.batch],
            jax.random.fold_in(jax.random.split(jax.random.fold_in(key, i))[1], 0),
            slice(i, i + s.gens.batch)) for i in range(0, len(real_h), s.gens.batch)]
  return matched_joint_read(reader, s.gens.heads["main"], parts, given, known, real, 1,
                            s.gens.readout)


def bridge_columns(s: Setup, method: str, states: np.ndarray, real: np.ndarray,
                   real_h: dict, diagnostics: dict) -> dict:
  """A bridge row's spread ratio and its bridge's diagnostics (computed once per set and
  bridge into `diagnostics`)."""
  model = ROWS[method].model
  bridge = s.gens.bridges[model]
  if model not in diagnostics:
    decode = ((lambda h: nearest_embedding(h, s.gens.backbone.embed[...])) if model == "l0"
              else s.gens.heads["main"])
    diagnostics[model] = bridge_diagnostics(
        bridge, real, real_h[model], {"recovery": decode}, tuple(s.config.eval.noise_levels),
        jax.random.fold_in(s.key, DIAGNOSTICS_STREAM))
  gen_z = np.asarray(bridge.norm.forward(jnp.asarray(states)))[:, 1:]
  real_z = np.asarray(bridge.norm.forward(jnp.asarray(real_h[model])))[:, 1:]
  return {"spread_ratio": metrics.spread_ratio(gen_z, real_z), **diagnostics[model]}


def set_rows(s: Setup, set_name: str, judged: dict, samples: dict, states: dict,
             matched: dict, progress: bool) -> tuple[dict, dict]:
  """({method: metrics} against one evaluation set, {method: tokens} of its window rows).
  Generated rows reuse their set-independent judges (`judged`) and add MAUVE; rows read at
  matched entropy add their temperature (`matched`: sample_rows' unconditional task)."""
  real, reference = s.sets[set_name]
  reference_features = s.judges.features(reference)
  real_h = {model: np.asarray(r.lower(real)) for model, r in s.gens.readers.items()}
  windows, windows_matched = window_rows(s, real, real_h)
  rows, diagnostics = {}, {}
  for method in tqdm(s.methods, desc=f"eval: judges ({set_name})", disable=not progress):
    if method in windows:
      row = {**s.judges.score(windows[method], reference=reference_features),
             **windows_matched.get(method, {})}
    else:
      row = {**judged[method],
             **s.judges.mauve(samples["unconditional"][method], reference_features),
             **matched.get(method, {})}
    if method in states:
      row.update(bridge_columns(s, method, states[method], real, real_h, diagnostics))
    rows[method] = {**row, **ar_share(s, method)}
  return rows, windows


def continuation_rows(s: Setup, samples: dict, matched: dict, progress: bool) -> dict:
  """{method: metrics} of the continuation task, judged from the prefix on against the true
  continuations; `real_text` is the true continuations of other test windows."""
  test_real, test_reference = s.sets["test"]
  truth = s.judges.features(test_real, s.prefix)
  methods = (["real_text"] if "real_text" in s.methods else []) + s.generated
  rows = {}
  for method in tqdm(methods, desc="eval: judges (continuation)", disable=not progress):
    tokens, draws = ((test_reference, 1) if method == "real_text"
                     else (samples["continuation"][method], s.seeds))
    row = s.judges.score(tokens, start=s.prefix, reference=truth, seeds=draws)
    row["first_token_repeat"] = float(np.mean(tokens[:, s.prefix] == tokens[:, s.prefix - 1]))
    rows[method] = {**row, **ar_share(s, method), **matched.get(method, {})}
  return rows


def sample_texts(s: Setup, samples: dict, test_windows: dict) -> tuple[dict, dict]:
  """The first eval.show samples of each row as text, and of each continuation its prefix and
  continuation."""
  decode, show, prefix = s.data.tokenizer.decode, s.config.eval.show, s.prefix
  shown = {**{m: samples["unconditional"][m] for m in s.generated}, **test_windows}
  text = {m: [decode(r[1:].tolist()) for r in rows[:show]] for m, rows in shown.items()}
  continued = {m: [{"prefix": decode(r[1:prefix].tolist()),
                    "continuation": decode(r[prefix:].tolist())}
                   for r in samples["continuation"][m][:show]]
               for m in s.generated} if prefix else {}
  return text, continued


def assemble_report(s: Setup, results: dict, continuation: dict, texts: tuple[dict, dict],
                    total_s: float) -> dict:
  """report.json's contents: the rows, and what they were judged and sampled with."""
  e, gens = s.config.eval, s.gens
  main, l0 = gens.bridges.get("main"), gens.bridges.get("l0")
  return {
      "results": next(iter(results.values())), "sets": results, "continuation": continuation,
      "samples": texts[0], "continuation_samples": texts[1],
      "methods": s.methods, "num": e.num, "seeds": s.seeds, "length": s.config.data.window,
      "prefix": s.prefix,
      "judges": {
          "gen_ppl": "the backbone itself (self-judged: the hybrid reads out with it)",
          "ngram": {"order": s.judges.ngram.order, "discounts": s.judges.ngram.discounts,
                    "train_windows": int(len(s.train))},
          "mauve": {"encoder": e.encoder, "samples": e.num * s.seeds, "reference": e.num},
          "ci": "95% bootstrap over samples (BCa for perplexities; entropy: "
                "estimate ± z·bootstrap SE)"},
      "bridge": {"layer": main.layer if main else None, "step": main.step if main else None,
                 "l0_step": l0.step if l0 else None},
      **{name: ({"step": mdm.step, "mask_id": mdm.mask_id, "shift": mdm.shift,
                 "unmask": gens.unmask, "steps": gens.mdm_steps,
                 "block": mdm.block or gens.mdm_block, "trained_block": mdm.block}
                if mdm else None)
         for name, mdm in (("mdm", gens.mdms.get("mdm")),
                           ("mdm_block", gens.mdms.get("mdm_block")))},
      "readout": dict(mode=s.config.sample.readout, oracle_mode=s.oracle_mode,
                      **gens.readout.__dict__),
      "timings": {"total_s": total_s}}


def run_eval(config: ml_collections.ConfigDict, workdir: str | Path, *,
             progress: bool = True) -> dict:
  """Loads what the chosen rows need, samples every generated row once per task, judges
  each row against every evaluation set and the continuations; writes report.md, eval.png."""
  workdir, t0 = Path(workdir), time.perf_counter()
  s = load(config, workdir, chosen_methods(config), progress)
  samples, states, matched = sample_rows(s, progress)
  # A generated row is the same samples in every set: all but MAUVE is judged once.
  judged = {m: s.judges.score(samples["unconditional"][m], seeds=s.seeds) for m in s.generated}
  results, windows = {}, {}
  for set_name in s.sets:
    results[set_name], windows[set_name] = set_rows(s, set_name, judged, samples, states,
                                                    matched["unconditional"], progress)
  continuation = (continuation_rows(s, samples, matched.get("continuation", {}), progress)
                  if s.prefix else {})
  texts = sample_texts(s, samples, windows["test"])
  report = assemble_report(s, results, continuation, texts, time.perf_counter() - t0)
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  plot(report, workdir / "eval.png")
  return report


# (column, header) of the tables; `_ci` columns print `value [lo, hi]`.
COLUMNS = (("gen_ppl", "gen PPL (self-judged)"), ("ngram_ppl", "n-gram PPL"),
           ("mauve", "MAUVE"), ("entropy", "entropy"), ("distinct_2", "distinct-2"),
           ("diversity", "diversity"), ("memorization_4gram", "memo 4-gram"),
           ("spread_ratio", "spread"), ("val_mse", "val MSE"),
           ("recovery_t0.3", "recovery t=0.3"), ("ar_share", "ar_share"),
           ("temperature", "T (entropy-matched)"))
CONTINUATION_COLUMNS = (("mauve", "MAUVE"), ("ngram_ppl", "n-gram PPL"),
                        ("gen_ppl", "gen PPL (self-judged)"), ("entropy", "entropy"),
                        ("distinct_2", "distinct-2"),
                        ("first_token_repeat", "first token repeats prefix"),
                        ("ar_share", "ar_share"), ("temperature", "T (entropy-matched)"))


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
