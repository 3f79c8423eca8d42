"""`dihal ablate`: which bridge knows language, at a matched budget and matched entropy.

Rows (ROWS): the same interface layer, normalization, steps, batch, windows, learning
rate and sampler; only the denoiser, its initialization and the token loss differ:
  unet_scratch                 the 1D UNet (bridge.unet), from scratch
  transformer_scratch          m blocks of the backbone's architecture, random init
  transformer_backbone         the same blocks copied from the backbone (ℓ+1..ℓ+m)
  transformer_backbone_ce      ... plus the auxiliary token loss (train.token_ce)
  unet_logit_normal            unet_scratch trained at logit-normal times (train.logit_normal)
  unet_upper_ce                unet_scratch plus the upper-layer token loss (train.upper_ce:
                               its x0 estimates through the frozen upper layers and LM head)
  unet_scratch_tolerant        unet_scratch read through a tolerant decoder (tolerant.*:
                               LoRA on the layers above ℓ trained on the bridge's estimates)
  transformer_backbone_tolerant  transformer_backbone, the same
Each bridge trains into workdir/NAME (resumable: an interrupted ablation restarts where
it stopped; finished rows are reused); a tolerant row reuses its twin's bridge (TWINS) and
samples it with the twin's key, so the pair reads the same states. `ablate.rows` picks a
subset (e.g. the winner alone at another layer, for the ℓ* vs ℓ = 0 comparison).

Every row samples eval.num unconditional windows once (sample.steps) and reads them:
`joint` at each β of ablate.betas, each at the temperature that brings its unigram entropy
within ENTROPY_TOL nats of real text's (bisection on T over the same states), `joint` at
sample.beta and sample.temperature (untuned) and `identity`. Perplexity falls steeply as
entropy falls, so only entropy-matched reads are compared, and all at one β: the headline
β is the largest of the ladder at which every row and the oracle match (chosen by entropy
alone, before any judge is read). Judges: the backbone (self-judged gen PPL), the
Kneser–Ney n-gram judge, MAUVE against held-out test windows, 95% bootstrap intervals.
Oracle rows read the *true* states of the held-out windows with `joint` (each β, matched
the same way) and `identity`: a readout whose oracle does not return real text is not
measuring the bridge. A tolerant row's joint reads go through its adapted decoder, so it
has its own oracle (`decoder_oracle`, the true states through that decoder). Trivial
generators (`calibration`: the unigram and bigram samplers of eval/calibration.py, fit on
the train windows) are judged beside them: a row that does not beat them is not language.

SIGTERM during training saves the row's checkpoint and stops the ablation
(`TrainingInterrupted` naming the row). Writes workdir/report.json ({"rows": {NAME: {...}},
"winner", "real_text", "calibration", "oracle", "budget", ...}) and report.md.
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
from dihal_jax.bridge.train import interface_layer, run_train
from dihal_jax.bridge.training_loop import TrainingInterrupted
from dihal_jax.data.dataset import Data, cache_root
from dihal_jax.errors import UserInputError
from dihal_jax.eval import metrics
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.eval.diagnostics import bridge_diagnostics
from dihal_jax.eval.entropy_match import ENTROPY_TOL, matched_temperature
from dihal_jax.eval.evaluate import evaluation_sets
from dihal_jax.eval.judges import Judges
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.hybrid.readout import Readout
from dihal_jax.hybrid.sample import current_token_head
from dihal_jax.hybrid.tolerant_decoder import readout_backbone, train_tolerant_decoder
from dihal_jax.overrides import overridden
from dihal_jax.parallel.sharding import mesh_and_rules

PLAIN = {"train.token_ce": 0.0, "train.upper_ce": 0.0}  # the auxiliary token losses off
BRIDGES = {
    "unet_scratch": {**PLAIN, "bridge.denoiser": "unet", "bridge.init": "scratch"},
    "transformer_scratch": {**PLAIN, "bridge.denoiser": "transformer", "bridge.init": "scratch"},
    "transformer_backbone": {**PLAIN, "bridge.denoiser": "transformer",
                             "bridge.init": "backbone"},
    # None: the config's value
    "transformer_backbone_ce": {**PLAIN, "bridge.denoiser": "transformer",
                                "bridge.init": "backbone", "train.token_ce": None},
    "unet_logit_normal": {**PLAIN, "bridge.denoiser": "unet", "bridge.init": "scratch",
                          "train.time_sampling": "logit_normal"},
    "unet_upper_ce": {**PLAIN, "bridge.denoiser": "unet", "bridge.init": "scratch",
                      "train.upper_ce": None},
}
# A tolerant row reads its twin's bridge (trained once, in workdir/TWIN) through its own
# decoder (workdir/NAME/decoder), so the two rows differ only in the decoder.
TWINS = {"unet_scratch_tolerant": "unet_scratch",
         "transformer_backbone_tolerant": "transformer_backbone"}
ROWS = {**BRIDGES, **{name: {**BRIDGES[twin], "tolerant.enabled": True}
                      for name, twin in TWINS.items()}}

JUDGED = ("gen_ppl", "gen_ppl_ci", "ngram_ppl", "ngram_ppl_ci", "mauve", "entropy", "entropy_ci",
          "distinct_2", "diversity")
# The streams folded into a row's key (the seed key folded with the row's place among the
# chosen rows); the values are fixed so that committed results stay reproducible. The
# sampler's batches fold their first row index into the row's key itself, the oracle's
# joint reads theirs into the seed key.
READ_STREAM = 1  # the joint readout's draws, then each batch's number
DIAGNOSTICS_STREAM = 2  # the bridge diagnostics' noise and sampler (eval/diagnostics.py)


def row_config(config: ml_collections.ConfigDict, overrides: dict,
               layer: int) -> ml_collections.ConfigDict:
  """config with one row's overrides at a fixed layer (a None value keeps the config's)."""
  changes = {path: value for path, value in overrides.items() if value is not None}
  return overridden(config, {"bridge.layer": str(layer), **changes})


def chosen_rows(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{name: overrides} of ablate.rows (empty: every row)."""
  names = [r.strip() for r in config.ablate.rows.split(",") if r.strip()] or list(ROWS)
  unknown = [r for r in names if r not in ROWS]
  if unknown:
    raise UserInputError(f"--config.ablate.rows: unknown {unknown}; known: {', '.join(ROWS)}")
  return {name: ROWS[name] for name in names}


