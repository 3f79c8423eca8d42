"""The transformer denoiser, the current-token head, the token loss and the joint readout
against independent references: torch (transformers) hidden states and logits, float64
NumPy class means, cross-entropies and a brute-force temperature search; and the
transformer bridge end to end (train, kill -9 resume, sample, a checkpoint of another kind)."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import REPO
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.token_head import ClassMeanHead
from dihal_jax.bridge.train_step import token_loss
from dihal_jax.bridge.transformer import TransformerConfig, TransformerDenoiser
from dihal_jax.hybrid.readout import Readout, ReadoutConfig

SEP, N = 1, 16


def _norm(d, seed=0):
  rng = np.random.default_rng(seed)
  return Normalizer("per_channel", rng.normal(size=d).astype(np.float32),
                    rng.uniform(0.5, 2.0, size=d).astype(np.float32))


def _torch_hidden(torch_model, tokens):
  with torch.no_grad():
    out = torch_model(torch.as_tensor(tokens), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.logits.numpy()


@pytest.mark.slow
def test_backbone_init_is_the_backbone_at_step_0(models):
  """Copied blocks with identity modulation compute h_{l+m} from h_l. With one position the
  bidirectional mask equals the causal one, so transformers' hidden states are the answer."""
  model, torch_model = models
  tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, 5))
  hidden, _ = _torch_hidden(torch_model, tokens)
  norm = _norm(model.cfg.hidden_size)
  denoiser = TransformerDenoiser(model.cfg, TransformerConfig(blocks=1, self_condition=True),
                                 norm, rngs=nnx.Rngs(0))
  denoiser.load_blocks(model, first=2)  # block 2: h_1 -> h_2
  z = norm.forward(jnp.asarray(hidden[1][:, :1]))
  out = denoiser.trunk(z, jnp.full((3,), 0.7), jnp.zeros((3, 1), bool), jnp.zeros_like(z),
                       jnp.ones_like(z))
  np.testing.assert_allclose(np.asarray(out), hidden[2][:, :1], rtol=1e-4, atol=1e-4)
  # The zero-initialized output head predicts the data mean (0) at step 0.
  pred = denoiser(z, jnp.full((3,), 0.7), jnp.zeros((3, 1), bool), jnp.zeros_like(z))
  assert float(jnp.max(jnp.abs(pred))) == 0.0


