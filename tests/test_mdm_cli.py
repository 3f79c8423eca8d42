"""`dihal mdm` and `dihal sample --method=mdm` end to end on the tiny model: kill -9 resume
bit for bit, SIGTERM, samples, and each kind of bad input (one `dihal: error:` line, exit 2)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, error_line

pytestmark = pytest.mark.slow

STEPS = 24


def _args(tmp_path, workdir, command="mdm", *extra):
  return [sys.executable, "-m", "dihal_jax.cli", command, "--config=configs/tiny_llama.py",
          f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          f"--config.mdm.steps={STEPS}", "--config.mdm.checkpoint_every=6",
          "--config.mdm.log_every=1", "--config.mdm.val_every=12", "--config.mdm.batch_size=8",
          "--config.mdm.warmup_steps=3", "--config.mdm.anneal_steps=10", *extra]


def _run(tmp_path, workdir, *extra, command="mdm"):
  return subprocess.run(_args(tmp_path, workdir, command, *extra), cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [row["step"] for row in rows]
  assert steps == sorted(set(steps)), "a restart must drop rows past the restored step"
  return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("mdm")
  proc = _run(tmp_path, tmp_path / "a")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp_path, tmp_path / "a"


def test_loss_falls_and_annealing_reaches_bidirectional(uninterrupted):
  _, run = uninterrupted
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([r["attention_rate"] for r in rows][:3], [0.0, 0.1, 0.2], atol=1e-6)
  assert rows[-1]["attention_rate"] == 1.0
  first, last = np.mean([r["loss"] for r in rows[:4]]), np.mean([r["loss"] for r in rows[-4:]])
  assert last < first, (first, last)
  assert (run / "loss.png").is_file() and "val_loss" in rows[-1]


def test_kill_9_and_restart_reproduces_the_uninterrupted_run(uninterrupted):
  tmp_path, run_a = uninterrupted
  run_b = tmp_path / "b"
  proc = subprocess.Popen(_args(tmp_path, run_b), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not [p for p in (run_b / "checkpoints").glob("[0-9]*") if p.name.isdigit()]:
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert max(_losses(run_b)) < STEPS
  again = _run(tmp_path, run_b)
  assert again.returncode == 0 and "resumed from step" in again.stdout, again.stderr[-3000:]
  a, b = _losses(run_a), _losses(run_b)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  assert all(a[s] == b[s] for s in a)
  restore = ocp.StandardCheckpointer().restore
  final = lambda run: restore(run / "checkpoints" / str(STEPS) / "state")["params"]
  leaves_a = [np.asarray(x) for x in jax.tree.leaves(final(run_a))]
  leaves_b = [np.asarray(x) for x in jax.tree.leaves(final(run_b))]
  assert len(leaves_a) == len(leaves_b) > 5
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)  # bit for bit


def test_sigterm_saves_and_exits_0(uninterrupted):
  tmp_path, _ = uninterrupted
  run = tmp_path / "sigterm"
  proc = subprocess.Popen(_args(tmp_path, run), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "SIGTERM: saved step" in out, err[-2000:]


def test_sample_with_a_prompt_and_an_infill(uninterrupted):
  tmp_path, run = uninterrupted
  proc = _run(tmp_path, run, "--method=mdm", "--num=3", "--config.sample.mdm_steps=4",
              "--prompt=It is a truth",
              "--config.sample.mdm_block=16", command="sample")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
  assert len(rows) == 3 and all(r["text"].startswith("It is a truth") for r in rows)
  assert all(len(r["tokens"]) == 64 and 259 not in r["tokens"] for r in rows)  # nothing masked
  proc = _run(tmp_path, run, "--method=mdm", "--num=2", "--config.sample.mdm_steps=4",
              "--infill=She said [___] and left.", command="sample")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
  assert all(r["text"].startswith("She said ") and r["text"].endswith(" and left.")
             for r in rows)


@pytest.mark.parametrize("override,needle", [
    ("--config.mdm.anneal_steps=-1", "mdm.anneal_steps"),
    ("--config.mdm.mask_id=100000", "mdm.mask_id"),
    ("--config.sample.mdm_block=5", "mdm_block"),
    ("--config.sample.unmask=entropy", "sample.unmask"),
])
def test_bad_settings_are_one_line(tmp_path, override, needle):
  if "mdm_block" in override or "unmask" in override:
    proc = _run(tmp_path, tmp_path / "w", "--method=mdm", override, command="sample")
  else:
    proc = _run(tmp_path, tmp_path / "w", override)
  assert needle in error_line(proc)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_bridge_checkpoint_given_as_an_mdm_is_refused(tmp_path):
  bridge = subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "train", "--config=configs/tiny_llama.py",
       f"--workdir={tmp_path / 'bridge'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
       "--config.bridge.layer=1", "--config.train.steps=2", "--config.train.checkpoint_every=2",
       "--config.train.cache_windows=16", "--config.train.val_windows=8",
       "--config.train.batch_size=8", "--config.train.warmup_steps=1",
       "--config.bridge.unet.channels=16", "--config.bridge.unet.heads=2",
       "--config.bridge.unet.groups=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bridge.returncode == 0, bridge.stderr[-3000:]
  proc = _run(tmp_path, tmp_path / "bridge", "--method=mdm", command="sample")
  assert "not a masked diffusion model" in error_line(proc)
  assert not (tmp_path / "bridge" / "samples.jsonl").exists()


MECHANISM = ("--config.mechanism.windows=4", "--config.mechanism.task_items=4",
             "--config.mechanism.span=3", "--config.mechanism.filler=3",
             "--config.mechanism.bigram_position=6", "--config.mechanism.masks=2",
             "--config.mechanism.head_layers=1")


def _mechanism(tmp_path, workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "mechanism", "--config=configs/tiny_llama.py",
       f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}", *MECHANISM,
       *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_mechanism_report_has_every_section(uninterrupted):
  tmp_path, run = uninterrupted
  out = tmp_path / "mechanism"
  proc = _mechanism(tmp_path, out, f"--config.mechanism.mdm={run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["mdm"]["step"] == STEPS and report["windows"] == 4
  assert [r["layer"] for r in report["cka"]] == [1, 2, 3]
  assert all(0 <= r[k] <= 1 + 1e-9 for r in report["cka"]
             for k in ("cka", "cka_masked", "cka_normed", "cka_init_normed_masked"))
  assert {(r["model"], r["layer"]) for r in report["attention"]} == {
      (m, l) for m in ("ar", "mdm", "ar_bidir") for l in (1, 2, 3)}
  assert all(r["future"] == 0.0 for r in report["attention"] if r["model"] == "ar")
  assert all(r["future"] > 0.0 for r in report["attention"] if r["model"] != "ar")
  for name in ("bigram", "copy"):
    task = report["tasks"][name]
    assert len(task["patching"]["ar"]) == len(task["patching"]["mdm"]) == 3
    assert set(task["early_share"]) == {"ar", "mdm"} and len(task["head_patching"]["ar"]) == 1
    assert task["ar_acc_ci"][0] <= task["ar_acc"] <= task["ar_acc_ci"][1]
    assert -1 <= task["profile_correlation"] <= 1
  assert report["tasks"]["copy"]["position"] - report["tasks"]["copy"]["cue"] == 6
  for name in ("report.md", "cka.png", "attention.png", "logit_lens.png", "patching.png"):
    assert (out / name).is_file(), name


@pytest.mark.parametrize("override,needle", [
    ("--config.mechanism.mask_rate=1.0", "mechanism.mask_rate"),
    ("--config.mechanism.head_layers=4", "mechanism.head_layers"),
    ("--config.mechanism.filler=60", "mechanism.filler"),
])
def test_mechanism_bad_settings_are_one_line(tmp_path, override, needle):
  proc = _mechanism(tmp_path, tmp_path / "w", override)
  assert needle in error_line(proc)
  assert not (tmp_path / "w" / "report.json").exists()


def test_mechanism_without_an_mdm_is_one_line(tmp_path):
  proc = _mechanism(tmp_path, tmp_path / "w")
  assert "dihal mdm" in error_line(proc)
  assert not (tmp_path / "w" / "report.json").exists()
