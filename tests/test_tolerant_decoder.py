"""The tolerant decoder (hybrid/tolerant_decoder.py): its loss against transformers' own
next-token loss, the bridge estimates it trains on against a closed case, a step that trains
the adapters and nothing else, and `dihal train` / `dihal sample` / `dihal ablate` end to end
on the tiny model (its bad input: tests/test_settings.py)."""

import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import REPO
from dihal_jax.backbone.lora import KERNELS, LoRA
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
from dihal_jax.hybrid import tolerant_decoder

LAYER = 1


class _ZeroX0(nnx.Module):
  """A stand-in bridge whose x0 prediction is 0 everywhere (normalized units)."""

  def __init__(self):
    self.cfg = SimpleNamespace(self_condition=False)

  def __call__(self, x_t, t, known_mask, known, labels=None, x0_prev=None, deterministic=True):
    return jnp.zeros_like(x_t)


X0 = diffusion.DiffusionConfig(schedule="cosine", prediction="x0", steps=4, sampler="ddim")


def _tokens(model, shape, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(3, model.cfg.vocab_size, shape),
                     jnp.int32)


def test_the_loss_on_true_states_is_transformers_next_token_loss(models):
  model, hf = models
  tokens = _tokens(model, (2, 12), 0)
  ours = float(tolerant_decoder.next_token_nll(model, model.lower(tokens, LAYER), tokens, LAYER))
  with torch.no_grad():
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    ref = float(hf(ids, labels=ids).loss)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_the_estimates_keep_position_0_and_map_the_bridge_x0_back_to_backbone_units():
  rng = np.random.default_rng(1)
  d = 6
  norm = Normalizer("per_channel", rng.normal(size=d).astype(np.float32),
                    rng.uniform(0.5, 2.0, d).astype(np.float32))
  h = jnp.asarray(rng.normal(size=(3, 5, d)), jnp.float32)
  out = np.asarray(tolerant_decoder.estimated_states(_ZeroX0(), norm, h, jax.random.key(0), X0))
  np.testing.assert_array_equal(out[:, 0], np.asarray(h[:, 0]))
  # x0 = 0 in normalized units is the per-channel mean in backbone units
  np.testing.assert_allclose(out[:, 1:], np.broadcast_to(norm.mean, out[:, 1:].shape), atol=1e-6)


def test_a_step_trains_only_adapters_above_the_interface_and_lowers_the_loss(models):
  model, _ = models
  kernels = {n: np.asarray(LoRA._kernel(model, n)[...]) for n in KERNELS}
  lora = LoRA(model, rank=2, alpha=4.0, targets=tuple(KERNELS), rngs=nnx.Rngs(0),
              first_layer=LAYER)
  assert lora.a["q_proj"].shape[0] == model.cfg.num_layers - LAYER
  optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=8, ema_decay=0.0)
  optimizer = make_optimizer(optim)
  state = init_train_state(lora, optimizer)
  tokens = _tokens(model, (4, 10), 2)
  h = model.lower(tokens, LAYER)
  d = model.cfg.hidden_size
  norm = Normalizer("per_channel", np.zeros(d, np.float32), np.ones(d, np.float32))
  # the zero bridge's estimates carry nothing of the window: the decoder can only learn the
  # batch's token prior, which lowers the loss on that batch
  before = float(tolerant_decoder.validation_nll(
      lora, model, tolerant_decoder.estimated_states(_ZeroX0(), norm,
                                                     h, jax.random.key(0), X0),
      tokens, layer=LAYER))
  losses = []
  for _ in range(6):
    state, metrics = tolerant_decoder.train_step(state, model, _ZeroX0(), norm, h, tokens,
                                                 jax.random.key(0), layer=LAYER, cfg=X0,
                                                 optimizer=optimizer, optim_cfg=optim)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], before, rtol=1e-5)
  assert losses[-1] < losses[0] - 0.1
  for name, kernel in kernels.items():
    np.testing.assert_array_equal(np.asarray(LoRA._kernel(model, name)[...]), kernel)
  assert all(np.abs(np.asarray(state.params["b"][n][...])).max() > 0 for n in KERNELS)