@pytest.mark.slow
def test_attention_is_bidirectional_and_known_positions_are_clean(models):
  model, _ = models
  d = model.cfg.hidden_size
  denoiser = TransformerDenoiser(model.cfg, TransformerConfig(blocks=2), _norm(d),
                                 rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 6, d)), jnp.float32)
  t, none = jnp.full((1,), 0.5), jnp.zeros((1, 6), bool)
  base = denoiser.trunk(x, t, none, jnp.zeros_like(x))
  later = denoiser.trunk(x.at[:, 5].add(1.0), t, none, jnp.zeros_like(x))
  assert float(jnp.max(jnp.abs(later[:, 0] - base[:, 0]))) > 1e-4  # position 0 sees position 5
  # A known position's noised value is ignored: its clean value is used.
  known = jnp.zeros((1, 6), bool).at[:, 2].set(True)
  clean = jnp.asarray(rng.normal(size=(1, 6, d)), jnp.float32)
  a = denoiser.trunk(x, t, known, clean)
  b = denoiser.trunk(x.at[:, 2].set(123.0), t, known, clean)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_token_loss_matches_numpy():
  rng = np.random.default_rng(2)
  b, n, d, v = 2, 5, 4, 7
  x0 = rng.normal(size=(b, n, d)).astype(np.float32)
  means = rng.normal(size=(v, d)).astype(np.float32)
  tokens = rng.integers(0, 11, (b, n))
  class_of = rng.integers(0, v, 11).astype(np.int32)
  unknown = rng.random((b, n)) < 0.6
  tau = 1.7
  logits = -((x0[:, :, None, :].astype(np.float64) - means[None, None]) ** 2).sum(-1) / tau
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, class_of[tokens][..., None], -1)[..., 0]
  want = nll[unknown].mean()
  got = token_loss(jnp.asarray(x0), jnp.asarray(tokens), jnp.asarray(unknown),
                   {"means": jnp.asarray(means), "class_of": jnp.asarray(class_of),
                    "tau": jnp.float32(tau)})
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_class_mean_head_means_temperature_and_log_probs():
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 12, (20, 9))
  centres = rng.normal(size=(12, 5)) * 3
  states = (centres[tokens] + rng.normal(size=(20, 9, 5))).astype(np.float32)
  norm = _norm(5, seed=4)
  head = ClassMeanHead.fit(tokens, states, norm, vocab_size=30, chunk=7)
  assert set(head.ids) == set(np.unique(tokens))
  z = (states.astype(np.float64) - norm.mean) / norm.scale
  for i, v in enumerate(head.ids):
    np.testing.assert_allclose(head.means[i], z[tokens == v].mean(0), rtol=1e-4, atol=1e-5)
  # τ: the maximum-likelihood temperature over positions 1.. (brute force in float64).
  zz = z[:, 1:].reshape(-1, 5)
  sq = ((zz[:, None, :] - head.means[None].astype(np.float64)) ** 2).sum(-1)
  index = np.searchsorted(head.ids, tokens[:, 1:].ravel())

  def nll(tau):
    s = -sq / tau
    s = s - s.max(1, keepdims=True)
    return np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(index)), index])

  grid = np.exp(np.linspace(-4, 6, 4001))
  best = grid[np.argmin([nll(t) for t in grid])]
  assert abs(np.log(head.temperature) - np.log(best)) < 0.01
  logp = np.asarray(head.log_probs(jnp.asarray(states[:2])))
  unseen = np.setdiff1d(np.arange(30), head.ids)
  assert np.all(np.isneginf(logp[..., unseen]))
  np.testing.assert_allclose(np.exp(logp[..., head.ids]).sum(-1), 1.0, rtol=1e-5)
  want = -sq[:8] / head.temperature  # first row's positions 1..8
  want = want - np.log(np.exp(want - want.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - want.max(1, keepdims=True)
  np.testing.assert_allclose(logp[0, 1:][:, head.ids], want, rtol=1e-4, atol=1e-4)


def test_identity_head_is_exact_at_layer_0(models):
  model, _ = models
  reader = Readout(model, 0, SEP)
  text = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (4, N)).astype(np.int32)
  h0 = np.asarray(reader.lower(text))
  head = ClassMeanHead.fit(text, h0, _norm(h0.shape[-1]), vocab_size=model.cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(head(h0)), text)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_joint_readout_greedy_matches_torch_and_numpy(models, beta):
  """T = 0: token_i = argmax(torch logits[i-1] + β log p_id(· | h_i)), p_id in float64 NumPy."""
  model, torch_model = models
  rng = np.random.default_rng(6)
  text = rng.integers(0, model.cfg.vocab_size, (3, N)).astype(np.int32)
  text[:, 0] = SEP
  hidden, logits = _torch_hidden(torch_model, text)
  layer = 1
  train = rng.integers(0, model.cfg.vocab_size, (8, N)).astype(np.int32)
  reader = Readout(model, layer, SEP)
  norm = _norm(model.cfg.hidden_size, seed=7)
  head = ClassMeanHead.fit(train, np.asarray(reader.lower(train)), norm,
                           vocab_size=model.cfg.vocab_size)
  h = hidden[layer]
  got = np.asarray(reader.joint(h, head, jax.random.key(0), ReadoutConfig(beta=beta),
                                temperature=0.0))
  z = (h.astype(np.float64) - norm.mean) / norm.scale
  sq = ((z[:, 1:, None, :] - head.means.astype(np.float64)) ** 2).sum(-1) / head.temperature
  log_id = -sq - np.log(np.exp(-sq - (-sq).max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - (-sq).max(-1, keepdims=True)
  score = logits[:, :-1].astype(np.float64).copy()
  unseen = np.setdiff1d(np.arange(model.cfg.vocab_size), head.ids)
  score[..., head.ids] += beta * log_id
  score[..., unseen] += beta * -1e4
  assert np.all(got[:, 0] == SEP)
  np.testing.assert_array_equal(got[:, 1:], score.argmax(-1))


@pytest.mark.slow
def test_joint_oracle_returns_the_text_when_the_head_is_sharp(models):
  """At layer 0 the states are embedding rows: with β large the joint readout of the true
  states is the text itself, whatever the LM prefers."""
  model, _ = models
  rng = np.random.default_rng(8)
  text = rng.integers(0, model.cfg.vocab_size, (4, N)).astype(np.int32)
  text[:, 0] = SEP
  reader = Readout(model, 0, SEP)
  h0 = np.asarray(reader.lower(text))
  head = ClassMeanHead.fit(text, h0, _norm(h0.shape[-1]), vocab_size=model.cfg.vocab_size)
  got = np.asarray(reader.joint(h0, head, jax.random.key(1), ReadoutConfig(beta=50.0)))
  np.testing.assert_array_equal(got, text)


# --- end to end: the transformer bridge through the CLI ---------------------------------

STEPS = 12


def _train_args(tmp_path, workdir, *extra):
  return [sys.executable, "-m", "dihal_jax.cli", "train", "--config=configs/tiny_llama.py",
          f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.bridge.layer=1", f"--config.train.steps={STEPS}",
          "--config.train.checkpoint_every=4", "--config.train.log_every=1",
          "--config.train.val_every=6", "--config.train.cache_windows=32",
          "--config.train.val_windows=8", "--config.train.batch_size=8",
          "--config.train.warmup_steps=2", "--config.bridge.denoiser=transformer",
          "--config.bridge.init=backbone", "--config.bridge.transformer.blocks=2",
          "--config.train.token_ce=0.1", *extra]


def _metrics(workdir):
  return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                    .splitlines())}


@pytest.mark.slow
def test_transformer_bridge_trains_resumes_after_kill_9_and_samples(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = subprocess.run(_train_args(tmp_path, straight), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _metrics(straight)
  assert rows[STEPS]["token_ce"] > 0 and np.isfinite(rows[STEPS]["mse"])
  # kill -9 after the first committed checkpoint, then resume: the same losses, bit for bit.
  proc = subprocess.Popen(_train_args(tmp_path, killed), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while not [p for p in (killed / "checkpoints").glob("[0-9]*") if p.name.isdigit()]:
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc = subprocess.run(_train_args(tmp_path, killed), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
  again = _metrics(killed)
  assert [again[s]["loss"] for s in range(1, STEPS + 1)] == \
      [rows[s]["loss"] for s in range(1, STEPS + 1)]
  sample = [sys.executable, "-m", "dihal_jax.cli", "sample", "--config=configs/tiny_llama.py",
            f"--workdir={straight}", f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.sample.num=4", "--config.sample.steps=3", "--config.sample.batch=4"]
  proc = subprocess.run([*sample, "--config.bridge.denoiser=transformer",
                         "--config.sample.readout=joint"], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = (straight / "samples.jsonl").read_text().splitlines()
  assert len(lines) == 4 and json.loads(lines[0])["readout"] == "joint"
  # The config's denoiser must match the checkpoint's.
  proc = subprocess.run(sample, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("dihal: error:")]
  assert len(errors) == 1 and "transformer denoiser but bridge.denoiser='unet'" in errors[0]
  assert "Traceback" not in proc.stderr
