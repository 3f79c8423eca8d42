"""`dihal dglm`: train DGLM on labelled passages and measure attribute control.

Stages (each resumable; the workdir keeps what is done):
1. passages of the books (dglm/passages.py) and their sentence latents (all-MiniLM-L6-v2,
   the judges' encoder), cached in latents.npz;
2. linear latent classifiers per attribute (dglm/attributes.py);
3. the soft-prompt projector and the LoRA adapters of the backbone (dglm/soft_prompt.py) -> projector/;
4. the latent denoiser (dglm/latent_diffusion.py) -> latent_denoiser/;
5. with dglm.bridge_steps > 0, DiHAL's bridge at l trained on the same passages with their
   attribute labels (dglm/bridge_guidance.py) -> dihal_cfg/;
6. rows of continuations of the same balanced test prefixes, judged for fluency
   (eval/judges.py: backbone PPL, an n-gram LM fit on these books' train split, entropy)
   and for attributes by the independent text judge -> report.json, report.md,
   samples.md, control.png.

Besides the rows, the teacher-forced continuation NLL of the backbone alone, after the
soft prompt of a zero latent, and after that of the true continuation's latent: how much the
latent tells the decoder.

Rows: `real_text` (the true continuations), `ar_backbone` (the backbone continues the
prefix), `ar_prompted/T` (a plain instruction naming target T precedes the prefix),
`dglm_true_latent` (the decoder given the true continuation's latent: the readout's
oracle), `dglm` (a latent proposed from the prefix), `dglm_guided/T` (proposed with
classifier guidance toward T), `dglm_guided/T0@s` for the scale sweep of the first
target; with the bridge, `dihal` (its unguided continuations, read out by sample.readout)
and `dihal_cfg/T` (classifier-free guidance toward T, weight dglm.bridge_guidance); last,
`dglm_target_latent/T` (every prefix given the latent of another real test continuation
that carries T: the guided rows' oracle, the steering the decoder can show at all).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from dihal_jax import reports
from dihal_jax.backbone import checkpoint
from dihal_jax.backbone.lora import parse_targets
from dihal_jax.bridge.train_step import init_train_state, make_optimizer
from dihal_jax.bridge.training_loop import Cadence, run_loop
from dihal_jax.data.dataset import cache_root
from dihal_jax.bridge.train import interface_layer
from dihal_jax.dglm import bridge_guidance, latent_diffusion, soft_prompt, trained
from dihal_jax.dglm.trained import attribute_values
from dihal_jax.dglm.attributes import LatentClassifier, TextJudge, parse_target, target_name
from dihal_jax.dglm.passages import Passages, load_passages, parse_books
from dihal_jax.errors import UserInputError
from dihal_jax.eval.encoder import SentenceEncoder
from dihal_jax.eval.judges import Judges
from dihal_jax.parallel.sharding import batch_sharding, mesh_and_rules, put_global

SPLITS = ("train", "validation", "test")
STATE_SECTIONS = ("seed", "model", "data", "dglm")
RESUMABLE = ("dglm.steps", "dglm.denoiser_steps", "dglm.num", "dglm.targets", "dglm.scale",
             "dglm.scale_sweep", "dglm.temperature", "dglm.top_p", "dglm.sampler_steps",
             "dglm.prefix_guidance", "dglm.test_windows", "dglm.log_every",
             "dglm.checkpoint_every", "dglm.bridge_steps", "dglm.bridge_guidance",
             "dglm.bridge_label_dropout", "data.cache_dir")
# The bridge's checkpoint: its length may grow, its label dropout may not change.
BRIDGE_SECTIONS = STATE_SECTIONS + ("bridge", "train")
BRIDGE_RESUMABLE = tuple(f for f in RESUMABLE if f != "dglm.bridge_label_dropout") + (
    "train.steps", "train.log_every", "train.val_every", "train.checkpoint_every")
# Key streams: each row samples with fold_in(key(seed), ROW_STREAM + its index); the
# proposals of a row with fold_in(that key, PROPOSAL_STREAM), its text with the key itself.
ROW_STREAM = 100
PROPOSAL_STREAM = 1


def check(d: ml_collections.ConfigDict) -> None:
  """One `dihal: error:` line for a bad dglm section (before anything loads)."""
  positive = ("prefix", "continuation", "vectors", "hidden", "steps", "batch_size",
              "denoiser_steps", "denoiser_batch", "width", "blocks", "num", "sampler_steps",
              "train_windows", "test_windows", "log_every", "checkpoint_every")
  for name in positive:
    if d[name] < 1:
      raise UserInputError(f"--config.dglm.{name}={d[name]}: expected >= 1")
  if d.lora_rank < 0 or d.lora_alpha <= 0:
    raise UserInputError(f"--config.dglm.lora_rank={d.lora_rank}, lora_alpha={d.lora_alpha}: "
                         "expected rank >= 0 (0 = the backbone frozen) and alpha > 0")
  parse_targets(d.lora_targets)
  for name in ("scale", "prefix_guidance", "latent_noise", "bridge_guidance"):
    if d[name] < 0:
      raise UserInputError(f"--config.dglm.{name}={d[name]}: expected >= 0")
  if any(s < 0 for s in d.scale_sweep):
    raise UserInputError(f"--config.dglm.scale_sweep={tuple(d.scale_sweep)}: expected "
                         "scales >= 0")
  if d.bridge_steps < 0:
    raise UserInputError(f"--config.dglm.bridge_steps={d.bridge_steps}: expected >= 0 (0 = no "
                         "dihal rows)")
  for name in ("latent_dropout", "cond_dropout", "bridge_label_dropout"):
    if not 0 <= d[name] < 1:
      raise UserInputError(f"--config.dglm.{name}={d[name]}: expected in [0, 1)")
  if not 0 < d.top_p <= 1 or d.temperature < 0:
    raise UserInputError(f"--config.dglm.top_p={d.top_p}, temperature={d.temperature}: "
                         "expected 0 < top_p <= 1 and temperature >= 0")
  if d.num % 2:
    raise UserInputError(f"--config.dglm.num={d.num}: expected an even number (half the "
                         "prefixes from each of the first two books)")
  targets(d)


def targets(d) -> list:
  """The dglm.targets, parsed against the config's attribute values."""
  specs = [s for s in (p.strip() for p in d.targets.split(",")) if s]
  if not specs:
    raise UserInputError("--config.dglm.targets is empty: name at least one attribute=value")
  return [parse_target(s, attribute_values(d)) for s in specs]