def train_rows(config: ml_collections.ConfigDict, workdir: Path, chosen: dict, layer: int,
               progress: bool) -> tuple[dict, dict]:
  """Trains (or resumes) each row's bridge into workdir/NAME (a tolerant row: its twin's, if
  not trained yet, then its decoder into workdir/NAME/decoder): ({train_NAME_s: seconds},
  {NAME: the decoder's validation NLLs}). Raises
  `TrainingInterrupted` when SIGTERM stopped one (saved; the same command resumes)."""
  timings, decoders = {}, {}
  for name, overrides in chosen.items():
    tick = time.perf_counter()
    bridge_name = TWINS.get(name, name)
    trained = run_train(row_config(config, BRIDGES[bridge_name], layer), workdir / bridge_name,
                        progress=progress)
    if trained["interrupted"]:
      raise TrainingInterrupted(f"the {bridge_name} bridge")
    if name in TWINS:
      decoders[name] = train_tolerant_decoder(row_config(config, overrides, layer),
                                              workdir / bridge_name,
                                              decoder_workdir=workdir / name,
                                              progress=progress)["val_nll"]
    timings[f"train_{name}_s"] = time.perf_counter() - tick
  return timings, decoders


@dataclasses.dataclass
class Bench:
  """What every row is judged with: the judges, the held-out test windows and their states."""
  config: ml_collections.ConfigDict
  data: Data
  judges: Judges
  reader: Readout  # at the interface layer
  real: np.ndarray  # held-out test windows [num, n]
  reference: np.ndarray  # MAUVE reference features (disjoint test windows)
  real_h: np.ndarray  # the real windows' h_l [num, n, d]
  real_row: dict  # real text's judged values
  calibration: dict  # {unigram_sampler, bigram_sampler: judged values}: trivial generators
  key: jax.Array  # the seed key

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: Path, layer: int) -> "Bench":
    e = config.eval
    data = Data.from_config(config, workdir)
    backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
    train = data.first_windows("train")
    judges = Judges.build(backbone, data.tokenizer, train, order=e.ngram_order,
                          encoder=e.encoder, cache=cache_root(config),
                          batch=config.sample.batch, seed=config.seed)
    real, reference_windows = evaluation_sets(data, e.num)["test"]
    reference = judges.features(reference_windows)
    reader = Readout(backbone, layer, data.separator)
    counts = CountSampler.fit(train, backbone.cfg.vocab_size)
    rng = np.random.default_rng(config.seed)
    calibration = {name: _judged(judges, draw(rng, real[:, :1], real.shape[1]), reference)
                   for name, draw in (("unigram_sampler", counts.unigram_sample),
                                      ("bigram_sampler", counts.bigram_sample))}
    return cls(config, data, judges, reader, real, reference, np.asarray(reader.lower(real)),
               _judged(judges, real, reference), calibration, jax.random.key(config.seed))

  @property
  def batch(self) -> int:
    return self.config.sample.batch

  def judged(self, tokens: np.ndarray) -> dict:
    return _judged(self.judges, tokens, self.reference)


