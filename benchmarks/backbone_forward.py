"""Backbone forward benchmark: JAX `Decoder` vs HF transformers on SmolLM2-135M.

What: times one float32 forward of the embedded SmolLM2-135M (Llama, 30 layers,
d=576, vocab 49152) on a [batch, tokens] batch of random token ids, returning
every hidden state h_0..h_L and the logits, as the DiHAL pipeline uses it:
  * JAX: `Decoder.hidden_states(tokens, range(L + 1), with_logits=True)`, jitted;
  * torch: `AutoModelForCausalLM(..., output_hidden_states=True)` under
    `torch.inference_mode()`, with `torch.set_num_threads(os.cpu_count())`
    (XLA CPU also runs one intra-op thread per core by default).
Each is warmed up (JAX: compiled), then timed `repeats` times, interleaved
with the GEMM below; tokens/s = batch * tokens / median seconds.

Why: the targets are JAX/torch >= 1.5 and a GEMM fraction >= 0.6: the
JAX forward's achieved FLOP/s over that of a plain jitted float32 `jnp.dot` of a
layer-sized GEMM ([batch*tokens, d] x [d, intermediate]) measured in the same
run. FLOPs are the standard analytical matmul count: 2 * tokens * (matmul
params per layer: q, k, v, o, gate, up, down) * L, plus the LM head
2 * tokens * d * V, plus attention 2 * 2 * B * T * T * (heads * head_dim) per
layer (QK^T and PV over the full T x T scores, as the JAX model computes them;
torch's causal SDPA may skip the masked half). Norms, RoPE, softmax and the
embedding gather are not counted. The same counts are used for torch's GFLOP/s.

The numbers are only meaningful on otherwise idle cores: the 1-minute load
average before and after is printed and stored.

Run (defaults: --batch 8 --tokens 256 --repeats 5 --attention auto):
  python benchmarks/backbone_forward.py --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch
import transformers
from flax import nnx

from dihal_jax.backbone.checkpoint import random_hf_checkpoint
from dihal_jax.defaults import load_config_file
from dihal_jax.backbone.convert import load_model
from dihal_jax.backbone.embedded import resolve_checkpoint
from dihal_jax.backbone.model import ATTENTION
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from dihal_jax.reports import write_json

CHECKPOINT = "embedded:smollm2-135m-instruct"
CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "smollm2_135m.py"
GEMM_REPEATS_FACTOR = 10  # a GEMM takes milliseconds: time 10 per repeat


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def forward_flops(cfg, batch: int, tokens: int) -> int:
  """Analytical matmul FLOPs of one forward (see the module docstring)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q_dim, kv_dim = cfg.num_heads * h, cfg.num_kv_heads * h
  layer_params = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * f
  n = batch * tokens
  attention = 2 * 2 * batch * tokens * tokens * q_dim
  return cfg.num_layers * (2 * n * layer_params + attention) + 2 * n * d * cfg.vocab_size


def gemm_fn(m: int, k: int, n: int, dtype):
  """A [m, k] x [k, n] jitted `jnp.dot` in `dtype` (float32 accumulation), blocking until done."""
  a = jax.random.normal(jax.random.key(0), (m, k), dtype)
  b = jax.random.normal(jax.random.key(1), (k, n), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return lambda: dot(a, b).block_until_ready()


def jax_fn(model, tokens: np.ndarray):
  """The jitted JAX forward with all hidden states and logits, blocking until done."""
  graphdef, state = nnx.split(model)
  layers = range(model.cfg.num_layers + 1)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state).hidden_states(tokens, layers, with_logits=True)

  x = jnp.asarray(tokens)
  return lambda: jax.block_until_ready(forward(state, x))


