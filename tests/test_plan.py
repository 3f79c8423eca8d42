"""`dihal plan`: per-device bytes against closed forms, fits / suggestions, the CLI, --compile.

The parameter counts are written out here from the HF config.json fields
(embedding, untied head, per layer q/k/v/o + gate/up/down + 2 RMSNorms, Qwen3's
q/k norms, the final norm), independently of `BackboneConfig.num_params`. Every
backbone weight has a model dimension ("embed", sharded over fsdp) except the
norms, so bytes per device = (N - norms) x 2 / fsdp + norms x 2 in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, load_config
from dihal_jax.errors import UserInputError
from dihal_jax.planning import aot, plan
from dihal_jax.parallel.topology import GIB, TOPOLOGIES, get_topology

TIMEOUT_S = 600
TOPOLOGY_NAMES = ("v5e-8", "v5e-16", "v4-32", "v5p-8", "h100x8", "h100x16")
FSDP = {"v5e-8": 8, "v5e-16": 16, "v4-32": 16, "v5p-8": 4, "h100x8": 8, "h100x16": 8}
# A small UNet keeps the tiny --compile test fast (the default one compiles in ~25 s here).
SMALL_UNET = ("--config.bridge.unet.channels=16", "--config.bridge.unet.channel_mults=(1,)",
              "--config.bridge.unet.blocks_per_level=1",
              "--config.bridge.unet.attention_levels=(0,)")


def llama_counts():
  """(parameters, norm parameters) of Llama-3.1-8B from its config.json fields."""
  v, d, f, layers, heads, kv, hd = 128256, 4096, 14336, 32, 32, 8, 128
  attention = d * heads * hd * 2 + d * kv * hd * 2
  norms = layers * 2 * d + d
  return 2 * v * d + layers * (attention + 3 * d * f) + norms, norms


def qwen_counts():
  """(parameters, norm parameters) of Qwen3-8B (q_norm / k_norm over head_dim per layer)."""
  v, d, f, layers, heads, kv, hd = 151936, 4096, 12288, 36, 32, 8, 128
  attention = d * heads * hd * 2 + d * kv * hd * 2
  norms = layers * (2 * d + 2 * hd) + d
  return 2 * v * d + layers * (attention + 3 * d * f) + norms, norms


COUNTS = {"llama3_1_8b_instruct": llama_counts, "qwen3_8b": qwen_counts}


def test_published_counts():
  assert llama_counts()[0] == 8_030_261_248
  assert qwen_counts()[0] == 8_190_735_360


@pytest.fixture(scope="module")
def models():
  """Models of both 8B configs (abstract, built once)."""
  return {name: plan.Models(load_config(name)) for name in COUNTS}


# --- library: bytes against closed forms -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("topology", TOPOLOGY_NAMES)
def test_backbone_bytes_per_device(models, name, topology):
  config = models[name].config
  mesh = plan.mesh_for(config, get_topology(topology))
  assert mesh["fsdp"] == FSDP[topology] and mesh["tensor"] == 1
  assert mesh["data"] * mesh["fsdp"] == TOPOLOGIES[topology].devices
  count, norms = COUNTS[name]()
  assert models[name].num_params == count
  memory = plan.memory(models[name], mesh, layer=8)["per_device_bytes"]
  expected = (count - norms) * 2 // FSDP[topology] + norms * 2
  assert {row["params"] for row in memory.values()} == {expected}


def test_bridge_and_optimizer_bytes(models):
  """Data parallel only (fsdp 1): the bridge is whole on every device in float32; the
  optimizer holds AdamW's mu and nu and the EMA (3 x params) plus a few int32 counters."""
  m = models["llama3_1_8b_instruct"]
  memory = plan.memory(m, {"data": 8, "fsdp": 1, "tensor": 1}, layer=8)["per_device_bytes"]
  bridge = m.bridge_params * 4
  assert memory["train"]["bridge_params"] == bridge == memory["sample"]["bridge_params"]
  fsdp = plan.memory(m, {"data": 1, "fsdp": 8, "tensor": 1}, layer=8)["per_device_bytes"]
  assert fsdp["train"]["bridge_params"] < bridge == fsdp["sample"]["bridge_params"]
  assert 0 <= memory["train"]["optimizer"] - 3 * bridge <= 64
  assert memory["locate"]["bridge_params"] == memory["locate"]["optimizer"] == 0
  assert memory["sample"]["optimizer"] == 0
  assert memory["train"]["params"] == llama_counts()[0] * 2
  for row in memory.values():
    assert row["total"] == sum(row[part] for part in plan.PARTS)


def test_sharded_bytes_round_up():
  mesh = {"data": 2, "fsdp": 8, "tensor": 1}
  assert plan.sharded_bytes((10, 3), jnp.float32, ("fsdp", None), mesh) == 2 * 3 * 4
  assert plan.sharded_bytes((10, 3), jnp.bfloat16, (("data", "fsdp"), None), mesh) == 1 * 3 * 2
  assert plan.sharded_bytes((10, 3), jnp.bfloat16, (), mesh) == 10 * 3 * 2


