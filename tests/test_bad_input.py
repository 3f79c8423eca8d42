"""Bad input ends in one line `dihal: error: ...` on stderr, exit status 2, nothing written.

Every checkpoint case corrupts a copy of a good tiny checkpoint and runs the
real CLI in a subprocess (`python -m dihal_jax.cli convert ...`), then checks:
exit 2; the last non-empty stderr line starts with `dihal: error:` and names
the offending file / tensor / field; no traceback; no `report.json`, no `hf/`
export and no temporary directory in the workdir; the bad checkpoint itself
untouched. Config-field checks that need no subprocess call
`BackboneConfig.from_hf_config` directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import error_line

from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.convert import INDEX_FILE, SINGLE_FILE
from dihal_jax.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_llama.py"
TIMEOUT_S = 300


# --- helpers ------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dihal_jax.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def convert(checkpoint: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
  return run_cli("convert", f"--config={CONFIG}", f"--config.model.checkpoint={checkpoint}",
                 f"--workdir={workdir}", *extra)


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
  """Relative path -> (size, sha256) of every file under `directory`."""
  return {str(p.relative_to(directory)): (p.stat().st_size,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_nothing_written(workdir: Path):
  if not workdir.exists():
    return
  entries = [p.relative_to(workdir) for p in workdir.rglob("*")]
  assert not (workdir / "report.json").exists(), entries
  assert not (workdir / "hf").exists(), entries
  assert not [p for p in entries if "tmp" in p.name], entries


def assert_rejected(checkpoint: Path, workdir: Path, *names: str | re.Pattern,
                    extra: tuple[str, ...] = ()) -> str:
  """Runs convert on `checkpoint`; checks the contract and that the message names `names`."""
  before = snapshot(checkpoint)
  line = error_line(convert(checkpoint, workdir, *extra))
  for name in names:
    if isinstance(name, re.Pattern):
      assert name.search(line), (name.pattern, line)
    else:
      assert name in line, (name, line)
  assert_nothing_written(workdir)
  assert snapshot(checkpoint) == before, f"{checkpoint} was modified"
  return line


def copy_of(src: Path, tmp_path: Path) -> Path:
  dst = tmp_path / "bad_ckpt"
  shutil.copytree(src, dst)
  return dst


def edit_config(ckpt: Path, **fields):
  path = ckpt / "config.json"
  hf = json.loads(path.read_text())
  hf.update(fields)
  path.write_text(json.dumps(hf, indent=2))


# --- fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tiny_checkpoints) -> Path:
  """Good tiny Llama checkpoint: config.json + one model.safetensors."""
  ckpt = tiny_checkpoints["tiny_llama"]
  assert (ckpt / SINGLE_FILE).is_file() and not (ckpt / INDEX_FILE).exists()
  return ckpt


@pytest.fixture(scope="module")
def sharded(single, tmp_path_factory) -> Path:
  """The same weights saved by transformers in 20 KB shards with an index."""
  from transformers import AutoModelForCausalLM

  out = tmp_path_factory.mktemp("sharded") / "tiny_llama_sharded"
  AutoModelForCausalLM.from_pretrained(str(single)).save_pretrained(out, max_shard_size="20KB")
  shards = sorted(out.glob("model-*.safetensors"))
  assert (out / INDEX_FILE).is_file() and len(shards) > 2
  return out


@pytest.fixture
def workdir(tmp_path) -> Path:
  return tmp_path / "workdir"


@pytest.mark.slow
def test_good_sharded_checkpoint_converts(sharded, tmp_path):
  """Control: the uncorrupted fixture converts, so each failure below is the corruption's."""
  wd = tmp_path / "wd"
  result = convert(sharded, wd)
  assert result.returncode == 0, result.stderr
  assert (wd / "report.json").is_file() and (wd / "hf" / "config.json").is_file()


# --- 1. a shard named in the index is missing ----------------------------------

@pytest.mark.slow
def test_missing_shard(sharded, tmp_path, workdir):
  bad = copy_of(sharded, tmp_path)
  weight_map = json.loads((bad / INDEX_FILE).read_text())["weight_map"]
  victim = sorted(set(weight_map.values()))[1]
  (bad / victim).unlink()
  line = assert_rejected(bad, workdir, victim, INDEX_FILE)
  assert "missing" in line


# --- 2. a truncated safetensors file --------------------------------------------

