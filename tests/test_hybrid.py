"""Hybrid readouts against known answers: torch greedy decoding, teacher-forced argmax,
NumPy class means and nearest neighbours; `dihal sample` / `dihal eval` end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import REPO, load_config
from dihal_jax import defaults
from dihal_jax.backbone.checkpoint import byte_tokenizer
from dihal_jax.bridge.diffusion import DiffusionConfig
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.errors import UserInputError
from dihal_jax.hybrid.readout import Readout, ReadoutConfig, nearest_embedding, validate
from dihal_jax.hybrid.sample import infill_template

SEP, N = 1, 16


class StubBridge:
  """A bridge stand-in: `fn(known_h, known_mask)` decides the sampled states."""

  def __init__(self, fn, dim):
    self.fn = fn
    self.norm = Normalizer("per_channel", np.zeros(dim, np.float32), np.ones(dim, np.float32))
    self.diffusion = DiffusionConfig()
    self.calls = 0

  def sample(self, key, known_h, known_mask, *, steps=None, x_start=None, t_start=1.0):
    self.calls += 1
    return self.fn(key, known_h, known_mask)


def _torch_argmax(torch_model, tokens):
  with torch.no_grad():
    return torch_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.argmax(-1)


@pytest.mark.slow
def test_blockwise_with_blocks_of_one_is_greedy_decoding(models):
  """Block size 1: each token is read at the last real prefix position, so blockwise at
  temperature 0 is the backbone's greedy decoding whatever the bridge samples."""
  model, torch_model = models
  reader = Readout(model, 1, SEP)
  noise = StubBridge(lambda k, h, m: jnp.where(m[..., None], h, jax.random.normal(k, h.shape)),
                     model.cfg.hidden_size)
  tokens, known = reader.template(2, N)
  out = reader.fill(noise, jax.random.key(0), tokens, known, mode="blockwise",
                    cfg=ReadoutConfig(temperature=0.0, block=1))
  ids = torch.full((2, 1), SEP, dtype=torch.long)
  for _ in range(N - 1):  # torch greedy decoding, no cache
    ids = torch.cat([ids, _torch_argmax(torch_model, ids)[:, -1:]], dim=1)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), ids.numpy())
  assert noise.calls == N - 1


def test_lm_head_readout_of_true_states_is_the_teacher_forced_argmax(models):
  model, torch_model = models
  reader = Readout(model, 1, SEP)
  text = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (3, N)).astype(np.int32)
  text[:, 0] = SEP
  got = np.asarray(reader.lm_head(reader.lower(text), jax.random.key(0),
                                  ReadoutConfig(temperature=0.0)))
  want = _torch_argmax(torch_model, text).numpy()
  np.testing.assert_array_equal(got[:, 0], SEP)
  np.testing.assert_array_equal(got[:, 1:], want[:, :-1])


def test_refine_stops_once_the_tokens_stop_changing(models):
  """A bridge that always returns the true states of one text: round 1 reads the same tokens
  as the first readout (temperature 0), so refine stops after one round."""
  model, torch_model = models
  reader = Readout(model, 1, SEP)
  text = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (2, N)).astype(np.int32)
  text[:, 0] = SEP
  true_h = reader.lower(text)
  fixed = StubBridge(lambda k, h, m: true_h, model.cfg.hidden_size)
  tokens, known = reader.template(2, N)
  out = reader.fill(fixed, jax.random.key(0), tokens, known, mode="refine",
                    cfg=ReadoutConfig(temperature=0.0, rounds=4))
  assert out["rounds"] == 1 and fixed.calls == 2
  np.testing.assert_array_equal(np.asarray(out["tokens"])[:, 1:],
                                _torch_argmax(torch_model, text).numpy()[:, :-1])


