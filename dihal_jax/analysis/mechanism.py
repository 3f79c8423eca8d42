"""`dihal mechanism`: what post-training into a masked diffusion model changed inside the backbone.

Three models on the same inputs:
  ar        the backbone (causal), on test windows
  mdm       the `dihal mdm` model (bidirectional), on the same windows with a share
            `mechanism.mask_rate` of positions replaced by its mask id
  ar_bidir  the backbone's weights under the MDM's bidirectional pattern, on the MDM's input:
            what the attention pattern alone changes, before any training

Measured per layer: linear CKA of each model's states with the AR's (analysis/similarity.py;
unmasked and masked positions separately), attention statistics per head
(analysis/attention_stats.py), the logit lens (final norm + LM head on h_l: next-token
accuracy for the AR model, masked-token accuracy for the MDM) and, on a local and a global
task (analysis/tasks.py), accuracy and the activation-patching profile over layers and heads
(analysis/patching.py). Writes report.json, report.md and cka.png, attention.png,
logit_lens.png, patching.png into the workdir.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats
from flax import nnx
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.analysis import attention_stats, similarity, tasks
from dihal_jax.analysis import trace as tracing
from dihal_jax.analysis.patching import Subject, patching_profile, read_logits
from dihal_jax.backbone import checkpoint
from dihal_jax.data.dataset import Data
from dihal_jax.errors import UserInputError
from dihal_jax.mdm.attention import bidirectional
from dihal_jax.mdm.objective import mask_tokens, token_logits
from dihal_jax.mdm.train import load_mdm

MODELS = ("ar", "mdm", "ar_bidir")
WORD = re.compile(r"^ ?[a-z]+$")  # copy task answers: lower-case words and word pieces


def check(m: ml_collections.ConfigDict, window: int) -> None:
  """Impossible `mechanism.*` settings, one line each."""
  def need(ok, message):
    if not ok:
      raise UserInputError(message)
  need(m.windows >= 2, f"--config.mechanism.windows={m.windows}: expected >= 2")
  need(0 < m.mask_rate < 1, f"--config.mechanism.mask_rate={m.mask_rate}: expected in (0, 1)")
  need(m.task_items >= 2, f"--config.mechanism.task_items={m.task_items}: expected >= 2")
  need(m.span >= 2, f"--config.mechanism.span={m.span}: expected >= 2")
  need(m.filler >= 1, f"--config.mechanism.filler={m.filler}: expected >= 1")
  need(m.masks >= 0, f"--config.mechanism.masks={m.masks}: expected >= 0")
  need(m.head_layers >= 0, f"--config.mechanism.head_layers={m.head_layers}: expected >= 0")
  need(2 <= m.bigram_position and m.bigram_position + m.masks <= window,
       f"--config.mechanism.bigram_position={m.bigram_position}: expected 2..data.window - "
       f"mechanism.masks = {window - m.masks}")
  need(2 * m.span + m.filler + m.masks <= window,
       f"--config.mechanism.filler={m.filler}: the copy task's rows (2 x span + filler + masks = "
       f"{2 * m.span + m.filler + m.masks}) are longer than data.window={window}")


def _word_tokens(stream: np.ndarray, tokenizer, top: int = 2000) -> np.ndarray:
  """The most frequent tokens of `stream` that decode to lower-case letters (a leading space
  allowed): words and word pieces, or letters under a byte tokenizer."""
  ids, counts = np.unique(stream, return_counts=True)
  frequent = ids[np.argsort(-counts)][:top]
  return np.array([t for t in frequent.tolist() if WORD.match(tokenizer.decode([t]))], np.int64)


def _acc_ci(correct: int, n: int) -> list[float]:
  ci = scipy.stats.binomtest(correct, n).proportion_ci(method="wilson")
  return [float(ci.low), float(ci.high)]


_trace = nnx.jit(tracing.trace, static_argnames=("emit",))


@nnx.jit(static_argnames=("shift",))
def _lens_predictions(model, states, shift: bool):
  """The logit lens: argmax of final norm + LM head on every layer's states [L, B, T, D],
  as predictions of token i at position i ([L, B, T]; `shift`: read at i - 1)."""
  return jax.lax.map(lambda h: jnp.argmax(token_logits(model.logits(h), shift), axis=-1), states)


def head_concentration(heads: dict[int, list[float]]) -> float:
  """Mean over the head-patched layers of the largest head's share of the layer's positive
  head restoration (1 = one head carries it, 1/N = spread evenly; nan without heads)."""
  shares = []
  for values in heads.values():
    positive = np.clip(np.asarray(values, np.float64), 0.0, None)
    if positive.sum() > 0:
      shares.append(positive.max() / positive.sum())
  return float(np.mean(shares)) if shares else float("nan")


def compare_layers(backbone, trained, tokens: jax.Array, *, mask_rate: float,
                   seed: int) -> dict:
  """CKA, attention statistics and the logit lens of `ar`, `mdm` and `ar_bidir` on `tokens`
  [B, T] (the MDM's input: each position but 0 masked with probability `mask_rate`)."""
  num_layers, window = backbone.cfg.num_layers, tokens.shape[1]
  t = jnp.full((len(tokens),), mask_rate)
  noisy, masked = mask_tokens(jax.random.key(seed), tokens, t, trained.mask_id)
  both = bidirectional(window)
  runs = {"ar": (backbone, tokens, None), "mdm": (trained.model, noisy, both),
          "ar_bidir": (backbone, noisy, both)}
  traced = {name: jax.tree.map(np.asarray, _trace(model, inputs, attention=pattern,
                                                  emit=("states", "probs"))[1])
            for name, (model, inputs, pattern) in runs.items()}
  masked = np.asarray(masked)
  positions = np.arange(window)[None] > 0
  unmasked = positions & ~masked
  cka = []
  for l in range(num_layers):
    ar = traced["ar"]["states"][l]
    row = {"layer": l + 1}
    for name, key in (("mdm", "cka"), ("ar_bidir", "cka_init")):
      other = traced[name]["states"][l]
      for where, suffix in ((unmasked, ""), (masked, "_masked")):
        x, y = ar[where], other[where]
        row[key + suffix] = similarity.linear_cka(x, y)
        row[f"{key}_normed{suffix}"] = similarity.linear_cka(similarity.rms_normalized(x),
                                                              similarity.rms_normalized(y))
    cka.append(row)

  attention, heads = [], {}
  queries = np.broadcast_to(positions, masked.shape)
  for name in MODELS:
    probs = traced[name]["probs"]  # [L, B, K, G, T, S]
    per_layer = [attention_stats.head_statistics(
        probs[l].reshape(len(tokens), -1, window, window), queries) for l in range(num_layers)]
    attention += [{"layer": l + 1, "model": name, **{k: float(v.mean()) for k, v in stats.items()}}
                  for l, stats in enumerate(per_layer)]
    heads[name] = {k: [stats[k].tolist() for stats in per_layer]
                   for k in attention_stats.STATISTICS}

  targets = np.asarray(tokens)
  ar_pred = np.asarray(_lens_predictions(backbone, jnp.asarray(traced["ar"]["states"]), True))
  masked_pred = {name: np.asarray(_lens_predictions(
      model, jnp.asarray(traced[name]["states"]), trained.shift))
      for name, model in (("mdm", trained.model), ("ar_bidir", backbone))}
  lens = [{"layer": l + 1,
           "ar_acc": float(np.mean(ar_pred[l][:, 1:] == targets[:, 1:])),
           "mdm_acc": float(np.mean(masked_pred["mdm"][l][masked] == targets[masked])),
           "init_acc": float(np.mean(masked_pred["ar_bidir"][l][masked] == targets[masked]))}
          for l in range(num_layers)]
  return {"tokens": {"unmasked": int(unmasked.sum()), "masked": int(masked.sum())},
          "cka": cka, "attention": attention, "attention_heads": heads, "logit_lens": lens}


def task_row(items: tasks.Items, backbone, trained, tokenizer, *, head_layers: int) -> dict:
  """Accuracy with its interval for `ar`, `mdm` and `ar_bidir`, and the patching profiles of
  `ar` and `mdm` on one task's items."""
  offset = 1 if trained.shift else 0
  pattern = bidirectional(items.clean.shape[1])
  subjects = {"ar": Subject(backbone, None, 1),
              "mdm": Subject(trained.model, pattern, offset)}
  profiles = {who: patching_profile(s, items, head_layers=head_layers)
              for who, s in subjects.items()}
  init_logits, _ = read_logits(backbone, jnp.asarray(items.clean), pattern, None,
                               items.position - offset)
  init_correct = int(np.sum(np.asarray(jnp.argmax(init_logits, -1)) == items.answer))
  n = len(items)
  row = {"items": n, "position": items.position, "cue": items.cue,
         "example": tokenizer.decode(items.clean[0, 1:items.position].tolist()),
         "answer": tokenizer.decode([int(items.answer[0])]),
         "init_acc": init_correct / n, "init_acc_ci": _acc_ci(init_correct, n)}
  for who, p in profiles.items():
    row[f"{who}_acc"] = p["accuracy"]
    row[f"{who}_acc_ci"] = _acc_ci(p["correct"], n)
  row["logit_difference"] = {who: {"clean": p["ld_clean"], "corrupt": p["ld_corrupt"]}
                             for who, p in profiles.items()}
  row["patching"] = {who: p["layers"] for who, p in profiles.items()}
  row["head_patching"] = {who: p["heads"] for who, p in profiles.items()}
  row["early_share"] = {who: p["early_share"] for who, p in profiles.items()}
  row["profile_correlation"] = float(scipy.stats.pearsonr(profiles["ar"]["layers"],
                                                          profiles["mdm"]["layers"])[0])
  row["head_concentration"] = {who: head_concentration(p["heads"]) for who, p in profiles.items()}
  return row


def run_mechanism(config: ml_collections.ConfigDict, workdir: str | Path, *,
                  progress: bool = True) -> dict:
  """The whole study (module docstring) into `workdir`; returns report.json's content."""
  workdir = Path(workdir)
  m = config.mechanism
  t0 = time.perf_counter()
  check(m, config.data.window)
  num_layers = checkpoint.backbone_config(config).num_layers
  if m.head_layers > num_layers:
    raise UserInputError(f"--config.mechanism.head_layers={m.head_layers}: the model has "
                         f"{num_layers} layers")
  mdm_dir = Path(m.mdm) if m.mdm else workdir / "mdm"
  trained = load_mdm(config, mdm_dir)
  data = Data.from_config(config, workdir)
  backbone = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  tokens = jnp.asarray(data.first_windows("test", m.windows))
  if len(tokens) < m.windows:
    raise UserInputError(f"--config.mechanism.windows={m.windows}: the test split has "
                         f"{len(tokens)} windows")
  layers = compare_layers(backbone, trained, tokens, mask_rate=m.mask_rate, seed=config.seed)

  train_stream = data.first_windows("train")[:, 1:].reshape(-1)
  test_stream = data.first_windows("test")[:, 1:].reshape(-1)
  common = dict(separator=data.separator, mask_id=trained.mask_id, masks=m.masks, seed=config.seed)
  try:
    task_items = {
        "bigram": tasks.bigram_items(train_stream, test_stream, num=m.task_items,
                                     position=m.bigram_position, **common),
        "copy": tasks.copy_items(test_stream, _word_tokens(train_stream, data.tokenizer),
                                 num=m.task_items, span=m.span, filler=m.filler, **common)}
  except ValueError as error:
    raise UserInputError(f"mechanism: {error} (fewer --config.mechanism.task_items?)") from None
  task_rows = {name: task_row(items, backbone, trained, data.tokenizer,
                              head_layers=m.head_layers)
               for name, items in tqdm(task_items.items(), desc="tasks", disable=not progress)}

  report = {"mdm": {"workdir": str(mdm_dir), "step": trained.step, "mask_id": trained.mask_id,
                    "shift": trained.shift},
            "windows": int(len(tokens)), "mask_rate": m.mask_rate, **layers,
            "tasks": task_rows, "timings": {"total_s": time.perf_counter() - t0}}
  reports.write_text(workdir / "report.md", summary(report))
  plot(report, workdir)
  return report


def summary(report: dict) -> str:
  """report.md: the tasks, then one row per layer."""
  mdm = report["mdm"]
  lines = [f"# Mechanism: the AR backbone vs its masked diffusion model (step {mdm['step']})", "",
           f"{report['windows']} test windows, {report['tokens']['masked']} positions masked for "
           f"the MDM (rate {report['mask_rate']}), {report['tokens']['unmasked']} unmasked. "
           "`ar_bidir` = the backbone's weights under the MDM's bidirectional attention, untrained.",
           "", "## Tasks", ""]
  rows = []
  for name, t in report["tasks"].items():
    ci = lambda who: f"{t[who + '_acc']:.2f} [{t[who + '_acc_ci'][0]:.2f}, {t[who + '_acc_ci'][1]:.2f}]"
    peak = lambda who: 1 + int(np.argmax(t["patching"][who]))
    rows.append([name, t["items"], t["position"] - t["cue"], ci("ar"), ci("mdm"), ci("init"),
                 t["early_share"]["ar"], t["early_share"]["mdm"], peak("ar"), peak("mdm"),
                 t["profile_correlation"], t["head_concentration"]["ar"],
                 t["head_concentration"]["mdm"]])
  lines.append(reports.markdown_table(
      ["task", "items", "cue distance", "AR acc [95% CI]", "MDM acc", "ar_bidir acc",
       "early share AR", "early share MDM", "peak layer AR", "peak layer MDM",
       "profile r (AR, MDM)", "top head share AR", "top head share MDM"], rows))
  lines += ["", "## Per layer", ""]
  attention = {(r["model"], r["layer"]): r for r in report["attention"]}
  rows = []
  for c, lens in zip(report["cka"], report["logit_lens"]):
    l = c["layer"]
    rows.append([l, c["cka_normed"], c["cka_normed_masked"], c["cka_init_normed"], c["cka"],
                 lens["ar_acc"], lens["mdm_acc"], lens["init_acc"],
                 attention[("ar", l)]["mean_distance"], attention[("mdm", l)]["mean_distance"],
                 attention[("ar", l)]["entropy"], attention[("mdm", l)]["entropy"],
                 attention[("mdm", l)]["future"]]
                + [report["tasks"][name]["patching"][who][l - 1]
                   for name in report["tasks"] for who in ("ar", "mdm")])
  patch_header = [f"patch {name} {who}" for name in report["tasks"] for who in ("AR", "MDM")]
  lines.append(reports.markdown_table(
      ["layer", "CKA (normed)", "CKA masked (normed)", "CKA ar_bidir (normed)", "CKA raw", "lens AR",
       "lens MDM", "lens ar_bidir", "distance AR", "distance MDM", "entropy AR", "entropy MDM",
       "future MDM"] + patch_header, rows))
  return "\n".join(lines) + "\n"


def plot(report: dict, workdir: Path) -> None:
  """cka.png, attention.png (per-head heat maps), logit_lens.png, patching.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = [r["layer"] for r in report["cka"]]
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for key, label in (("cka_normed", "MDM, unmasked"), ("cka_normed_masked", "MDM, masked"),
                     ("cka_init_normed", "ar_bidir, unmasked"), ("cka", "MDM, unmasked, raw")):
    ax.plot(layers, [r[key] for r in report["cka"]], "o-", ms=3, label=label,
            ls=":" if key == "cka" else "-")
  ax.set(xlabel="layer", ylabel="linear CKA with the AR model (tokens RMS-normed)",
         ylim=(0, 1.02))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  reports.save_figure(fig, workdir / "cka.png")

  fig, axes = plt.subplots(2, 3, figsize=(12, 7), sharey=True)
  for row, stat in enumerate(("mean_distance", "entropy")):
    values = {name: np.array(report["attention_heads"][name][stat]) for name in MODELS}
    top = max(v.max() for v in values.values())
    for col, name in enumerate(MODELS):
      image = axes[row, col].imshow(values[name], aspect="auto", origin="lower", vmin=0, vmax=top,
                                    extent=(-0.5, values[name].shape[1] - 0.5, 0.5,
                                            values[name].shape[0] + 0.5))
      axes[row, col].set(title=f"{name}: {stat.replace('_', ' ')}", xlabel="head")
      fig.colorbar(image, ax=axes[row, col])
    axes[row, 0].set_ylabel("layer")
  fig.tight_layout()
  reports.save_figure(fig, workdir / "attention.png")

  fig, ax = plt.subplots(figsize=(7, 3.8))
  for key, label in (("ar_acc", "AR: next token"), ("mdm_acc", "MDM: masked token"),
                     ("init_acc", "ar_bidir: masked token")):
    ax.plot(layers, [r[key] for r in report["logit_lens"]], "o-", ms=3, label=label)
  ax.set(xlabel="layer", ylabel="logit-lens accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  reports.save_figure(fig, workdir / "logit_lens.png")

  names = list(report["tasks"])
  fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    for who in ("ar", "mdm"):
      ax.plot(layers, report["tasks"][name]["patching"][who], "o-", ms=3, label=who)
    ax.axvline(np.ceil(len(layers) / 3) + 0.5, color="gray", lw=0.8, ls="--")
    ax.set(title=f"{name}: restoration by patching one block", xlabel="layer",
           ylabel="restored share of the logit difference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  reports.save_figure(fig, workdir / "patching.png")
