"""End to end on the embedded SmolLM2-135M (GGUF -> safetensors -> JAX), through the CLI.

The fp32 parity targets: mean KL <= 1e-6, max |Δlogit| <= 1e-3, 32 greedy
tokens equal to `transformers` generate.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _dihal(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "dihal_jax.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_parity_command_meets_targets(tmp_path):
  proc = _dihal("parity", "--config=configs/smollm2_135m.py", "--config.mesh.data=1",
                f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["text"] == "austen_emma" and min(report["row_lengths"]) >= 200
  assert max(report["row_lengths"]) >= 256 and len(set(report["row_lengths"])) > 1
  assert report["mean_kl"] <= 1e-6
  assert report["max_abs_logit_diff"] <= 1e-3
  assert report["argmax_agreement"] == 1.0
  gen = report["generation"]
  assert gen["equal"] and gen["total_tokens"] == 2 * 32
  assert len(report["hidden_max_abs_diff"]) == 31


def test_convert_command_roundtrips_bitwise(tmp_path):
  proc = _dihal("convert", "--config=configs/smollm2_135m.py", "--config.mesh.data=1",
                f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["roundtrip"]["bit_identical"] and report["roundtrip"]["tensors"] == 2 + 30 * 9  # embed, final norm, 9 per layer (tied head)
  assert report["num_params"] == 134_515_008
  assert (tmp_path / "hf" / "tokenizer.json").is_file()
