"""Parity of the JAX backbone with the PyTorch reference (`transformers`, float32).

One batch of rows (real text when the checkpoint has a tokenizer, seeded
random ids otherwise), right-padded to different lengths, goes through both
models. Compared on real tokens only:
  * logits: max |Δ| and per-token KL(torch ‖ jax), computed in float64 from
    the two float32 logit sets (an fp32 log-softmax over a 49k vocabulary
    has a rounding floor near 1e-5 by itself);
  * hidden states h_0..h_L: HF's last `hidden_states` entry is *after* the
    final norm, so entry L is compared with final_norm(h_L);
  * greedy generation: N tokens from our KV-cache loop vs `generate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dihal_jax import assets
from dihal_jax.backbone import checkpoint
from dihal_jax.backbone.generate import generate
from dihal_jax.backbone.model import Decoder


def text_rows(tokenizer, separator: int, rows: int, tokens: int) -> np.ndarray:
  """[rows, tokens] ids of consecutive Emma passages, each starting with the separator."""
  text = assets.read_corpus("austen_emma")[20000:20000 + 12 * rows * tokens]
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  step = tokens - 1
  if len(ids) < rows * step:
    raise ValueError(f"corpus slice too short for {rows} x {tokens} tokens")
  body = np.asarray(ids[:rows * step], np.int32).reshape(rows, step)
  return np.concatenate([np.full((rows, 1), separator, np.int32), body], axis=1)


def padded_batch(tokens: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads rows to lengths T, T-23, T-46, ... (padding exercised, row 0 full)."""
  rows, t = tokens.shape
  lengths = np.maximum(t - 23 * np.arange(rows), 2)
  mask = np.arange(t)[None, :] < lengths[:, None]
  return np.where(mask, tokens, pad_id).astype(np.int32), mask


def kl_float64(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
  """Per-row KL(p ‖ q) over the last axis, in float64."""
  p_logits = p_logits.astype(np.float64)
  q_logits = q_logits.astype(np.float64)
  log_p = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
  log_q = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def compare_forward(model: Decoder, torch_model, tokens: np.ndarray, mask: np.ndarray) -> dict:
  """Logit and hidden-state agreement on real (unpadded) tokens."""
  import torch

  cfg = model.cfg
  t0 = time.perf_counter()
  with torch.inference_mode():
    out = torch_model(torch.as_tensor(tokens, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long),
                      output_hidden_states=True)
  torch_s = time.perf_counter() - t0
  ref_logits = out.logits.float().numpy()
  ref_hidden = [h.float().numpy() for h in out.hidden_states]

  graphdef, state = nnx.split(model)

  @jax.jit  # params are an argument, not closed-over constants
  def ours(state, tokens, mask):
    model = nnx.merge(graphdef, state)
    hidden, logits = model.hidden_states(tokens, range(cfg.num_layers + 1), mask=mask,
                                         with_logits=True)
    hidden[cfg.num_layers] = model.final_norm(hidden[cfg.num_layers])  # HF's last entry
    return hidden, logits

  t0 = time.perf_counter()
  hidden, logits = jax.block_until_ready(ours(state, jnp.asarray(tokens), jnp.asarray(mask)))
  jax_s = time.perf_counter() - t0
  logits = np.asarray(logits)
  kl = kl_float64(ref_logits[mask], logits[mask])
  return {
      "max_abs_logit_diff": float(np.abs(ref_logits - logits)[mask].max()),
      "mean_kl": float(kl.mean()),
      "max_kl": float(kl.max()),
      "argmax_agreement": float((ref_logits.argmax(-1) == logits.argmax(-1))[mask].mean()),
      "hidden_max_abs_diff": [float(np.abs(ref_hidden[l] - np.asarray(hidden[l]))[mask].max())
                              for l in range(cfg.num_layers + 1)],
      "num_tokens": int(mask.sum()),
      "timings": {"torch_forward_s": torch_s, "jax_forward_incl_compile_s": jax_s},
  }


def compare_generation(model: Decoder, torch_model, prompt: np.ndarray, max_new_tokens: int,
                       pad_id: int) -> dict:
  """Greedy continuation of each prompt row: ours vs `transformers` generate."""
  import torch

  with torch.inference_mode():
    ref = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long),
                               attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                               do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=None, pad_token_id=pad_id)
  ref = ref[:, prompt.shape[1]:].numpy()
  ours = np.asarray(generate(model, prompt, max_new_tokens=max_new_tokens))
  return {
      "equal": bool(np.array_equal(ref, ours)),
      "matching_tokens": int((ref == ours).sum()),
      "total_tokens": int(ref.size),
      "first_mismatch": None if np.array_equal(ref, ours) else [
          int(i) for i in np.argwhere(ref != ours)[0]],
      "torch": ref.tolist(),
      "jax": ours.tolist(),
  }