def test_a_workdir_without_a_decoder_reads_with_the_backbone_itself(models, tmp_path):
  model, _ = models
  assert tolerant_decoder.readout_backbone(tmp_path, model) is model


TINY = ("--config=configs/tiny_llama.py", "--config.bridge.layer=1", "--config.train.steps=6",
        "--config.train.warmup_steps=2", "--config.train.cache_windows=64",
        "--config.train.val_windows=16", "--config.bridge.unet.channels=16",
        "--config.tolerant.rank=2", "--config.tolerant.steps=12",
        "--config.tolerant.checkpoint_every=6", "--config.tolerant.val_every=6",
        "--config.tolerant.lr=1e-2", "--config.sample.steps=4", "--config.sample.num=4",
        "--config.sample.readout=joint", "--config.sample.beta=0")  # the LM term alone


def _cli(tmp_path, command, workdir, *extra):
  return subprocess.run([sys.executable, "-m", "dihal_jax.cli", command, *TINY,
                         f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}",
                         *extra], cwd=REPO, capture_output=True, text=True, timeout=900)


def _samples(workdir):
  return (workdir / "samples.jsonl").read_text()


@pytest.mark.slow
def test_train_fits_the_decoder_and_sample_reads_through_it(tmp_path):
  import json
  workdir = tmp_path / "w"
  proc = _cli(tmp_path, "train", workdir, "--config.tolerant.enabled=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  nll = json.loads((workdir / "report.json").read_text())["tolerant_decoder"]["val_nll"]
  assert nll["adapted_on_estimates"] < nll["plain_on_estimates"]
  rows = [json.loads(line) for line in (workdir / "decoder" / "metrics.jsonl").open()]
  assert rows[-1]["step"] == 12 and "val_loss" in rows[-1]
  # a rerun resumes at the end: nothing more is trained
  again = _cli(tmp_path, "train", workdir, "--config.tolerant.enabled=True")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 12" in again.stdout
  # the samples of the same bridge and key differ once the decoder is gone
  assert _cli(tmp_path, "sample", workdir).returncode == 0
  plain = tmp_path / "plain"
  shutil.copytree(workdir, plain)
  shutil.rmtree(plain / "decoder")
  assert _cli(tmp_path, "sample", plain).returncode == 0
  assert _samples(workdir) != _samples(plain)


@pytest.mark.slow
def test_ablate_reads_a_tolerant_row_from_its_twins_bridge_beside_trivial_generators(tmp_path):
  import json
  workdir = tmp_path / "a"
  proc = _cli(tmp_path, "ablate", workdir,
              "--config.ablate.rows=unet_scratch,unet_scratch_tolerant",
              "--config.ablate.betas=(1.0,)", "--config.sample.beta=1.0", "--config.eval.num=8",
              "--config.sample.batch=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  plain, tolerant = report["rows"]["unet_scratch"], report["rows"]["unet_scratch_tolerant"]
  # one bridge for the pair: the tolerant row's directory holds its decoder alone
  assert [p.name for p in (workdir / "unet_scratch_tolerant").iterdir()] == ["decoder"]
  assert tolerant["tolerant_decoder"] and not plain["tolerant_decoder"]
  # the same states (the current-token head reads them without the decoder) ...
  assert tolerant["reads"]["identity"] == plain["reads"]["identity"]
  # ... read through the decoder by its own oracle and joint reads
  assert "joint_beta1" in tolerant["decoder_oracle"] and "decoder_oracle" not in plain
  assert set(report["calibration"]) == {"unigram_sampler", "bigram_sampler"}
  assert "unigram_sampler (trivial)" in (workdir / "report.md").read_text()