def _judged(judges: Judges, tokens: np.ndarray, reference: np.ndarray) -> dict:
  row = judges.score(tokens, reference=reference)
  return {k: row[k] for k in JUDGED if k in row}


def betas(config: ml_collections.ConfigDict) -> list[float]:
  """The β ladder (ablate.betas, largest first) with sample.beta, the untuned read's."""
  return sorted({float(v) for v in config.ablate.betas} | {float(config.sample.beta)},
                reverse=True)


def beta_key(beta: float) -> str:
  return f"joint_beta{beta:g}"


def matched_joint_reads(b: Bench, states: np.ndarray, head, key, reader: Readout):
  """Yields (β, (T, tokens, matched, read)) of `reader`'s joint readout of `states`,
  entropy-matched at every β of the ladder (`read(T)` draws at any other T); the scores of
  one β are sorted once and drawn at every T of its bisection. One β at a time: its scores
  ([num, n, V] floats, 1.6 GB for 128 SmolLM2 windows) are not kept for the next β's."""
  read_key = jax.random.fold_in(key, READ_STREAM)
  for beta in betas(b.config):
    scores = [reader.joint_scores(states[j:j + b.batch], head, beta)
              for j in range(0, len(states), b.batch)]
    read = lambda t, scores=scores: np.concatenate([  # noqa: E731
        np.asarray(reader.draw(sc, jax.random.fold_in(read_key, j), t,
                                 b.config.sample.top_p))
        for j, sc in enumerate(scores)])
    yield beta, (*matched_temperature(read, b.real_row["entropy"]), read)
    del scores, read


def oracle_rows(b: Bench, head, reader: Readout, *, identity: bool = True) -> dict:
  """{read: values} of `reader`'s `joint` readouts (each β, entropy-matched) and (when
  `identity`) the `identity` readout of the real windows' true states."""
  truth = {beta_key(beta): (tokens, {"beta": beta, "temperature": t, "entropy_matched": ok})
           for beta, (t, tokens, ok, _) in matched_joint_reads(b, b.real_h, head, b.key,
                                                               reader)}
  if identity:
    truth["identity"] = (_with_separator(np.asarray(head(b.real_h)), b.real), {})
  oracle = {}
  for read, (tokens, how) in truth.items():
    oracle[read] = dict(b.judged(tokens), **how,
                        token_accuracy=metrics.token_accuracy(tokens[:, 1:], b.real[:, 1:]))
    oracle[read]["gen_ppl_vs_real"] = oracle[read]["gen_ppl"] / b.real_row["gen_ppl"]
  return oracle


def sampled_states(b: Bench, bridge: TrainedBridge, key) -> tuple[np.ndarray, np.ndarray]:
  """(template [num, n], the bridge's unconditional states [num, n, d]) at sample.steps."""
  num, steps = b.config.eval.num, b.config.sample.steps
  template, known = b.reader.template(num, b.real.shape[1])
  states = np.concatenate([np.asarray(bridge.sample(
      jax.random.fold_in(key, j), b.reader.lower(template[j:j + b.batch]),
      known[j:j + b.batch], steps=steps)) for j in range(0, num, b.batch)])
  return template, states