def _truncate(path: Path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_truncated_single_file(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  _truncate(bad / SINGLE_FILE)
  assert_rejected(bad, workdir, str(bad / SINGLE_FILE))


@pytest.mark.slow
def test_truncated_shard(sharded, tmp_path, workdir):
  bad = copy_of(sharded, tmp_path)
  victim = max(bad.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
  _truncate(victim)
  assert_rejected(bad, workdir, str(victim))


@pytest.mark.slow
def test_truncated_index(sharded, tmp_path, workdir):
  bad = copy_of(sharded, tmp_path)
  _truncate(bad / INDEX_FILE)
  assert_rejected(bad, workdir, INDEX_FILE)


# --- 3. weight shapes disagree with the config ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("field,tensor", [
    ("intermediate_size", r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight"),
    ("hidden_size", r"[\w.]+\.weight"),
    ("vocab_size", r"(model\.embed_tokens|lm_head)\.weight"),
], ids=["intermediate_size", "hidden_size", "vocab_size"])
def test_shape_mismatch(single, tmp_path, workdir, field, tensor):
  bad = copy_of(single, tmp_path)
  hf = json.loads((bad / "config.json").read_text())
  edit_config(bad, **{field: hf[field] + 2})
  assert_rejected(bad, workdir, str(bad), re.compile(rf"tensor {tensor} has shape \[\d+"))


# --- 4. unknown model_type -----------------------------------------------------

@pytest.mark.slow
def test_unknown_model_type(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  edit_config(bad, model_type="gpt2")
  assert_rejected(bad, workdir, "model_type", "gpt2")


# --- 5. unknown rope type -------------------------------------------------------

@pytest.mark.slow
def test_unknown_rope_type(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  hf = json.loads((bad / "config.json").read_text())
  edit_config(bad, rope_parameters={**hf["rope_parameters"], "rope_type": "yarn"})
  assert_rejected(bad, workdir, "rope_type", "yarn")


# --- 6. more checkpoint damage --------------------------------------------------

@pytest.mark.slow
def test_missing_tensor(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  tensors = load_file(bad / SINGLE_FILE)
  key = "model.layers.1.self_attn.k_proj.weight"
  del tensors[key]
  save_file(tensors, bad / SINGLE_FILE, metadata={"format": "pt"})
  assert_rejected(bad, workdir, key, "missing")


@pytest.mark.slow
def test_tensor_listed_in_index_absent_from_shard(sharded, tmp_path, workdir):
  bad = copy_of(sharded, tmp_path)
  weight_map = json.loads((bad / INDEX_FILE).read_text())["weight_map"]
  key = "model.layers.2.mlp.up_proj.weight"
  shard = bad / weight_map[key]
  tensors = load_file(shard)
  del tensors[key]
  if not tensors:  # a shard may hold just this tensor: keep the file a valid safetensors
    tensors = {"unrelated": np.zeros(1, np.float32)}
  save_file(tensors, shard, metadata={"format": "pt"})
  assert_rejected(bad, workdir, key, shard.name)


@pytest.mark.slow
def test_unexpected_tensor(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  tensors = load_file(bad / SINGLE_FILE)
  tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"].copy()
  save_file(tensors, bad / SINGLE_FILE, metadata={"format": "pt"})
  assert_rejected(bad, workdir, "model.layers.0.self_attn.q_proj.bias", "unexpected")


@pytest.mark.slow
def test_config_json_missing(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  (bad / "config.json").unlink()
  assert_rejected(bad, workdir, "config.json")


@pytest.mark.slow
def test_config_json_not_json(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  (bad / "config.json").write_text('{"model_type": "llama",')
  assert_rejected(bad, workdir, "config.json", "JSON")


@pytest.mark.slow
def test_no_weights(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  (bad / SINGLE_FILE).unlink()
  assert_rejected(bad, workdir, SINGLE_FILE, INDEX_FILE)


@pytest.mark.slow
def test_checkpoint_not_a_directory(tmp_path, workdir):
  line = error_line(convert(tmp_path / "no_such_dir", workdir))
  assert "model.checkpoint" in line and "no_such_dir" in line
  assert_nothing_written(workdir)


# --- 6. command line and workdir -------------------------------------------------

@pytest.mark.slow
def test_missing_workdir():
  line = error_line(run_cli("convert", f"--config={CONFIG}"))
  assert "--workdir" in line


def test_missing_config(workdir):
  line = error_line(run_cli("convert", f"--workdir={workdir}"))
  assert "--config" in line
  assert not workdir.exists()


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["--config=configs/tiny_llama.py"]],
                         ids=["unknown", "none", "flag-first"])
def test_unknown_command(argv, workdir):
  line = error_line(run_cli(*argv, f"--workdir={workdir}"))
  assert "expected a command" in line and "convert" in line
  assert not workdir.exists()


@pytest.mark.parametrize("override,names", [
    ("--config.model.chekpoint=x", ("--config.model.chekpoint", "chekpoint")),
    ("--config.nope=1", ("--config.nope",)),
    ("--config.model.nope.deeper=1", ("--config.model.nope.deeper",)),
    ("--config.mesh.data=abc", ("--config.mesh.data", "abc")),
], ids=["typo", "top-level", "nested", "bad-value"])
def test_config_override_errors(override, names, workdir):
  line = error_line(run_cli("convert", f"--config={CONFIG}", override, f"--workdir={workdir}"))
  for name in names:
    assert name in line, (name, line)
  assert not workdir.exists()


@pytest.mark.parametrize("with_override", [False, True])
def test_config_file_missing(with_override, workdir):
  extra = ["--config.model.checkpoint=x"] if with_override else []
  line = error_line(run_cli("convert", "--config=configs/no_such_config.py", *extra,
                            f"--workdir={workdir}"))
  assert "configs/no_such_config.py" in line
  assert not workdir.exists()


def test_unknown_flag(workdir):
  line = error_line(run_cli("convert", f"--config={CONFIG}", "--wrokdir=x",
                            f"--workdir={workdir}"))
  assert "wrokdir" in line


@pytest.mark.slow
def test_unwritable_workdir(single, tmp_path):
  blocker = tmp_path / "a_regular_file"
  blocker.write_text("not a directory")
  workdir = blocker / "workdir"
  before = snapshot(single)
  line = error_line(convert(single, workdir))
  assert str(workdir) in line and "--workdir" in line
  assert blocker.read_text() == "not a directory"
  assert snapshot(single) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_workdir(single, tmp_path):
  workdir = tmp_path / "read_only"
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    line = error_line(convert(single, workdir))
    assert str(workdir) in line and "not writable" in line
    assert list(workdir.iterdir()) == []
  finally:
    workdir.chmod(0o755)


# --- library level: unsupported config fields, no subprocess ---------------------

def _tiny_hf() -> dict:
  from conftest import load_config
  return load_config("tiny_llama").model.hf_config.to_dict()


def _raises_naming(hf: dict, *names: str):
  with pytest.raises(UserInputError) as info:
    BackboneConfig.from_hf_config(hf)
  message = str(info.value)
  assert "\n" not in message
  for name in names:
    assert name in message, (name, message)


def test_lib_good_configs_parse():
  """Control for the cases below: the good configs parse, each field as transformers' own
  config class reads the same config.json (an independent reading)."""
  import transformers
  from conftest import load_config
  for name, reference in (("tiny_llama", transformers.LlamaConfig),
                          ("tiny_qwen3", transformers.Qwen3Config)):
    hf = load_config(name).model.hf_config.to_dict()
    cfg, ref = BackboneConfig.from_hf_config(hf), reference(**hf)
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.max_position_embeddings, cfg.tie_word_embeddings, cfg.attention_bias,
            cfg.bos_token_id, cfg.eos_token_id) == (
        ref.model_type, ref.vocab_size, ref.hidden_size, ref.intermediate_size,
        ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim,
        ref.rms_norm_eps, ref.max_position_embeddings, ref.tie_word_embeddings,
        ref.attention_bias, ref.bos_token_id, ref.eos_token_id), name
    rope = ref.rope_parameters
    assert cfg.rope_theta == rope["rope_theta"]
    assert cfg.qk_norm == (ref.model_type == "qwen3")  # Qwen3 normalizes q and k
    if rope["rope_type"] == "llama3":
      assert (cfg.rope_scaling.factor, cfg.rope_scaling.low_freq_factor,
              cfg.rope_scaling.high_freq_factor,
              cfg.rope_scaling.original_max_position_embeddings) == (
          rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
          rope["original_max_position_embeddings"])
    else:
      assert cfg.rope_scaling is None


def test_lib_unsupported_hidden_act():
  _raises_naming({**_tiny_hf(), "hidden_act": "gelu"}, "hidden_act", "gelu")


def test_lib_qwen3_sliding_window():
  from conftest import load_config
  hf = load_config("tiny_qwen3").model.hf_config.to_dict()
  _raises_naming({**hf, "use_sliding_window": True, "sliding_window": 16},
                 "use_sliding_window")


def test_lib_qwen3_layer_types():
  from conftest import load_config
  hf = load_config("tiny_qwen3").model.hf_config.to_dict()
  _raises_naming({**hf, "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
                 "layer_types")


def test_lib_llama3_rope_missing_low_freq_factor_rope_parameters():
  hf = _tiny_hf()
  rope = dict(hf["rope_parameters"])
  del rope["low_freq_factor"]
  _raises_naming({**hf, "rope_parameters": rope}, "rope_parameters", "low_freq_factor")


def test_lib_llama3_rope_missing_low_freq_factor_rope_scaling():
  """transformers-4 form: `rope_scaling` (with `rope_type` or `type`) + top-level `rope_theta`."""
  hf = _tiny_hf()
  rope = dict(hf.pop("rope_parameters"))
  theta = rope.pop("rope_theta")
  del rope["low_freq_factor"]
  for type_key in ("rope_type", "type"):
    scaling = {("type" if type_key == "type" else "rope_type"): rope["rope_type"],
               **{k: v for k, v in rope.items() if k != "rope_type"}}
    _raises_naming({**hf, "rope_theta": theta, "rope_scaling": scaling},
                   "rope_scaling", "low_freq_factor")
  # and the complete old form is accepted
  good = {**hf, "rope_theta": theta, "rope_scaling": {**rope, "low_freq_factor": 1.0}}
  assert BackboneConfig.from_hf_config(good).rope_scaling.low_freq_factor == 1.0


def test_lib_unknown_rope_type_old_form():
  hf = _tiny_hf()
  rope = dict(hf.pop("rope_parameters"))
  _raises_naming({**hf, "rope_theta": rope.pop("rope_theta"),
                  "rope_scaling": {**rope, "rope_type": "yarn"}}, "rope_scaling.rope_type",
                 "yarn")


def test_lib_missing_rope_theta():
  hf = _tiny_hf()
  rope = dict(hf["rope_parameters"])
  del rope["rope_theta"]
  _raises_naming({**hf, "rope_parameters": rope}, "rope_theta")


def test_lib_unknown_model_type():
  _raises_naming({**_tiny_hf(), "model_type": "gpt2"}, "model_type", "gpt2")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size",
                                   "num_attention_heads", "rms_norm_eps"])
def test_lib_required_field_missing(field):
  hf = _tiny_hf()
  del hf[field]
  _raises_naming(hf, field)


def test_lib_heads_not_multiple_of_kv_heads():
  _raises_naming({**_tiny_hf(), "num_key_value_heads": 4}, "num_key_value_heads")


@pytest.mark.parametrize("update,names", [
    ({"hidden_size": "60"}, ("hidden_size", "'60'")),
    ({"num_hidden_layers": 2.5}, ("num_hidden_layers",)),
    ({"num_attention_heads": 0, "head_dim": None}, ("num_attention_heads",)),
    ({"num_key_value_heads": 0}, ("num_key_value_heads",)),
    ({"rms_norm_eps": "tiny"}, ("rms_norm_eps",)),
    ({"rope_parameters": [1, 2]}, ("rope_parameters",)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, ("rope_theta",)),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": "x",
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}},
     ("rope_parameters.factor",)),
    ({"dtype": "int8"}, ("dtype", "int8")),
], ids=["str-int", "fractional-int", "zero-heads", "zero-kv-heads", "str-float",
        "rope-not-object", "str-theta", "str-factor", "dtype"])
def test_lib_malformed_values(update, names):
  """Wrong JSON types / values in config.json: UserInputError naming the field, no crash."""
  _raises_naming({**_tiny_hf(), **update}, *names)


def test_lib_not_an_object():
  with pytest.raises(UserInputError, match="JSON object"):
    BackboneConfig.from_hf_config([1, 2])


@pytest.mark.slow
def test_malformed_config_value_via_cli(single, tmp_path, workdir):
  bad = copy_of(single, tmp_path)
  edit_config(bad, hidden_size="60")
  assert_rejected(bad, workdir, "hidden_size")
