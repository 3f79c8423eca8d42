"""Impossible settings: one `dihal: error:` line naming the flag, exit 2, no traceback, nothing
written (the check runs before any work), and a new user's corpus end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_config
from dihal_jax import settings
from dihal_jax.errors import UserInputError


def _cli(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "dihal_jax.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("command,extra,flag", [
    ("train", ["--config.train.steps=40"], "--config.train.warmup_steps=100"),
    ("train", ["--config.train.steps=0"], "--config.train.steps=0"),
    ("train", ["--config.train.lr=0"], "--config.train.lr=0"),
    ("train", ["--config.train.checkpoint_every=0"], "--config.train.checkpoint_every=0"),
    ("train", ["--config.train.cache_windows=4"], "--config.train.cache_windows=4"),
    ("train", ["--config.bridge.layer=7"], "--config.bridge.layer=7: outside 0..2"),
    ("locate", ["--config.bridge.layer=first"], "--config.bridge.layer='first'"),
    ("data", ["--config.data.window=1"], "--config.data.window=1"),
    ("data", ["--config.model.attention=flash"], "--config.model.attention='flash'"),
    ("data", ["--config.data.window=100000"], "--config.data.window=100000: longer than"),
    ("eval", ["--config.eval.seeds=0"], "--config.eval.seeds=0"),
    ("eval", ["--config.eval.num=1"], "--config.eval.num=1"),
    ("eval", ["--config.eval.prefix=1"], "--config.eval.prefix=1"),
    ("sweep", ["--config.train.warmup_steps=-1"], "--config.train.warmup_steps=-1"),
    ("sample", ["--config.sample.beta=-0.5"], "--config.sample.beta=-0.5: expected >= 0"),
    ("ablate", ["--config.ablate.betas=(1.0,-0.3)"], "--config.ablate.betas=(1.0, -0.3)"),
    ("train", ["--config.train.time_sampling=cosine"], "--config.train.time_sampling='cosine'"),
    ("train", ["--config.bridge.dtype=float16"], "--config.bridge.dtype='float16'"),
    ("train", ["--config.train.logit_normal=(0.0,0.0)"], "--config.train.logit_normal=(0.0, 0.0)"),
    ("train", ["--config.bridge.denoiser=mlp"], "--config.bridge.denoiser='mlp'"),
    ("train", ["--config.train.upper_ce_windows=0"],
     "--config.train.upper_ce=0.0, upper_ce_windows=0"),
    ("train", ["--config.train.upper_ce=-0.1"], "--config.train.upper_ce=-0.1"),
    ("train", ["--config.tolerant.rank=0"], "--config.tolerant: rank=0"),
    ("ablate", ["--config.tolerant.lr=-1.0"], "--config.tolerant: rank=16"),
    ("mdm", ["--config.mdm.block=7"], "--config.mdm.block=7: must be 0"),
    ("mdm", ["--config.mdm.block=16", "--config.mdm.anneal_steps=10"],
     "--config.mdm.block=16 with --config.mdm.anneal_steps=10"),
    ("eval", ["--config.eval.mdm_block=24"], "--config.eval.mdm_block=24"),
    ("eval", ["--config.eval.mdm_block=-16"], "--config.eval.mdm_block=-16"),
    ("eval", ["--config.eval.mdm_block=0", "--config.eval.methods=real_text,mdm_block"],
     "--config.eval.mdm_block=0 (no block-diffusion row)"),
    ("train", ["--config.bridge.init=pretrained"], "--config.bridge.init='pretrained'"),
    ("train", ["--config.bridge.layer=1", "--config.bridge.denoiser=transformer",
               "--config.bridge.init=backbone", "--config.bridge.transformer.blocks=3"],
     "--config.bridge.init=backbone: blocks 2..4 do not exist"),
    ("ablate", ["--config.bridge.layer=2", "--config.bridge.denoiser=transformer",
                "--config.bridge.init=backbone"],
     "--config.bridge.init=backbone: blocks 3..6 do not exist"),
])
def test_impossible_settings_exit_2_before_any_work(tmp_path, command, extra, flag):
  workdir = tmp_path / "w"
  proc = _cli(command, "--config=configs/tiny_llama.py", *extra, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"dihal: error: {flag}"), lines
  assert not workdir.exists()


def test_overrides_without_a_config_file_say_what_to_do(tmp_path):
  proc = _cli("eval", f"--workdir={tmp_path / 'w'}", "--config.data.dir=/some/dir")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("dihal: error: --config.data.dir: pass --config=FILE before the "
                                 "--config.* overrides (e.g. --config=configs/smollm2_135m.py)")


def test_the_defaults_and_every_config_pass():
  for name in ("smollm2_135m", "tiny_llama", "tiny_qwen3", "llama3_1_8b_instruct", "qwen3_8b"):
    for command in ("train", "eval", "data"):
      settings.check(load_config(name), command)
  config = load_config("tiny_llama")
  config.train.warmup_steps = config.train.steps
  with pytest.raises(UserInputError, match="warmup_steps"):
    settings.check(config, "train")
  settings.check(config, "data")  # `dihal data` does not train


# --- a new user's text end to end -----------------------------------------------------------

def _news_folder(path):
  """One file, one generated news article per line, no chapter headings."""
  rng = np.random.default_rng(0)
  nouns = ["council", "market", "river", "school", "minister", "storm", "team", "bank"]
  verbs = ["approved", "closed", "opened", "warned", "reported", "won", "raised", "cut"]
  path.mkdir(parents=True)
  articles = []
  for _ in range(60):
    sentences = [f"The {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} on "
                 f"{rng.choice(['Monday', 'Friday'])}." for _ in range(int(rng.integers(8, 14)))]
    articles.append(" ".join(sentences))
  (path / "news.txt").write_text("\n".join(articles) + "\n", encoding="utf-8")
  return path


@pytest.mark.slow
def test_a_one_article_per_line_folder_end_to_end(tmp_path):
  folder = _news_folder(tmp_path / "news")
  common = ["--config=configs/tiny_llama.py", f"--config.data.dir={folder}",
            "--config.data.ood_dir=", f"--config.data.cache_dir={tmp_path / 'cache'}",
            f"--workdir={tmp_path / 'run'}"]
  proc = _cli("data", *common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  (entry,) = report["corpora"]["in_domain"]["files"]
  assert entry["document_rule"] == "lines" and entry["documents"] == 60
  assert report["corpora"]["in_domain"]["split_rule"] == "documents"
  assert all(split["windows"] >= 8 for split in report["splits"].values())
  small = ["--config.locate.num_tokens=2048", "--config.locate.batch_size=8",
           "--config.locate.reservoir=512", "--config.locate.anchors=64",
           "--config.locate.pairs=1024", "--config.train.steps=8",
           "--config.train.warmup_steps=2", "--config.train.batch_size=8",
           "--config.train.cache_windows=32", "--config.train.val_windows=8",
           "--config.train.val_every=4", "--config.train.checkpoint_every=8",
           "--config.bridge.unet.channels=16", "--config.bridge.unet.heads=2",
           "--config.bridge.unet.groups=4", "--config.sample.steps=4",
           "--config.sample.batch=4", "--config.eval.num=4"]
  for command, extra in (("locate", []), ("train", []), ("sample", ["--num=2"]),
                         ("eval", ["--config.eval.methods=real_text,bigram_sampler,dihal"])):
    proc = _cli(command, *common, *small, *extra)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  assert set(report["results"]) == {"real_text", "bigram_sampler", "dihal"}
  assert np.isfinite(report["results"]["dihal"]["ngram_ppl"])
  samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
  assert len(samples) == 2


def test_overridden_sets_existing_fields_and_rejects_unknown_ones(monkeypatch):
  """One override mechanism (presets, sweep, ablation, eval's l = 0 bridge, `sample` flags):
  a path of no field raises, even on an unlocked config, and the input is left unchanged."""
  from dihal_jax import demo
  from dihal_jax.overrides import overridden
  config = load_config("tiny_llama")
  assert not config.is_locked
  changed = overridden(config, {"train.steps": 7, "bridge.unet.channels": 8})
  assert (changed.train.steps, changed.bridge.unet.channels) == (7, 8)
  assert config.train.steps != 7
  for typo in ({"train.stepz": 1}, {"trian.steps": 1}, {"bridge.unet.chanels": 8}):
    with pytest.raises(KeyError):
      overridden(config, typo)
  with pytest.raises(TypeError):  # ml_collections' type check: an int field stays an int
    overridden(config, {"train.steps": "many"})
  monkeypatch.setitem(demo.PRESETS, "quick", {"train.stepz": 1})
  config.demo.preset = "quick"
  with pytest.raises(KeyError):
    demo.apply_preset(config)