def _encode_latents(encoder: SentenceEncoder, tokenizer, passages: Passages) -> dict:
  prefix_text = tokenizer.batch_decode(passages.prefixes[:, 1:])
  continuation_text = tokenizer.batch_decode(passages.continuations)
  return {"prefix": encoder(prefix_text), "continuation": encoder(continuation_text)}


def latents(path: Path, passages: dict[str, Passages], encoder, tokenizer) -> dict:
  """{split: {"prefix", "continuation"}} unit latents, cached in `path` for these windows."""
  if path.is_file():
    with np.load(path) as saved:
      if all(np.array_equal(saved[f"{s}_tokens"], p.tokens) for s, p in passages.items()):
        return {s: {k: saved[f"{s}_{k}"] for k in ("prefix", "continuation")} for s in passages}
  out = {s: _encode_latents(encoder, tokenizer, p) for s, p in passages.items()}
  arrays = {f"{s}_{k}": v for s, parts in out.items() for k, v in parts.items()}
  arrays.update({f"{s}_tokens": p.tokens for s, p in passages.items()})
  reports.write_arrays(path, arrays)
  return out


def train_projector(config, workdir: Path, backbone, train: Passages, train_z, val: Passages,
                    val_z, progress: bool):
  """The soft-prompt projector, resumably (projector/); returns its EMA module and log."""
  d = config.dglm
  optim_cfg = trained.projector_optim(d)
  optimizer = make_optimizer(optim_cfg)
  mesh, rules = mesh_and_rules(config)
  key = trained.replicate(jax.random.key(config.seed), mesh)
  tokens, latent = train.tokens, train_z

  def step(state, index):
    batch = put_global((tokens[index], latent[index]),
                       (batch_sharding(mesh, rules, 2), batch_sharding(mesh, rules, 2)))
    state, metrics = soft_prompt.train_step(
        state, backbone, *batch, key, prefix=d.prefix, optimizer=optimizer,
        optim_cfg=optim_cfg, noise=d.latent_noise, dropout=d.latent_dropout)
    return state, metrics, index.size * tokens.shape[1]

  val_tokens, val_latent = jnp.asarray(val.tokens), jnp.asarray(val_z)
  result = run_loop(
      trained.replicate(init_train_state(trained.new_projector(config, backbone)(), optimizer),
                        mesh),
      workdir=workdir / "projector",
      batches=trained.index_batches(len(tokens), d.batch_size, config.seed), step=step,
      validate=lambda s: soft_prompt.validation_nll(s.model(ema=True), backbone, val_tokens,
                                                    val_latent, prefix=d.prefix),
      optim_cfg=optim_cfg, cadence=Cadence(d.steps, d.log_every, d.checkpoint_every,
                                           d.checkpoint_every, 2),
      checkpoint_config=config.to_dict(), sections=STATE_SECTIONS, resumable_changes=RESUMABLE,
      extra={}, desc="projector", progress=progress).finished("the projector")
  return result.state.model(ema=True), result.rows