def test_nearest_embedding_matches_numpy():
  rng = np.random.default_rng(3)
  embed = rng.normal(size=(50, 8)).astype(np.float32)
  h = rng.normal(size=(3, 6, 8)).astype(np.float32)
  want = np.argmin(((h[:, :, None, :] - embed[None, None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(nearest_embedding(h, embed)), want)


def test_infill_template_marks_gaps_and_pads():
  tok = byte_tokenizer()
  tokens, known = infill_template("ab [___]c", tok, SEP, gap=3, factor=4)
  ab = tok("ab ", add_special_tokens=False)["input_ids"]
  c = tok("c", add_special_tokens=False)["input_ids"]
  want_known = [True] + [True] * len(ab) + [False] * 3 + [True] * len(c)
  want_known += [False] * (-len(want_known) % 4)
  np.testing.assert_array_equal(known, want_known)
  assert len(tokens) % 4 == 0 and tokens[0] == SEP
  np.testing.assert_array_equal(tokens[1:1 + len(ab)], ab)
  with pytest.raises(UserInputError, match="gap"):
    infill_template("no gaps", tok, SEP, gap=3, factor=4)


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("temperature", -1.0), ("block", 16),
                                         ("renoise_t", 0.0)])
def test_bad_readout_settings_name_the_field(field, value):
  with pytest.raises(UserInputError, match=field):
    validate("blockwise", ReadoutConfig(**{field: value}), N)
  with pytest.raises(UserInputError, match="readout"):
    validate("argmax", ReadoutConfig(), N)


# --- end to end: dihal train -> sample -> eval on the tiny model ------------------------------

TINY = ["--config=configs/tiny_llama.py", "--config.bridge.layer=1", "--config.train.steps=12",
        "--config.train.checkpoint_every=12", "--config.train.val_every=6",
        "--config.train.cache_windows=32", "--config.train.val_windows=8",
        "--config.train.batch_size=8", "--config.train.warmup_steps=3",
        "--config.bridge.unet.channels=16", "--config.bridge.unet.heads=2",
        "--config.bridge.unet.groups=4", "--config.sample.steps=4", "--config.sample.batch=8"]


E2E_SEP = byte_tokenizer().convert_tokens_to_ids("<|endoftext|>")  # tiny_llama's separator


def _dihal(tmp_path, command, *extra, workdir=None):
  args = [sys.executable, "-m", "dihal_jax.cli", command, *TINY,
          f"--workdir={workdir or tmp_path / 'run'}",
          f"--config.data.cache_dir={tmp_path / 'cache'}", *extra]
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("hybrid")
  proc = _dihal(tmp_path, "train")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["blockwise", "lm_head", "refine", "identity", "joint"])
def test_dihal_sample_every_readout(trained, readout):
  proc = _dihal(trained, "sample", "--num=3", f"--readout={readout}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (trained / "run" / "samples.jsonl").read_text().splitlines()]
  assert len(rows) == 3 and all(r["readout"] == readout for r in rows)
  assert all(len(r["tokens"]) == 64 and r["tokens"][0] == E2E_SEP for r in rows)
  # Every drawn token is a word of the model's vocabulary, and the text is its decoding (the
  # test's own byte tokenizer, not the checkpoint's copy).
  tok, vocab = byte_tokenizer(), load_config("tiny_llama").model.hf_config.vocab_size
  for r in rows:
    assert all(0 <= t < vocab for t in r["tokens"]), r["tokens"]
    assert r["text"] == tok.decode(r["tokens"][1:])


@pytest.mark.slow
def test_dihal_sample_prompt_and_infill_keep_the_given_text(trained):
  tok = byte_tokenizer()
  proc = _dihal(trained, "sample", "--num=2", "--prompt=It is a truth")
  assert proc.returncode == 0, proc.stderr[-3000:]
  prefix = [E2E_SEP] + tok("It is a truth", add_special_tokens=False)["input_ids"]
  for line in (trained / "run" / "samples.jsonl").read_text().splitlines():
    assert json.loads(line)["tokens"][:len(prefix)] == prefix
  proc = _dihal(trained, "sample", "--num=2", "--infill=Emma [___] was here")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # [separator] + "Emma " + sample.gap drawn positions + " was here", each part tokenized alone.
  head = [E2E_SEP] + tok("Emma ", add_special_tokens=False)["input_ids"]
  tail = tok(" was here", add_special_tokens=False)["input_ids"]
  gap = load_config("tiny_llama").sample.gap
  for line in (trained / "run" / "samples.jsonl").read_text().splitlines():
    tokens = json.loads(line)["tokens"]
    assert tokens[:len(head)] == head
    assert tokens[len(head) + gap:len(head) + gap + len(tail)] == tail
    assert json.loads(line)["text"].startswith("Emma ")


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (("--readout=argmax",), "readout"),
    (("--prompt=" + "x" * 80,), "prompt"),
    (("--infill=no gap here",), "gap"),
    (("--length=30",), "multiple"),
])
def test_dihal_sample_bad_input_exits_2(trained, extra, message):
  proc = _dihal(trained, "sample", "--num=2", *extra)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith("dihal: error:") and message in last