def entropy_matched_reads(b: Bench, states: np.ndarray, template: np.ndarray, head, key,
                          reader: Readout) -> tuple[dict, dict]:
  """({read: values} of `joint_beta<β>` (entropy-matched at each β), `joint_untuned` and
  `identity`, {β: the matched tokens})."""
  reads, tokens = {}, {}
  for beta, (t, matched_tokens, ok, read) in matched_joint_reads(b, states, head, key,
                                                                 reader):
    reads[beta_key(beta)] = dict(b.judged(matched_tokens), beta=beta, temperature=t,
                                 entropy_matched=ok)
    tokens[beta] = matched_tokens
    if beta == b.config.sample.beta:
      reads["joint_untuned"] = dict(b.judged(read(b.config.sample.temperature)), beta=beta,
                                    temperature=b.config.sample.temperature)
    del read  # this β's scores, before the next β's are computed
  reads["identity"] = b.judged(_with_separator(np.asarray(head(states)), template))
  return reads, tokens


def judge_row(b: Bench, bridge: TrainedBridge, head, train_cfg: ml_collections.ConfigDict,
              key, reader: Readout) -> dict:
  """One row's report: its protocol, its entropy-matched values (the headline), the spread
  ratio, the bridge diagnostics, every read and a few samples; `reader` reads its states
  (b.reader, or the row's tolerant decoder)."""
  template, states = sampled_states(b, bridge, key)
  reads, matched_tokens = entropy_matched_reads(b, states, template, head, key, reader)
  texts = {beta_key(beta): [b.data.tokenizer.decode(r[1:].tolist())
                            for r in tokens[:b.config.eval.show]]
           for beta, tokens in matched_tokens.items()}
  gen_z = np.asarray(bridge.norm.forward(jnp.asarray(states)))[:, 1:]
  real_z = np.asarray(bridge.norm.forward(jnp.asarray(b.real_h)))[:, 1:]
  return {
      "denoiser": bridge.kind, "init": train_cfg.bridge.init,
      "token_ce": float(train_cfg.train.token_ce),
      "upper_ce": float(train_cfg.train.upper_ce),
      "tolerant_decoder": bool(train_cfg.tolerant.enabled),
      "time_sampling": train_cfg.train.time_sampling,
      "readout": "joint", "params": bridge.params_count, "steps": bridge.step,
      "batch_size": train_cfg.train.batch_size, "lr": train_cfg.train.lr,
      "spread_ratio": metrics.spread_ratio(gen_z, real_z),
      **bridge_diagnostics(bridge, b.real, b.real_h, {"recovery": head},
                           tuple(b.config.eval.noise_levels),
                           jax.random.fold_in(key, DIAGNOSTICS_STREAM)),
      "reads": reads, "samples_by_read": texts}


def run_ablation(config: ml_collections.ConfigDict, workdir: str | Path, *,
                 progress: bool = True) -> dict:
  """Trains every chosen row's bridge, then samples, reads and judges each beside real text
  and the oracle reads; writes report.md."""
  workdir, t0 = Path(workdir), time.perf_counter()
  chosen = chosen_rows(config)
  layer = interface_layer(config, workdir)
  timings, decoders = train_rows(config, workdir, chosen, layer, progress)
  b = Bench.load(config, workdir, layer)
  mesh, _ = mesh_and_rules(config)
  rows, head, oracle = {}, None, {}
  places = list(chosen)
  for i, (name, overrides) in enumerate(tqdm(chosen.items(), desc="ablate: eval",
                                             disable=not progress)):
    tick = time.perf_counter()
    bridge_name = TWINS.get(name, name)
    bridge = load_bridge(workdir / bridge_name, mesh)
    # the row's draws: its bridge's place among the chosen rows (a tolerant row's twin's)
    key = jax.random.fold_in(b.key, places.index(bridge_name) if bridge_name in chosen else i)
    if head is None:  # the same layer and normalizer in every row: one head
      head = current_token_head(bridge, b.judges.backbone.cfg.vocab_size)
      oracle = oracle_rows(b, head, b.reader)
    reader, own = b.reader, {}
    if name in decoders:
      reader = Readout(readout_backbone(workdir / name, b.judges.backbone, mesh), layer,
                       b.data.separator)
      own = {"decoder_val_nll": decoders[name],
             # identity reads the states at layer ℓ: the decoder does not change it
             "decoder_oracle": oracle_rows(b, head, reader, identity=False)}
    rows[name] = {**judge_row(b, bridge, head, row_config(config, overrides, layer),
                              key, reader), **own,
                  "eval_s": time.perf_counter() - tick}
  report = assemble_report(config, b, layer, rows, oracle, head,
                           dict(timings, total_s=time.perf_counter() - t0))
  reports.write_text(workdir / "report.md", summary(report) + "\n")
  return report