def torch_fn(ckpt, tokens: np.ndarray, dtype: str, device: str):
  """The HF transformers forward with all hidden states and logits (synchronized on GPU)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      ckpt, dtype=getattr(torch, dtype)).to(device).eval()
  x = torch.from_numpy(tokens.astype(np.int64)).to(device)

  def run():
    with torch.inference_mode():
      model(input_ids=x, output_hidden_states=True)
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of both models (params stay float32 in JAX)")
  parser.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--random-weights", action="store_true",
                      help="a seeded random model of SmolLM2's shape (machines without the "
                      "embedded package; speed does not depend on the weights)")
  parser.add_argument("--attention", choices=ATTENTION, default="auto",
                      help="the JAX attention kernel (config model.attention)")
  args = parser.parse_args()

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  load_before = os.getloadavg()[0]
  if args.random_weights:
    hf_config = load_config_file(CONFIG_FILE).model.hf_config.to_dict()
    ckpt = random_hf_checkpoint(hf_config, Path(tempfile.mkdtemp()) / "smollm2", seed=0)
  else:
    ckpt = resolve_checkpoint(CHECKPOINT)
  dtype = jnp.dtype(args.dtype)
  model = load_model(ckpt, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES, dtype=dtype,
                     attention=args.attention)
  cfg = model.cfg
  n_tokens = args.batch * args.tokens
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.tokens),
                                             np.int32)

  gemm_shape = (n_tokens, cfg.hidden_size, cfg.intermediate_size)
  fns = {"gemm": gemm_fn(*gemm_shape, dtype), "jax": jax_fn(model, tokens),
         "torch": torch_fn(ckpt, tokens, args.dtype, args.torch_device)}
  warmup = {name: seconds(fn) for name, fn in fns.items()}  # JAX: compile + first run
  # Interleaved, so that load from other processes hits all three alike.
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      times[name] += [seconds(fn) for _ in range(GEMM_REPEATS_FACTOR if name == "gemm" else 1)]
  load_after = os.getloadavg()[0]

  jax_s, torch_s, gemm_s = (statistics.median(times[name]) for name in ("jax", "torch", "gemm"))
  flops = forward_flops(cfg, args.batch, args.tokens)
  gemm_flops_per_s = 2 * np.prod(gemm_shape) / gemm_s
  results = {
      "jax_tokens_per_s": n_tokens / jax_s,
      "torch_tokens_per_s": n_tokens / torch_s,
      "ratio_jax_over_torch": torch_s / jax_s,
      "gemm_fraction": flops / jax_s / gemm_flops_per_s,
      "forward_gflop": flops / 1e9,
      "jax_gflops_per_s": flops / jax_s / 1e9,
      "torch_gflops_per_s": flops / torch_s / 1e9,
      "gemm_gflops_per_s": gemm_flops_per_s / 1e9,
      "settings": {
          "checkpoint": "random" if args.random_weights else CHECKPOINT, "batch": args.batch,
          "tokens": args.tokens, "dtype": args.dtype, "attention": args.attention,
          "torch_device": args.torch_device,
          "repeats": args.repeats,
          "gemm_repeats": GEMM_REPEATS_FACTOR * args.repeats, "gemm_shape": list(gemm_shape),
          "threads": threads, "torch_num_threads": torch.get_num_threads(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__,
          "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
          "jax_devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_1min_before": load_before, "load_average_1min_after": load_after,
      },
      "raw_seconds": {"warmup": warmup, **times},
  }

  print(f"SmolLM2-135M forward (all hidden states + logits), {args.dtype}, attention "
        f"{args.attention}, batch={args.batch} tokens={args.tokens}, median of {args.repeats}; {threads} threads "
        f"(torch.set_num_threads({torch.get_num_threads()}), XLA CPU default pool)")
  print(f"  {'':24s}{'median s':>10s}{'tokens/s':>10s}{'GFLOP/s':>10s}")
  for name, median in (("jax (jit)", jax_s), ("torch (eager)", torch_s)):
    print(f"  {name:24s}{median:10.3f}{n_tokens / median:10.0f}{flops / median / 1e9:10.1f}")
  gemm_name = "jnp.dot " + "x".join(map(str, gemm_shape))
  print(f"  {gemm_name:24s}{gemm_s:10.4f}{'':10s}{gemm_flops_per_s / 1e9:10.1f}")
  print(f"  jax/torch = {results['ratio_jax_over_torch']:.2f} (goal >= 1.5), "
        f"GEMM fraction = {results['gemm_fraction']:.2f} (goal >= 0.6); "
        f"forward = {flops / 1e9:.1f} GFLOP; jax compile + first run {warmup['jax']:.1f} s")
  print(f"  1-min load average before/after: {load_before:.2f}/{load_after:.2f}")
  if args.out:
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