def train_denoiser(config, workdir: Path, train_z: dict, val_z: dict, progress: bool):
  """The latent denoiser, resumably (latent_denoiser/); returns its EMA module and log."""
  d = config.dglm
  optim_cfg = trained.denoiser_optim(d)
  optimizer = make_optimizer(optim_cfg)
  cfg = trained.diffusion_config(d)
  mesh, rules = mesh_and_rules(config)
  key = trained.replicate(jax.random.key(config.seed + 1), mesh)
  cont, pre = train_z["continuation"], train_z["prefix"]

  def step(state, index):
    batch = put_global((cont[index], pre[index]),
                       (batch_sharding(mesh, rules, 2), batch_sharding(mesh, rules, 2)))
    state, metrics = latent_diffusion.train_step(state, *batch, key, cfg=cfg,
                                                 optimizer=optimizer, optim_cfg=optim_cfg,
                                                 cond_dropout=d.cond_dropout)
    return state, metrics, index.size

  val_cont, val_pre = jnp.asarray(val_z["continuation"]), jnp.asarray(val_z["prefix"])
  every = max(1, d.denoiser_steps // 10)
  result = run_loop(
      trained.replicate(init_train_state(trained.new_denoiser(config)(), optimizer), mesh),
      workdir=workdir / "latent_denoiser",
      batches=trained.index_batches(len(cont), d.denoiser_batch, config.seed), step=step,
      validate=lambda s: latent_diffusion.validation_loss(s.model(ema=True), val_cont, val_pre,
                                                          key, cfg=cfg),
      optim_cfg=optim_cfg, cadence=Cadence(d.denoiser_steps, every, every, every, 2),
      checkpoint_config=config.to_dict(), sections=STATE_SECTIONS, resumable_changes=RESUMABLE,
      extra={}, desc="latent denoiser", progress=progress).finished("the latent denoiser")
  return result.state.model(ema=True), result.rows


def balanced_rows(test: Passages, num: int, seed: int) -> np.ndarray:
  """Indices of num test passages, half from each of the first two books (a seeded draw)."""
  rng = np.random.default_rng(seed)
  picks = []
  for book in (0, 1):
    rows = np.flatnonzero(test.labels["book"] == book)
    if len(rows) < num // 2:
      raise UserInputError(f"--config.dglm.num={num}: the test split has {len(rows)} windows "
                           f"of {test.values['book'][book]}; lower num or raise test_windows")
    picks.append(np.sort(rng.choice(rows, num // 2, replace=False)))
  return np.concatenate(picks)


def on_target_latents(test: Passages, latents: np.ndarray, target, exclude: np.ndarray,
                      num: int, seed: int) -> np.ndarray | None:
  """num latents of real test continuations that carry every attribute of `target`, drawn
  with replacement from the test passages outside `exclude` (the prefixes' own); None when
  there are none. Given to the decoder they are what a perfectly steered proposal is, so its
  row is the guided rows' oracle: the accuracy the decoder reaches when the latent is right."""
  carries = np.all([test.labels[a] == v for a, v in target], axis=0)
  carries[exclude] = False
  rows = np.flatnonzero(carries)
  if not len(rows):
    return None
  return latents[np.random.default_rng(seed).choice(rows, num)]


def instruction(target, values) -> str:
  """The plain-language request of `ar_prompted` for a target."""
  words = {"dialogue": "is dialogue, characters speaking in quotation marks",
           "narration": "is narration, with no dialogue"}
  parts = []
  for name, value in target:
    text = values[name][value]
    parts.append(words.get(text, f"is from {text.replace('_', ' ').title()}"))
  return "The following passage " + " and ".join(parts) + ".\n\n"


def _accuracy(hits: np.ndarray) -> dict:
  ci = scipy.stats.binomtest(int(hits.sum()), len(hits)).proportion_ci(0.95, "wilson")
  return {"attribute_accuracy": float(hits.mean()),
          "attribute_accuracy_ci": [float(ci.low), float(ci.high)]}


def run_dglm(config: ml_collections.ConfigDict, workdir: str | Path, *,
             progress: bool = True) -> dict:
  """The whole pipeline (module docstring) into `workdir`; returns report.json's content."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  d = config.dglm
  t0 = time.perf_counter()
  check(d)
  if d.bridge_steps:
    bridge_guidance.check(config)
  books = parse_books(d.books)
  goals = targets(d)
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  tokenizer = checkpoint.load_tokenizer(ckpt)
  if tokenizer is None:
    raise UserInputError(f"{ckpt}: the checkpoint has no tokenizer; dglm needs one")
  separator = checkpoint.separator_id(tokenizer, config)
  passages = load_passages(books, tokenizer, separator=separator, prefix=d.prefix,
                           continuation=d.continuation, fractions=config.data.splits.to_dict(),
                           seed=config.seed,
                           per_book={"train": d.train_windows, "validation": d.batch_size * 8,
                                     "test": d.test_windows})
  values = passages["train"].values
  judges = Judges.build(checkpoint.load_backbone(config, ckpt), tokenizer,
                        passages["train"].tokens, order=config.eval.ngram_order,
                        encoder=config.eval.encoder, cache=cache_root(config),
                        batch=config.sample.batch, seed=config.seed)
  backbone = judges.backbone
  z = latents(workdir / "latents.npz", passages, judges.encoder, tokenizer)
  classifiers = {a: LatentClassifier.fit(z["train"]["continuation"], passages["train"].labels[a],
                                         len(v), config.seed) for a, v in values.items()}
  trained.save_classifiers(workdir / "classifiers.npz", classifiers)
  projector, projector_rows = train_projector(config, workdir, backbone, passages["train"],
                                              z["train"]["continuation"], passages["validation"],
                                              z["validation"]["continuation"], progress)
  denoiser, denoiser_rows = train_denoiser(config, workdir, z["train"], z["validation"], progress)
  bridge = None
  if d.bridge_steps:
    bridge = bridge_guidance.train(config, workdir, backbone, passages,
                                   interface_layer(config, workdir), separator,
                                   sections=BRIDGE_SECTIONS, resumable=BRIDGE_RESUMABLE,
                                   progress=progress)

  train_text = tokenizer.batch_decode(passages["train"].continuations)
  text_judge = TextJudge(train_text, passages["train"].labels, config.seed)
  test_rows = balanced_rows(passages["test"], d.num, config.seed)
  test = passages["test"].take(test_rows)
  test_z = _encode_latents(judges.encoder, tokenizer, test)
  cfg = trained.diffusion_config(d)
  base_key = jax.random.key(config.seed)
  start = 1 + d.prefix

  def sample_kw(index):
    return dict(length=d.continuation, key=jax.random.fold_in(base_key, ROW_STREAM + index),
                temperature=d.temperature, top_p=d.top_p)

  def propose(index, steer=(), scale=0.0):
    key = jax.random.fold_in(jax.random.fold_in(base_key, ROW_STREAM + index), PROPOSAL_STREAM)
    return latent_diffusion.propose(denoiser, jnp.asarray(test_z["prefix"]), key, cfg,
                                    steer=steer, scale=scale)

  def steer(target):
    return [(classifiers[a], v) for a, v in target]

  prompts = test.prefixes

  def decode(index, latent):
    return soft_prompt.write(backbone, projector, prompts, latent, **sample_kw(index)), latent

  # Each maker: row index -> (continuations [N, C], the latents they were written from or None).
  makers = {
      "real_text": lambda i: (test.continuations, test_z["continuation"]),
      "ar_backbone": lambda i: (soft_prompt.write(backbone, None, prompts, None, **sample_kw(i)),
                                None),
      "dglm_true_latent": lambda i: decode(i, test_z["continuation"]),
      "dglm": lambda i: decode(i, propose(i)),
  }
  for target in goals:
    name = target_name(target, values)
    intro = np.asarray(tokenizer(instruction(target, values), add_special_tokens=False)
                       ["input_ids"], np.int32)
    prompted = np.concatenate([prompts[:, :1], np.broadcast_to(intro, (len(prompts), len(intro))),
                               prompts[:, 1:]], axis=1)
    makers[f"ar_prompted/{name}"] = (
        lambda i, prompted=prompted: (soft_prompt.write(backbone, None, prompted, None,
                                                        **sample_kw(i)), None))
    makers[f"dglm_guided/{name}"] = (
        lambda i, target=target: decode(i, propose(i, steer(target), d.scale)))
  first = target_name(goals[0], values)
  for s in d.scale_sweep:
    makers[f"dglm_guided/{first}@{s:g}"] = (
        lambda i, s=s: decode(i, propose(i, steer(goals[0]), s)))
  if bridge is not None:
    labels = bridge_guidance.Labels(values)

    def bridge_rows(index, target=None):
      ids = None if target is None else labels.of_target(target, len(prompts))
      return bridge_guidance.continuations(
          bridge, backbone, config, prompts, d.continuation, separator,
          jax.random.fold_in(base_key, ROW_STREAM + index), class_ids=ids,
          guidance=d.bridge_guidance), None

    makers["dihal"] = bridge_rows
    for target in goals:
      makers[f"dihal_cfg/{target_name(target, values)}"] = (
          lambda i, target=target: bridge_rows(i, target))

  # Appended after every other row so that their sampling keys (row indices) stay put.
  for target in goals:
    oracle = on_target_latents(passages["test"], z["test"]["continuation"], target, test_rows,
                               d.num, config.seed)
    if oracle is not None:
      makers[f"dglm_target_latent/{target_name(target, values)}"] = (
          lambda i, oracle=oracle: decode(i, oracle))

  test_tokens, true_latent = jnp.asarray(test.tokens), jnp.asarray(test_z["continuation"])
  nll = {"backbone": float(soft_prompt.continuation_nll(
             backbone, jnp.zeros((d.num, 0, backbone.cfg.hidden_size)), test_tokens, d.prefix)),
         **{name: float(soft_prompt.validation_nll(projector, backbone, test_tokens, latent,
                                                   prefix=d.prefix))
            for name, latent in (("no_latent", jnp.zeros_like(true_latent)),
                                 ("true_latent", true_latent))}}
  reference = test_z["continuation"]  # the judges' features of the real continuations
  results, samples = {}, {}
  for index, (row, make) in enumerate(makers.items()):
    continuation, latent = make(index)
    continuation = np.asarray(continuation)
    tokens = np.concatenate([prompts, continuation], axis=1)
    texts = tokenizer.batch_decode(continuation)
    written = judges.features(tokens, start)
    score = judges.score(tokens, start=start, reference=reference, features=written)
    row_target = (parse_target(row.split("/", 1)[1].split("@")[0], values) if "/" in row
                  else goals[0])
    rates = {target_name(t, values): _accuracy(text_judge.hits(texts, t)) for t in goals}
    results[row] = {"attribute": "+".join(a for a, _ in row_target),
                    "value": "+".join(values[a][v] for a, v in row_target),
                    **_accuracy(text_judge.hits(texts, row_target)), "rates": rates, **score}
    if latent is not None:  # did the proposal itself carry the target (latent classifiers)?
      latent = np.asarray(latent)
      hits = np.all([classifiers[a].predict(latent) == v for a, v in row_target], axis=0)
      results[row]["latent_target_rate"] = float(hits.mean())
    if row != "real_text":  # how close the written text's latent is to the true continuation's
      results[row]["latent_cosine_to_true"] = float(np.mean(np.sum(written * reference, axis=-1)))
    samples[row] = [tokenizer.decode(p[1:]) + " ‖ " + t for p, t in zip(prompts[:3], texts[:3])]

  real_pred = text_judge.predict(tokenizer.batch_decode(passages["test"].continuations))
  report = {
      "books": books, "targets": [target_name(t, values) for t in goals],
      "scale": d.scale, "prefix_guidance": d.prefix_guidance, "num": d.num,
      **({"bridge": {"layer": bridge.layer, "steps": bridge.step, "guidance": d.bridge_guidance,
                     "label_dropout": d.bridge_label_dropout, "readout": config.sample.readout}}
         if bridge is not None else {}),
      "prefix_tokens": d.prefix, "continuation_tokens": d.continuation,
      "decoder": {"vectors": d.vectors, "projector_steps": d.steps, "lora_rank": d.lora_rank,
                  **({"lora_alpha": d.lora_alpha, "lora_targets": d.lora_targets}
                     if d.lora_rank else {})},
      "judge_accuracy_on_real_test": {a: float(np.mean(real_pred[a] == y))
                                      for a, y in passages["test"].labels.items()},
      "latent_classifier_accuracy_on_test": {
          a: c.accuracy(z["test"]["continuation"], passages["test"].labels[a])
          for a, c in classifiers.items()},
      "label_rates": {split: {a: float(np.mean(y)) for a, y in p.labels.items()}
                      for split, p in passages.items()},
      "windows": {split: int(len(p.tokens)) for split, p in passages.items()},
      "teacher_forced_nll": nll,
      "training": {"projector": projector_rows[-1], "latent_denoiser": denoiser_rows[-1]},
      "results": results, "timings": {"total_s": time.perf_counter() - t0}}
  reports.write_json(workdir / "report.json", report)
  reports.write_text(workdir / "report.md", summary(report))
  reports.write_text(workdir / "samples.md", _samples(samples))
  plot(report, workdir / "control.png")
  return report


def _fmt_ci(row: dict, key: str, digits: int = 1) -> str:
  lo, hi = row[f"{key}_ci"]
  return f"{row[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summary(report: dict) -> str:
  header = ("row", "target", "attribute acc. [95% CI]", "n-gram PPL", "gen PPL (backbone)",
            "entropy", "MAUVE")
  rows = [(name, f"{r['attribute']}={r['value']}", _fmt_ci(r, "attribute_accuracy", 2),
           _fmt_ci(r, "ngram_ppl"), _fmt_ci(r, "gen_ppl"), f"{r['entropy']:.2f}",
           f"{r['mauve']:.3f}") for name, r in report["results"].items()]
  judge = ", ".join(f"{a} {v:.2f}" for a, v in report["judge_accuracy_on_real_test"].items())
  nll = report["teacher_forced_nll"]
  latent = ", ".join(f"{a} {v:.2f}"
                     for a, v in report["latent_classifier_accuracy_on_test"].items())
  return "\n".join([
      "# DGLM attribute control", "",
      f"{report['num']} test prefixes ({report['prefix_tokens']} tokens, half from each book), "
      f"{report['continuation_tokens']} tokens generated per row; classifier-guidance scale "
      f"{report['scale']}, prefix guidance {report['prefix_guidance']}." + _decoder_line(report)
      + _bridge_line(report),
      "",
      f"Independent text judge's accuracy on real test continuations: {judge}. "
      f"Latent classifiers' accuracy on test latents: {latent}.", "",
      "Continuation NLL (nats/token, teacher forced) on these prefixes: backbone alone "
      f"{nll['backbone']:.3f}, soft prompt of a zero latent {nll['no_latent']:.3f}, of the "
      f"true continuation's latent {nll['true_latent']:.3f}.", "",
      reports.markdown_table(header, rows), ""])


def _decoder_line(report: dict) -> str:
  d = report["decoder"]
  adapters = (f", LoRA rank {d['lora_rank']} (alpha {d['lora_alpha']:g}) on "
              f"{d['lora_targets']}" if d["lora_rank"] else ", the backbone frozen")
  return (f" Decoder: {d['vectors']} soft-prompt vectors, projector trained "
          f"{d['projector_steps']} steps{adapters}.")


def _bridge_line(report: dict) -> str:
  b = report.get("bridge")
  if not b:
    return ""
  return (f" DiHAL rows: the bridge at layer {b['layer']} ({b['steps']} steps, each attribute "
          f"of its labels dropped with p = {b['label_dropout']}), read out by {b['readout']}, "
          f"classifier-free guidance w = {b['guidance']}.")


def _samples(samples: dict) -> str:
  lines = ["# Samples (prefix ‖ continuation)", ""]
  for row, texts in samples.items():
    lines += [f"## {row}", ""] + [f"- {json.dumps(t, ensure_ascii=False)}" for t in texts] + [""]
  return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
  """Attribute accuracy vs n-gram PPL per row (with CIs)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, r in report["results"].items():
    lo, hi = r["attribute_accuracy_ci"]
    plo, phi = r["ngram_ppl_ci"]
    ax.errorbar(r["ngram_ppl"], r["attribute_accuracy"],
                yerr=[[r["attribute_accuracy"] - lo], [hi - r["attribute_accuracy"]]],
                xerr=[[r["ngram_ppl"] - plo], [phi - r["ngram_ppl"]]], fmt="o", capsize=2)
    ax.annotate(name, (r["ngram_ppl"], r["attribute_accuracy"]), fontsize=6)
  ax.set_xscale("log")
  ax.set_xlabel("n-gram PPL (lower = more fluent)")
  ax.set_ylabel("attribute accuracy (independent judge)")
  ax.set_ylim(0, 1.02)
  reports.save_figure(fig, path)