def assemble_report(config: ml_collections.ConfigDict, b: Bench, layer: int, rows: dict,
                    oracle: dict, head, timings: dict) -> dict:
  """report.json's contents: the rows at the headline β, the winner and the budget every
  row shared."""
  beta, all_matched = headline_beta(rows, oracle, betas(config))
  read = beta_key(beta)
  rows = {name: {**r, **r["reads"][read], "samples": r["samples_by_read"][read]}
          for name, r in rows.items()}
  winner = _winner(rows, b.real_row["entropy"])
  return {
      "rows": rows, "winner": winner, "real_text": b.real_row, "calibration": b.calibration,
      "oracle": {"joint": oracle[read], **oracle},
      "layer": layer, "num": config.eval.num, "length": int(b.real.shape[1]),
      "budget": {"steps": config.train.steps, "batch_size": config.train.batch_size,
                 "cache_windows": config.train.cache_windows, "lr": config.train.lr,
                 "sampler_steps": config.sample.steps,
                 "sampler": config.bridge.diffusion.sampler,
                 "eta": config.bridge.diffusion.eta},
      "readout": {"beta": beta, "all_matched": all_matched, "betas": betas(config),
                  "top_p": config.sample.top_p,
                  "untuned": {"beta": config.sample.beta,
                              "temperature": config.sample.temperature},
                  "head_temperature": head.temperature, "entropy_tolerance": ENTROPY_TOL},
      "verdict": _verdict(rows, winner, b.real_row),
      "timings": timings}


def headline_beta(rows: dict, oracle: dict, ladder: list[float]) -> tuple[float, bool]:
  """(β, every read matched): the largest β at which every row's and the oracle's joint read
  matched real text's entropy; failing that, the β with the most matched reads (the larger
  β on a tie)."""
  def matched(beta):
    reads = [r["reads"][beta_key(beta)] for r in rows.values()] + [oracle[beta_key(beta)]]
    return sum(r["entropy_matched"] for r in reads), len(reads)
  full = [beta for beta in ladder if matched(beta)[0] == matched(beta)[1]]
  if full:
    return max(full), True
  return max(ladder, key=lambda beta: (matched(beta)[0], beta)), False


def _with_separator(tokens: np.ndarray, given: np.ndarray) -> np.ndarray:
  """The identity head's tokens with position 0 (the known separator) restored."""
  out = tokens.copy()
  out[:, 0] = given[:, 0]
  return out


def _winner(rows: dict, target: float) -> str | None:
  """The lowest n-gram PPL among rows whose entropy is >= 0.9 x real's (None if no row is:
  lower perplexity at lower entropy is repetition, not a win)."""
  eligible = {n: r for n, r in rows.items() if r["entropy"] >= 0.9 * target}
  return min(eligible, key=lambda n: eligible[n]["ngram_ppl"]) if eligible else None


def _verdict(rows: dict, winner: str | None, real: dict) -> dict | None:
  """Does the winner beat unet_scratch on the n-gram judge outside the 95% intervals (None
  without that row), and how far is it from real text under each judge (None: no winner)."""
  if winner is None:
    return None
  w, u = rows[winner], rows.get("unet_scratch")
  return {"beats_unet_outside_ci": (None if u is None else
                                    bool(w["ngram_ppl_ci"][1] < u["ngram_ppl_ci"][0])),
          "ngram_vs_real": w["ngram_ppl"] / real["ngram_ppl"],
          "gen_ppl_vs_real": w["gen_ppl"] / real["gen_ppl"]}