def test_residual_bytes():
  s = jax.ShapeDtypeStruct
  p, x = s((4, 5), jnp.float32), s((3, 4), jnp.float32)
  assert plan.residual_bytes(lambda p, x: jnp.sum(x @ p), p, x) == 0  # saves only the input x
  assert plan.residual_bytes(lambda p, x: jnp.sum(jnp.exp(x @ p)), p, x) == 3 * 5 * 4


def test_locate_scatter_is_counted(models):
  """The replicated d x d float32 scatter of every candidate layer (locate's largest term)."""
  m = models["llama3_1_8b_instruct"]
  terms = plan.phase_activations(m, {"data": 1, "fsdp": 8, "tensor": 1}, 31)["locate"]
  assert terms["moments"] >= 32 * 4096 ** 2 * 4
  assert terms["peak"] == terms["moments"] + terms["emitted_states"] + terms["context"] + max(
      terms["embedding_stage"], terms["block_stage"], terms["head_stage"])


def test_weights_in_place_at_small_batches(models):
  m = models["llama3_1_8b_instruct"]
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  assert plan.weights_in_place(m, mesh, 16, 64)
  assert not plan.weights_in_place(m, mesh, 1024, 64)
  assert not plan.weights_in_place(m, {"data": 8, "fsdp": 1, "tensor": 1}, 16, 64)


