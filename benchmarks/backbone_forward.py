"""Backbone forward benchmark: JAX `Decoder` vs HF transformers on SmolLM2-135M.

What: times one forward of the embedded SmolLM2-135M (Llama, 30 layers, d=576,
vocab 49152) on a [batch, tokens] batch of random token ids, returning every
hidden state h_0..h_L and the float32 logits, as the DiHAL pipeline uses it:
  * JAX: `Decoder.hidden_states(tokens, range(L + 1), with_logits=True)`, jitted;
  * torch: `AutoModelForCausalLM(..., output_hidden_states=True)` in float32
    under `torch.inference_mode()`, with `torch.set_num_threads(os.cpu_count())`
    (XLA CPU also uses one intra-op thread per core by default).
Both are warmed up, then timed `repeats` times; tokens/s = batch * tokens /
median seconds.

Why: the issue's targets are JAX/torch >= 1.5 and a GEMM fraction >= 0.6, i.e.
the forward's achieved FLOP/s over that of a plain jitted float32 `jnp.dot` of a
layer-sized GEMM ([batch*tokens, d] x [d, intermediate]) measured in the same
run. FLOPs are counted analytically: 2 * tokens * (matmul params per layer:
q, k, v, o, gate, up, down) * L, plus the LM head 2 * tokens * d * V, plus
attention 2 * 2 * B * T * T * (heads * head_dim) per layer (QK^T and PV over the
full T x T scores, which is what both implementations compute). Norms, RoPE,
softmax and the embedding gather are not counted.

Run:
  python benchmarks/backbone_forward.py --out /tmp/bench.json [--batch 8] [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch
import transformers
from flax import nnx

from dihal_jax.backbone.convert import load_model
from dihal_jax.backbone.embedded import resolve_checkpoint
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

CHECKPOINT = "embedded:smollm2-135m-instruct"


def time_runs(fn, repeats: int) -> tuple[float, list[float]]:
  """(seconds of the warm-up call, seconds of each of `repeats` further calls)."""
  start = time.perf_counter()
  fn()
  warmup = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return warmup, times


def forward_flops(cfg, batch: int, tokens: int) -> int:
  """Analytical matmul FLOPs of one forward (see the module docstring)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q_dim, kv_dim = cfg.num_heads * h, cfg.num_kv_heads * h
  layer_params = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * f
  n = batch * tokens
  attention = 2 * 2 * batch * tokens * tokens * q_dim
  return cfg.num_layers * (2 * n * layer_params + attention) + 2 * n * d * cfg.vocab_size


def bench_jax(ckpt, tokens: np.ndarray, repeats: int):
  model = load_model(ckpt, mesh=make_mesh({"data": -1}), rules=DEFAULT_RULES)
  cfg = model.cfg
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state).hidden_states(tokens, range(cfg.num_layers + 1),
                                                    with_logits=True)

  x = jnp.asarray(tokens)
  warmup, times = time_runs(lambda: jax.block_until_ready(forward(state, x)), repeats)
  return cfg, warmup, times


def bench_torch(ckpt, tokens: np.ndarray, repeats: int):
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  x = torch.from_numpy(tokens.astype(np.int64))

  def run():
    with torch.inference_mode():
      model(input_ids=x, output_hidden_states=True)

  return time_runs(run, repeats)


def bench_gemm(m: int, k: int, n: int, repeats: int):
  """Seconds per float32 [m, k] x [k, n] jitted `jnp.dot`."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  _, times = time_runs(lambda: dot(a, b).block_until_ready(), repeats)
  return times


def write_json_atomic(path: str, payload: dict) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=2)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  ckpt = resolve_checkpoint(CHECKPOINT)
  n_tokens = args.batch * args.tokens

  vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
  tokens = np.random.default_rng(0).integers(0, vocab, (args.batch, args.tokens), np.int32)

  cfg, jax_compile_s, jax_times = bench_jax(ckpt, tokens, args.repeats)
  torch_warmup_s, torch_times = bench_torch(ckpt, tokens, args.repeats)
  gemm_shape = (n_tokens, cfg.hidden_size, cfg.intermediate_size)
  gemm_times = bench_gemm(*gemm_shape, args.repeats)

  jax_s, torch_s, gemm_s = (statistics.median(t) for t in (jax_times, torch_times, gemm_times))
  flops = forward_flops(cfg, args.batch, args.tokens)
  gemm_flops_per_s = 2 * np.prod(gemm_shape) / gemm_s
  jax_flops_per_s = flops / jax_s
  results = {
      "jax_tokens_per_s": n_tokens / jax_s,
      "torch_tokens_per_s": n_tokens / torch_s,
      "ratio_jax_over_torch": torch_s / jax_s,
      "gemm_fraction": jax_flops_per_s / gemm_flops_per_s,
      "jax_gflops_per_s": jax_flops_per_s / 1e9,
      "gemm_gflops_per_s": gemm_flops_per_s / 1e9,
      "forward_gflops": flops / 1e9,
      "settings": {
          "checkpoint": CHECKPOINT, "batch": args.batch, "tokens": args.tokens,
          "repeats": args.repeats, "threads": threads,
          "torch_num_threads": torch.get_num_threads(), "gemm_shape": list(gemm_shape),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__,
          "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
          "jax_devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      },
      "raw_seconds": {
          "jax_compile_and_first_run": jax_compile_s, "jax": jax_times,
          "torch_warmup": torch_warmup_s, "torch": torch_times, "gemm": gemm_times,
      },
  }

  print(f"SmolLM2-135M forward, all hidden states + logits, batch={args.batch} "
        f"tokens={args.tokens}, float32, {threads} threads "
        f"(torch.set_num_threads({torch.get_num_threads()}), XLA CPU default pool), "
        f"median of {args.repeats}")
  print(f"  {'':22s}{'median s':>10s}{'tokens/s':>12s}{'GFLOP/s':>10s}")
  print(f"  {'jax (jit)':22s}{jax_s:10.3f}{n_tokens / jax_s:12.0f}{jax_flops_per_s / 1e9:10.1f}")
  print(f"  {'torch (eager)':22s}{torch_s:10.3f}{n_tokens / torch_s:12.0f}"
        f"{flops / torch_s / 1e9:10.1f}")
  print(f"  {'jnp.dot ' + 'x'.join(map(str, gemm_shape)):22s}{gemm_s:10.4f}{'':12s}"
        f"{gemm_flops_per_s / 1e9:10.1f}")
  print(f"  jax/torch = {results['ratio_jax_over_torch']:.2f} (goal >= 1.5), "
        f"GEMM fraction = {results['gemm_fraction']:.2f} (goal >= 0.6), "
        f"forward = {flops / 1e9:.1f} GFLOP, jax compile+first run {jax_compile_s:.1f} s")
  if args.out:
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