def summary(report: dict) -> str:
  real, ro = report["real_text"], report["readout"]
  ladder, target = ", ".join(f"{v:g}" for v in ro["betas"]), (
      f"real text's entropy ({real['entropy']:.2f} nats ± {ENTROPY_TOL})")
  how = (f"the largest of {ladder} at which every row and the oracle reach {target}"
         if ro["all_matched"] else
         f"no β of {ladder} brings every row and the oracle to {target}; this one brings the most")
  lines = [f"Bridge ablation at layer {report['layer']}: {report['budget']['steps']} steps x "
           f"{report['budget']['batch_size']} windows of {report['length']} tokens per row, "
           f"{report['num']} samples; joint readout at β = {ro['beta']:g} ({how}), T bisected "
           "per row.", ""]
  header = ["row", "params", "T", "entropy", "gen PPL (self)", "n-gram PPL", "MAUVE", "spread",
            "x0-MSE t=0.3", "recovery t=0.3", "n-gram (untuned)", "n-gram (identity)"]
  table = [["real_text", "-", "-", _f(real["entropy"]), _ci(real, "gen_ppl"),
            _ci(real, "ngram_ppl"), _f(real.get("mauve")), "-", "-", "-", "-", "-"]]
  table += [[f"{name} (trivial)", "-", "-", _f(c["entropy"]), _ci(c, "gen_ppl"),
             _ci(c, "ngram_ppl"), _f(c.get("mauve")), "-", "-", "-", "-", "-"]
            for name, c in report.get("calibration", {}).items()]
  for name in ("joint", "identity"):
    o = report["oracle"][name]
    table.append([f"oracle ({name}, true states)", "-", _f(o.get("temperature")),
                  _f(o["entropy"]), _ci(o, "gen_ppl"), _ci(o, "ngram_ppl"), _f(o.get("mauve")),
                  "-", "-", "-", "-", f"{o['token_accuracy']:.1%} of tokens"])
  for name, r in report["rows"].items():
    table.append([name + (" (winner)" if name == report["winner"] else ""), f"{r['params']:,}",
                  _f(r["temperature"]), _f(r["entropy"]), _ci(r, "gen_ppl"),
                  _ci(r, "ngram_ppl"), _f(r.get("mauve")), _f(r["spread_ratio"]),
                  _f(r.get("val_mse_t0.3")), _f(r.get("recovery_t0.3")),
                  _ci(r["reads"]["joint_untuned"], "ngram_ppl"),
                  _ci(r["reads"]["identity"], "ngram_ppl")])
  lines.append(reports.markdown_table(header, table))
  v = report["verdict"]
  if v is None:
    lines += ["", "No winner: no row's entropy reaches 0.9x real text's at this β."]
  else:
    beats = v["beats_unet_outside_ci"]
    lines += ["", f"Winner {report['winner']}: n-gram PPL {v['ngram_vs_real']:.1f}x real "
              f"text's, gen PPL {v['gen_ppl_vs_real']:.1f}x; beats unet_scratch outside the 95% "
              f"intervals: {'n/a (no unet_scratch row)' if beats is None else beats}."]
  for name, r in report["rows"].items():
    if "decoder_oracle" in r:
      o = r["decoder_oracle"][beta_key(ro["beta"])]
      lines += ["", f"{name}'s tolerant decoder: its oracle (true states through it, joint at "
                f"β = {ro['beta']:g}) {_ci(o, 'ngram_ppl')} n-gram PPL @ {o['entropy']:.2f}, "
                f"{o['token_accuracy']:.1%} of tokens; validation NLL of the bridge's "
                f"estimates {r['decoder_val_nll']['plain_on_estimates']:.3f} plain -> "
                f"{r['decoder_val_nll']['adapted_on_estimates']:.3f} adapted (true states "
                f"{r['decoder_val_nll']['plain_on_true']:.3f} -> "
                f"{r['decoder_val_nll']['adapted_on_true']:.3f})."]
  lines += ["", "Every β (n-gram PPL [95% interval] @ entropy, T; * = not entropy-matched):", ""]
  by_beta = [["oracle (true states)"] + [_at(report["oracle"][beta_key(v)]) for v in ro["betas"]]]
  by_beta += [[name] + [_at(r["reads"][beta_key(v)]) for v in ro["betas"]]
              for name, r in report["rows"].items()]
  lines.append(reports.markdown_table(["row"] + [f"β = {v:g}" for v in ro["betas"]], by_beta))
  return "\n".join(lines)


def _at(read: dict) -> str:
  return (f"{_ci(read, 'ngram_ppl')} @ {read['entropy']:.2f}, T {read['temperature']:.2f}"
          + ("" if read["entropy_matched"] else " *"))


def _f(v) -> str:
  if v is None:
    return "-"
  return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def _ci(row: dict, key: str) -> str:
  lo, hi = row[f"{key}_ci"]
  return f"{_f(row[key])} [{_f(lo)}, {_f(hi)}]"