def test_estimates_closed_form(models):
  m = models["llama3_1_8b_instruct"]
  topology = get_topology("v5e-8")
  est = plan.estimates(m, topology, layer=10)
  per_layer = (llama_counts()[0] - 2 * 128256 * 4096 - 4096) // 32
  assert est["train_cache"]["flops_per_token"] == 2 * 10 * per_layer
  assert est["train_step"]["flops_per_token"] == 6 * m.bridge_params
  rate = 197e12 * 8 * plan.MFU
  assert est["locate"]["tokens_per_s"] == pytest.approx(rate / (2 * 31 * per_layer))
  blocks = -(-63 // 8)  # blockwise: one pass per block of 8 after the separator
  forward = 32 * per_layer + 128256 * 4096
  assert est["sample"]["flops_per_token"] == blocks * (50 * 2 * m.bridge_params + 2 * forward)
  assert "estimate" in est["note"]


# --- fits and suggestions -----------------------------------------------------------

@pytest.mark.slow
def test_replicated_8b_does_not_fit_v5e(models):
  """16 GB of bf16 weights on every 16 GiB chip: no; the suggestion shards them and fits."""
  config = models["llama3_1_8b_instruct"].config
  topology = get_topology("v5e-8")
  report = plan.make_plan(config, topology, mesh={"data": 8, "fsdp": 1, "tensor": 1})
  assert not report["fits"] and not report["fits_by_phase"]["locate"]
  suggested = report["suggested_mesh"]
  assert suggested is not None and suggested["data"] * suggested["fsdp"] * suggested["tensor"] == 8
  assert plan.make_plan(config, topology, mesh=suggested)["fits"]


@pytest.mark.slow
def test_huge_batch_fits_nowhere():
  config = load_config("llama3_1_8b_instruct")
  with config.unlocked():
    config.locate.batch_size = 8192
  report = plan.make_plan(config, get_topology("v5e-8"))
  assert not report["fits"] and report["suggested_mesh"] is None
  assert "smaller batches" in report["advice"] and "locate.batch_size" in report["advice"]


def test_presets_fit(models):
  """Every preset of both 8B configs fits its topology at the default batches."""
  for name, m in models.items():
    for topology in TOPOLOGY_NAMES:
      target = get_topology(topology)
      memory = plan.memory(m, plan.mesh_for(m.config, target), layer=m.cfg.num_layers - 1)
      worst = max(row["total"] for row in memory["per_device_bytes"].values())
      assert worst <= plan.HEADROOM * target.hbm_bytes, (name, topology, worst / GIB)


def test_bad_preset():
  config = load_config("llama3_1_8b_instruct")
  with config.unlocked():
    config.mesh_presets.v5e_8.fsdp = 4
  with pytest.raises(UserInputError, match="mesh_presets.v5e_8"):
    plan.mesh_for(config, get_topology("v5e-8"))


def test_compile_mesh():
  assert aot.compile_mesh({"data": 1, "fsdp": 8, "tensor": 1}) == {"data": 1, "fsdp": 8,
                                                                     "tensor": 1}
  assert aot.compile_mesh({"data": 2, "fsdp": 8, "tensor": 1}) == {"data": 2, "fsdp": 4,
                                                                     "tensor": 1}
  assert aot.compile_mesh({"data": 1, "fsdp": 16, "tensor": 1})["fsdp"] == 8
  assert aot.compile_mesh({"data": 1, "fsdp": 4, "tensor": 1})["fsdp"] == 4


# --- the CLI ---------------------------------------------------------------------------

def run_plan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dihal_jax.cli", "plan", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The bad-input contract (as in test_bad_input.py): exit 2, no traceback, one error line,
  last on stderr."""
  context = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  assert result.returncode == 2 and "Traceback" not in result.stderr, context
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("dihal: error:"), context
  assert sum(line.startswith("dihal: error:") for line in lines) == 1, context
  return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e-8", "v4-32", "v5p-8", "h100x16"])
@pytest.mark.parametrize("name", list(COUNTS))
def test_cli_prints_plan(name, topology):
  result = run_plan(f"--config=configs/{name}.py", f"--topology={topology}")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert f"on {topology}" in out and f"{COUNTS[name]()[0]:,} params" in out
  for phase in plan.PHASES:
    assert f"| {phase} |" in out
  assert "estimate" in out and out.rstrip().endswith("fits: True")


@pytest.mark.slow
def test_cli_out_json(tmp_path):
  out = tmp_path / "sub" / "plan.json"
  result = run_plan("--config=configs/qwen3_8b.py", "--topology=h100x16", f"--out={out}")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  for key in ("config", "topology", "num_params", "devices", "mesh", "per_device_bytes", "fits",
              "suggested_mesh", "estimates"):
    assert key in report, key
  assert report["topology"] == "h100x16" and report["devices"] == 16
  assert report["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}
  assert report["num_params"] == 8_190_735_360
  assert set(report["per_device_bytes"]) == set(plan.PHASES)
  for row in report["per_device_bytes"].values():
    assert set(plan.PARTS) <= set(row)
  assert report["fits"] is True and report["suggested_mesh"] is None
  assert [p.name for p in out.parent.iterdir()] == ["plan.json"]


@pytest.mark.slow
@pytest.mark.parametrize("args,names", [
    (("--topology=v9-9",), ("--topology", "v9-9", "v5e-8")),
    ((), ("--topology",)),
    (("--topology=v5e-8", "--config.mesh_presets.v5e-8.fsdp=4"), ("mesh_presets.v5e-8",)),
    (("--topology=v5e-8", "--config.data.window=62"), ("data.window",)),
], ids=["unknown-topology", "no-topology", "hyphen-override", "window"])
def test_cli_bad_input(args, names):
  line = error_line(run_plan("--config=configs/tiny_llama.py", *args))
  for name in names:
    assert name in line, (name, line)


@pytest.mark.slow
def test_cli_bad_out(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  line = error_line(run_plan("--config=configs/tiny_llama.py", "--topology=v5e-8",
                             f"--out={blocker / 'plan.json'}"))
  assert str(blocker) in line and "--out" in line
  line = error_line(run_plan("--config=configs/tiny_llama.py", "--topology=v5e-8",
                             f"--out={tmp_path}"))
  assert "directory" in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow
def test_cli_compile_tiny(tmp_path):
  """--compile without XLA_FLAGS: the CLI asks for 8 CPU devices itself, and reports XLA's
  memory analysis of both programs beside the estimate."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "plan.json"
  result = run_plan("--config=configs/tiny_llama.py", "--topology=h100x16", "--compile",
                    f"--out={out}", *SMALL_UNET, env=env)
  assert result.returncode == 0, result.stderr
  compiled = json.loads(out.read_text())["compiled"]
  assert compiled["devices"] == 8 and compiled["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert not compiled["same_mesh"] and "scaled down" in compiled["note"]
  for name in ("forward", "train_step"):
    program = compiled["programs"][name]
    assert program["argument_bytes"] > 0 and program["temp_bytes"] > 0, program
    assert program["estimate_total_bytes"] > 0
  # The donated train state: outputs alias the arguments.
  assert compiled["programs"]["train_step"]["alias_bytes"] > 0
  assert "| forward |" in result.stdout and "| train_step |" in result.stdout


def test_cli_compile_needs_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  line = error_line(run_plan("--config=configs/tiny_llama.py", "--topology=v5e-8", "--compile",
                             *SMALL_UNET, env=env))
  assert aot.XLA_FLAG in line


@pytest.mark.slow
def test_cli_compile_llama_8b(tmp_path):
  """The 8B forward and bridge step compile for v5e-8's own mesh (bf16, nothing allocated;
  ~30 s and ~1.3 GB RSS on the 2-core CI machine)."""
  out = tmp_path / "plan.json"
  result = run_plan("--config=configs/llama3_1_8b_instruct.py", "--topology=v5e-8", "--compile",
                    f"--out={out}")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  compiled = report["compiled"]
  assert compiled["same_mesh"] and compiled["mesh"] == report["mesh"]
  forward = compiled["programs"]["forward"]
  # Arguments = the params' shards (+ the tokens): the plan's own count.
  params = report["per_device_bytes"]["locate"]["params"]
  assert params <= forward["argument_bytes"] <= params + 16 * 64 * 4
  step = compiled["programs"]["train_step"]
  assert step["compiled_total_bytes"] == pytest.approx(step["estimate_total_bytes"], rel=0.25)
