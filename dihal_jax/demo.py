"""`make demo` / `dihal demo`: the main job on the embedded SmolLM2, as far as it exists.

Today: load and convert the embedded model, check parity with
`transformers`, continue a few Austen openings with the KV-cache generator,
and locate the diffusion-friendly layer with the geometry proxies. Writes
report.json, report.md, parity.png and geometry.png into the workdir. Later
milestones (the bridge, hybrid sampling, evaluation) extend this.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dihal_jax import reports  # noqa: E402
from dihal_jax.backbone import checkpoint, parity  # noqa: E402
from dihal_jax.backbone.generate import generate  # noqa: E402
from dihal_jax.geometry import locate  # noqa: E402

DEMO_PROMPTS = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "It is a truth universally acknowledged, that a single man in possession",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who",
)


def generate_text(config: ml_collections.ConfigDict, workdir: Path, prompts, max_new_tokens: int,
                  temperature: float, top_p: float) -> dict:
  """Continues each prompt (batched, left-padded) with the backbone."""
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  tokenizer = checkpoint.load_tokenizer(ckpt)
  if tokenizer is None:
    from dihal_jax.errors import UserInputError
    raise UserInputError(f"{ckpt}: checkpoint has no tokenizer; generate needs text")
  model = checkpoint.load_backbone(config, ckpt)
  prompts = list(prompts) or list(DEMO_PROMPTS)
  sep = checkpoint.separator_id(tokenizer, config)
  encoded = [[sep] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  width = max(map(len, encoded))
  pad = model.cfg.pad_token_id or 0
  tokens = [[pad] * (width - len(e)) + e for e in encoded]
  mask = [[False] * (width - len(e)) + [True] * len(e) for e in encoded]
  out = generate(model, jax.numpy.asarray(tokens), jax.numpy.asarray(mask),
                 max_new_tokens=max_new_tokens, key=jax.random.key(config.seed),
                 temperature=temperature, top_p=top_p, eos_id=model.cfg.eos_token_id,
                 pad_id=pad)
  texts = tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)
  return {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
          "samples": [{"prompt": p, "continuation": t} for p, t in zip(prompts, texts)]}


def plot_hidden_diff(report: dict, path: Path):
  diffs = report["hidden_max_abs_diff"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.semilogy(range(len(diffs)), [max(d, 1e-12) for d in diffs], marker="o")
  ax.set_xlabel("layer l (h_0 = embeddings; last = after final norm, as HF reports it)")
  ax.set_ylabel("max |h_l(jax) - h_l(torch)|")
  ax.set_title(f"Backbone parity, fp32: mean KL {report['mean_kl']:.2g}, "
               f"max |Δlogit| {report['max_abs_logit_diff']:.2g}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_demo(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  print("dihal demo: backbone + locate milestone (convert, parity, greedy generation, layer "
        "geometry). The bridge and hybrid sampling are not built yet.")
  parity_report = parity.run_parity(config, workdir)
  print(parity.summary(parity_report))
  gen = generate_text(config, workdir, DEMO_PROMPTS, 32, 0.0, 1.0)
  plot_hidden_diff(parity_report, workdir / "parity.png")
  lines = ["# dihal demo (backbone milestone)", "", parity.summary(parity_report), "",
           "## Greedy continuations (JAX, KV cache)", ""]
  for row in gen["samples"]:
    print(f"--- {row['prompt']}\n{row['continuation']}")
    lines += [f"**{row['prompt']}** {row['continuation']}", ""]
  geometry = locate.run_locate(config, workdir)
  locate.plot(geometry, workdir / "geometry.png")
  print(locate.summary(geometry))
  lines += ["## Geometry per layer (locate)", "", locate.summary(geometry), "",
            "![geometry](geometry.png)", ""]
  reports.write_text(workdir / "report.md", "\n".join(lines))
  return {"parity": parity_report, "generation": gen, "locate": geometry}
