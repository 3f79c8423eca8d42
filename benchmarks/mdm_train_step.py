"""MDM post-training step: JAX (`dihal mdm`'s jitted step) vs the same step in PyTorch.

What: one optimizer step of masked-diffusion post-training of the embedded SmolLM2-135M
(all weights) on a [batch, tokens] batch: mask each position but 0 with probability
t ~ U(1e-3, 1), a bidirectional forward, the MDLM loss with the shift (CE of the masked
tokens from the logits one position left, weighted 1/t, per token), backward, gradient
clipping, AdamW.
  * JAX: `mdm.train.make_train_step` (also updates its EMA), on one device.
  * torch: `transformers.AutoModelForCausalLM` (eager attention, an all-True 4-D mask
    = bidirectional), the same loss written in torch, `clip_grad_norm_`, `torch.optim.AdamW`,
    `torch.set_num_threads(os.cpu_count())`.
Both float32, warmed up (JAX: compiled), then timed `repeats` times interleaved;
tokens/s = batch * tokens / median seconds. Goal: JAX/torch >= 1.2.

Run: python benchmarks/mdm_train_step.py --out FILE [--batch 8 --tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jaxlib
import numpy as np
import torch
import transformers

from dihal_jax.backbone.convert import load_model
from dihal_jax.backbone.embedded import resolve_checkpoint
from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
from dihal_jax.mdm.train import make_train_step
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from dihal_jax.reports import write_json

CHECKPOINT = "embedded:smollm2-135m-instruct"
MASK_ID = 16  # SmolLM2's <empty_output>, what mdm.mask_id = -1 picks


def jax_step(ckpt, tokens: np.ndarray, optim: OptimConfig):
  mesh = make_mesh({"data": 1})
  model = load_model(ckpt, mesh=mesh, rules=DEFAULT_RULES)
  step = make_train_step(mesh, DEFAULT_RULES, optim, mask_id=MASK_ID, shift=True,
                         anneal_steps=0)
  holder = {"state": init_train_state(model, make_optimizer(optim))}
  key = jax.random.key(0)

  def run():
    holder["state"], metrics = step(holder["state"], tokens, key)
    jax.block_until_ready(metrics["loss"])

  return run


def torch_step(ckpt, tokens: np.ndarray, optim: OptimConfig):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      ckpt, dtype=torch.float32, attn_implementation="eager").train()
  opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                          weight_decay=optim.weight_decay)
  x = torch.from_numpy(tokens.astype(np.int64))
  b, n = x.shape
  mask4d = torch.ones(b, 1, n, n, dtype=torch.bool)
  gen = torch.Generator().manual_seed(0)

  def run():
    t = torch.rand(b, generator=gen) * (1 - 1e-3) + 1e-3
    masked = (torch.rand(b, n, generator=gen) < t[:, None]) & (torch.arange(n) > 0)
    z = torch.where(masked, torch.full_like(x, MASK_ID), x)
    logits = model(input_ids=z, attention_mask=mask4d).logits
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    loss = ((nll * masked).sum(1) / t / (n - 1)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
    opt.step()

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  load_before = os.getloadavg()[0]
  ckpt = resolve_checkpoint(CHECKPOINT)
  optim = OptimConfig(lr=1e-5, warmup_steps=1, total_steps=1000)
  tokens = np.random.default_rng(0).integers(17, 49152, (args.batch, args.tokens), np.int32)
  tokens[:, 0] = 0
  fns = {"jax": jax_step(ckpt, tokens, optim), "torch": torch_step(ckpt, tokens, optim)}
  warmup = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    fn()
    warmup[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
  n = args.batch * args.tokens
  results = {"jax_s_per_step": jax_s, "torch_s_per_step": torch_s,
             "jax_tokens_per_s": n / jax_s, "torch_tokens_per_s": n / torch_s,
             "ratio_jax_over_torch": torch_s / jax_s,
             "settings": {"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                          "threads": os.cpu_count(), "jax": jax.__version__,
                          "jaxlib": jaxlib.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "device": f"{jax.devices()[0].platform}",
                          "load_average_1min_before": load_before,
                          "load_average_1min_after": os.getloadavg()[0]},
             "raw_seconds": {"warmup": warmup, **times}}
  print(f"MDM post-training step, SmolLM2-135M, float32, batch={args.batch} "
        f"tokens={args.tokens}, median of {args.repeats}")
  for name, s in (("jax (jit)", jax_s), ("torch (eager)", torch_s)):
    print(f"  {name:16s}{s:8.2f} s/step {n / s:8.0f} tokens/s")
  print(f"  jax/torch = {torch_s / jax_s:.2f} (goal >= 1.2); load average "
        f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}")
  if args.out:
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
