"""Shared test setup.

Eight simulated CPU devices for the whole suite (the flag must be set before
jax is imported); single-device tests ask for a {"data": 1} mesh.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def error_line(result) -> str:
  """Asserts the bad-input contract on the process; returns its `dihal: error:` line."""
  context = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  assert "Traceback" not in result.stderr, context
  assert result.returncode == 2, context
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("dihal: error:"), context
  assert sum(line.startswith("dihal: error:") for line in lines) == 1, context
  return lines[-1]


def load_config(name: str):
  """configs/<name>.py -> its get_config()."""
  from dihal_jax.defaults import load_config_file
  return load_config_file(REPO / "configs" / f"{name}.py")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
  """{"tiny_llama": dir, "tiny_qwen3": dir}: seeded random HF checkpoints (transformers)."""
  from dihal_jax.backbone.checkpoint import random_hf_checkpoint

  root = tmp_path_factory.mktemp("tiny_ckpt")
  return {name: random_hf_checkpoint(load_config(name).model.hf_config.to_dict(), root / name,
                                     seed=0)
          for name in ("tiny_llama", "tiny_qwen3")}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
  """(JAX Decoder on one device, the same tiny Llama in transformers) for readout tests."""
  import torch
  from transformers import AutoModelForCausalLM

  from dihal_jax.backbone.convert import load_model
  from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

  path = tiny_checkpoints["tiny_llama"]
  model = load_model(path, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES)
  return model, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