@pytest.mark.slow
def test_eval_reads_the_joint_rows_at_real_texts_entropy(trained):
  """eval.match_entropy: the joint rows (the bridge's and the oracle's) report the
  temperature they were read at; a row is called matched exactly when its entropy is within
  0.1 nats of real text's (the same windows)."""
  proc = _dihal(trained, "eval",
                "--config.eval.methods=real_text,oracle,dihal_joint,dihal_identity",
                "--config.eval.match_entropy=True", "--config.eval.num=8",
                "--config.data.ood_dir=", "--config.sample.beta=0.3",
                "--config.sample.readout=joint")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((trained / "run" / "report.json").read_text())
  rows, continuation = report["results"], report["continuation"]
  real = rows["real_text"]["entropy"]
  assert "temperature" not in rows["dihal_identity"]
  for row in (rows["dihal_joint"], continuation["dihal_joint"], rows["oracle"]):
    assert 0.05 <= row["temperature"] <= 4.0
  for row in (rows["dihal_joint"], rows["oracle"]):  # both read against these windows
    assert row["entropy_matched"] == (abs(row["entropy"] - real) <= 0.1)
  assert rows["oracle"]["entropy_matched"]  # the true states reach it (12 bridge steps may not)
  assert "T (entropy-matched)" in (trained / "run" / "report.md").read_text()


@pytest.mark.slow
def test_sample_and_eval_without_a_trained_bridge_exit_2(tmp_path):
  for command, extra in (("sample", ()), ("eval", ("--config.eval.methods=dihal",))):
    proc = _dihal(tmp_path, command, *extra, workdir=tmp_path / "empty")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dihal train" in proc.stderr.splitlines()[-1]
  proc = _dihal(tmp_path, "eval", "--config.eval.methods=dihal,bogus", workdir=tmp_path / "e")
  assert proc.returncode == 2 and "bogus" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_oracle_blockwise_in_one_block_is_the_teacher_forced_argmax(models):
  """The oracle's stand-in bridge returns the true states; with one block over the whole
  window every read position sees only true states, so blockwise at temperature 0 gives the
  teacher-forced argmax of the real text (torch)."""
  from dihal_jax.eval.evaluate import oracle_tokens
  model, torch_model = models
  reader = Readout(model, 1, SEP)
  text = np.random.default_rng(3).integers(3, model.cfg.vocab_size, (3, N)).astype(np.int32)
  text[:, 0] = SEP
  got = oracle_tokens(reader, np.asarray(reader.lower(text)), jax.random.key(0),
                      ReadoutConfig(temperature=0.0, block=N - 1), "blockwise", None, batch=2)
  np.testing.assert_array_equal(got[:, 0], SEP)
  np.testing.assert_array_equal(got[:, 1:], _torch_argmax(torch_model, text).numpy()[:, :-1])


def test_default_methods_skip_the_rows_that_repeat_the_default_readout():
  from dihal_jax.eval.evaluate import METHODS, default_methods
  from dihal_jax.overrides import overridden
  config = defaults.base()

  def skipped(**changes):
    return set(METHODS) - set(default_methods(overridden(config, changes)))

  assert skipped(**{"sample.readout": "blockwise"}) == {"dihal_blockwise"}
  assert skipped(**{"sample.readout": "lm_head"}) == {"dihal_lm_head", "oracle_lm_head"}
  assert skipped(**{"sample.readout": "blockwise", "eval.mdm_block": 0}) == {
      "dihal_blockwise", "mdm_block"}