def run_parity(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """The full check of `dihal parity`: forward, hidden states and greedy generation."""
  import torch
  from transformers import AutoModelForCausalLM

  p = config.parity
  t0 = time.perf_counter()
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  model = checkpoint.load_backbone(config, ckpt)
  load_s = time.perf_counter() - t0
  torch_model = AutoModelForCausalLM.from_pretrained(
      str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
  tokenizer = checkpoint.load_tokenizer(ckpt)
  cfg = model.cfg
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  if tokenizer is not None:
    rows = text_rows(tokenizer, checkpoint.separator_id(tokenizer, config), p.rows, p.tokens)
    source = "austen_emma"
  else:
    rows = np.random.default_rng(config.seed).integers(0, cfg.vocab_size, (p.rows, p.tokens),
                                                       dtype=np.int32)
    source = "random_ids"
  tokens, mask = padded_batch(rows, pad_id)
  # fp32 parity means fp32 matmuls: GPUs default to TF32 (max |Δlogit| 6e-3 on an H100).
  with jax.default_matmul_precision(p.matmul_precision):
    forward = compare_forward(model, torch_model, tokens, mask)
    gen = compare_generation(model, torch_model, rows[:2, :p.prompt_tokens], p.generate_tokens,
                             pad_id)
  if tokenizer is not None:
    gen["torch_text"] = tokenizer.batch_decode(gen["torch"])
    gen["jax_text"] = tokenizer.batch_decode(gen["jax"])
  passed = (forward["mean_kl"] <= p.max_mean_kl
            and forward["max_abs_logit_diff"] <= p.max_abs_logit_diff and gen["equal"])
  return {
      "checkpoint": str(ckpt), "text": source, "rows": p.rows, "tokens_per_row": p.tokens,
      "row_lengths": mask.sum(1).tolist(), "dtype": config.model.dtype,
      "matmul_precision": p.matmul_precision, "device": str(jax.devices()[0]),
      **{k: v for k, v in forward.items() if k != "timings"},
      "generation": gen,
      "targets": {"max_mean_kl": p.max_mean_kl, "max_abs_logit_diff": p.max_abs_logit_diff,
                  "generation_equal": True},
      "passed": bool(passed),
      "timings": {"load_s": load_s, **forward["timings"],
                  "total_s": time.perf_counter() - t0},
  }


def summary(report: dict) -> str:
  """A short human summary of a parity report (a Markdown table)."""
  from dihal_jax.reports import markdown_table

  gen = report["generation"]
  h = report["hidden_max_abs_diff"]
  rows = [
      ["max abs Δ logit", report["max_abs_logit_diff"], f"<= {report['targets']['max_abs_logit_diff']}"],
      ["mean KL(torch‖jax), float64", report["mean_kl"], f"<= {report['targets']['max_mean_kl']}"],
      ["argmax agreement", report["argmax_agreement"], "1.0"],
      ["max abs Δ h_l, layers 0..L", max(h[:-1]), ""],
      ["greedy tokens equal", f"{gen['matching_tokens']}/{gen['total_tokens']}", "all"],
  ]
  verdict = "PASS" if report["passed"] else "FAIL"
  return (markdown_table(["parity vs transformers (fp32)", "value", "target"], rows)
          + f"\n{report['num_tokens']} tokens ({report['text']}), rows {report['row_lengths']}: "
          + verdict)
