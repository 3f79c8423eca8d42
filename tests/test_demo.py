"""`dihal demo` end to end at the smoke preset on the tiny random model (the reduced `make demo`)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_smoke_runs_the_whole_pipeline(tmp_path):
  workdir = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "demo", "--config=configs/tiny_llama.py",
       "--config.demo.preset=smoke", f"--workdir={workdir}",
       f"--config.data.cache_dir={tmp_path / 'cache'}"],
      cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  from dihal_jax.eval.evaluate import METHODS
  assert list(report["results"]) == list(METHODS)
  assert report["train"]["layer"] == report["locate"]["selected_layer"]
  assert report["effective_config"]["train"]["steps"] == 12  # the preset was applied
  for name in ("report.md", "parity.png", "geometry.png", "loss.png", "eval.png"):
    assert (workdir / name).is_file(), name
  assert "| real_text |" in (workdir / "report.md").read_text()


def test_demo_unknown_preset_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "demo", "--config=configs/tiny_llama.py",
       "--config.demo.preset=huge", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "demo.preset" in proc.stderr.splitlines()[-1]
