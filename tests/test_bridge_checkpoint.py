"""BridgeCheckpointer: bit-identical resume, retention, config guard, corrupted steps."""

import logging
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from dihal_jax.bridge.checkpoint import BridgeCheckpointer, first_config_difference
from dihal_jax.errors import UserInputError

CONFIG = {"bridge": {"channels": 64, "depths": [1, 2]}, "train": {"steps": 10, "lr": 1e-3}}


def _data_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def _state(step: int):
  rng = np.random.default_rng(step)
  return {"step": jnp.int32(step),
          "params": {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
          "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(0), step))}


def _abstract():
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(0))


def _train(directory, steps, *, max_to_keep=5, config=CONFIG):
  """Saves every step (interval 2); returns (data iterator, {step: state})."""
  ckpt = BridgeCheckpointer(directory, save_every=2, max_to_keep=max_to_keep, config=config)
  it, states = _data_iter(), {}
  for step in range(1, steps + 1):
    next(it)
    states[step] = _state(step)
    assert ckpt.save(step, states[step], it, {"mean": [0.5, step]}) == (step % 2 == 0)
  ckpt.close()
  return it, states


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical_and_resumes_the_data(tmp_path):
  it, states = _train(tmp_path / "ckpt", 4)  # saves 2 and 4 (odd steps: off the interval)
  expected_next = next(it)  # what the original iterator yields after the last save

  resumed_it = _data_iter()
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=5, config=CONFIG)
  assert ckpt.all_steps() == [2, 4]
  step, state, extra = ckpt.restore_latest(_abstract(), resumed_it)
  assert step == 4
  _assert_same(state, states[4])
  assert state["step"].dtype == jnp.int32 and int(state["step"]) == 4
  assert state["rng"].dtype == jnp.uint32
  assert jax.random.key_data(jax.random.wrap_key_data(state["rng"])).tolist() == \
      states[4]["rng"].tolist()
  assert extra == {"mean": [0.5, 4]}
  np.testing.assert_array_equal(next(resumed_it), expected_next)
  ckpt.close()


def test_restore_preserves_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state = {"x": jax.device_put(jnp.arange(16.0), sharding)}
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=1, max_to_keep=1, config=CONFIG)
  ckpt.save(1, state, _data_iter(), {})
  ckpt.wait()
  _, restored, _ = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                       _data_iter())
  assert restored["x"].sharding == sharding
  np.testing.assert_array_equal(restored["x"], np.arange(16.0))
  ckpt.close()


def test_nothing_to_restore_is_none(tmp_path):
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=2, config=CONFIG)
  assert ckpt.restore_latest(_abstract(), _data_iter()) is None
  ckpt.close()


def test_only_the_last_max_to_keep_steps_stay_on_disk(tmp_path):
  _train(tmp_path / "ckpt", 10, max_to_keep=2)
  on_disk = sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit())
  assert on_disk == [8, 10]


def test_a_changed_config_field_is_named(tmp_path):
  _train(tmp_path / "ckpt", 4)
  changed = {**CONFIG, "bridge": {**CONFIG["bridge"], "channels": 128}}
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=5, config=changed)
  with pytest.raises(UserInputError, match=r"ckpt/4 was written with bridge\.channels=64, "
                                           r"this run has bridge\.channels=128"):
    ckpt.restore_latest(_abstract(), _data_iter())
  ckpt.close()


def test_an_ignored_field_may_change(tmp_path):
  _, states = _train(tmp_path / "ckpt", 4)
  extended = {**CONFIG, "train": {**CONFIG["train"], "steps": 1000}}
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=5, config=extended)
  step, state, _ = ckpt.restore_latest(_abstract(), _data_iter())
  assert step == 4
  _assert_same(state, states[4])
  ckpt.close()


def test_first_config_difference():
  assert first_config_difference(CONFIG, CONFIG) is None
  assert first_config_difference({"a": (1, 2)}, {"a": [1, 2]}) is None  # JSON turns tuples to lists
  assert first_config_difference({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == \
      ("a.c", "<absent>", 2)
  assert first_config_difference({"a": True}, {"a": 1}) == ("a", True, 1)
  assert first_config_difference({"t": {"steps": 1}}, {"t": {"steps": 2}}, ["t"]) is None
  # Only the sections that shape the state count: a sampling setting or a config field added
  # later (absent from the stored config) does not block a resume.
  stored = {"seed": 0, "bridge": {"c": 64}, "sample": {"steps": 50}}
  now = {"seed": 0, "bridge": {"c": 64}, "sample": {"steps": 20}, "mesh_presets": {}}
  assert first_config_difference(stored, now, sections=["seed", "bridge"]) is None
  assert first_config_difference(stored, dict(now, seed=1), sections=["seed", "bridge"]) == (
      "seed", 0, 1)
  assert first_config_difference(stored, now) == ("mesh_presets", "<absent>", {})
  # A checkpoint written before train.time_sampling existed ran uniform times: it resumes at
  # uniform, and not at logit_normal.
  old = {"train": {"lr": 1e-3}}
  assert first_config_difference(old, {"train": {"lr": 1e-3, "time_sampling": "uniform",
                                                 "logit_normal": (0.0, 1.0)}}) is None
  assert first_config_difference(old, {"train": {"lr": 1e-3, "time_sampling": "logit_normal",
                                                 "logit_normal": (0.0, 1.0)}}) == (
      "train.time_sampling", "uniform", "logit_normal")


def test_dihal_train_checks_only_the_state_sections():
  from dihal_jax.bridge.train import STATE_SECTIONS
  from dihal_jax.defaults import base
  assert set(base().keys()) - set(STATE_SECTIONS) >= {"sample", "eval", "demo", "locate"}
  assert {"model", "data", "bridge", "train", "seed"} <= set(STATE_SECTIONS)


@pytest.mark.parametrize("damage", ["truncate_array_data", "delete_state_metadata",
                                    "delete_data_iter_state", "truncate_config"])
def test_an_unreadable_latest_step_falls_back_to_the_previous(tmp_path, caplog, damage):
  _, states = _train(tmp_path / "ckpt", 4)
  latest = tmp_path / "ckpt" / "4"
  if damage == "truncate_array_data":
    files = [p for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
      os.truncate(p, p.stat().st_size // 2)
  elif damage == "delete_state_metadata":
    (latest / "state" / "_METADATA").write_text('{"tree_metadata": {')  # truncated JSON
  elif damage == "delete_data_iter_state":
    for p in (latest / "data_iter").glob("process_*.json"):
      p.unlink()
  else:
    (latest / "config" / "metadata").write_text('{"bri')

  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=5, config=CONFIG)
  resumed_it = _data_iter()
  with caplog.at_level(logging.WARNING, logger="dihal_jax.bridge.checkpoint"):
    step, state, extra = ckpt.restore_latest(_abstract(), resumed_it)
  assert step == 2
  _assert_same(state, states[2])
  assert extra == {"mean": [0.5, 2]}
  reference = _data_iter()
  for _ in range(2):
    next(reference)
  np.testing.assert_array_equal(next(resumed_it), next(reference))
  assert any("/4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  # the unreadable step is moved aside, so the resumed run can save step 4 again
  assert (tmp_path / "ckpt" / "4.unreadable").is_dir()
  assert ckpt.save(4, _state(4), resumed_it, {})
  ckpt.close()


def test_no_readable_step_is_a_user_error(tmp_path):
  _train(tmp_path / "ckpt", 4)
  for step in (2, 4):
    (tmp_path / "ckpt" / str(step) / "extra" / "metadata").unlink()
  ckpt = BridgeCheckpointer(tmp_path / "ckpt", save_every=2, max_to_keep=5, config=CONFIG)
  with pytest.raises(UserInputError, match="no readable checkpoint in .*ckpt"):
    ckpt.restore_latest(_abstract(), _data_iter())
  ckpt.close()


def test_an_unwritable_directory_is_a_user_error(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserInputError, match="file/ckpt"):
    BridgeCheckpointer(tmp_path / "file" / "ckpt", save_every=1, max_to_keep=1, config={})


@pytest.mark.slow
def test_restore_in_a_fresh_process(tmp_path):
  _, states = _train(tmp_path / "ckpt", 4)
  np.save(tmp_path / "w.npy", np.asarray(states[4]["params"]["w"]))
  script = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import jax, numpy as np, orbax.checkpoint as ocp
from test_bridge_checkpoint import CONFIG, _abstract, _data_iter
from dihal_jax.bridge.checkpoint import BridgeCheckpointer
ckpt = BridgeCheckpointer({str(tmp_path / "ckpt")!r}, save_every=2, max_to_keep=5, config=CONFIG)
step, state, extra = ckpt.restore_latest(_abstract(), _data_iter())
assert step == 4, step
np.testing.assert_array_equal(state["params"]["w"], np.load({str(tmp_path / "w.npy")!r}))
ckpt.close()
print("OK")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_a_relative_directory_works(tmp_path, monkeypatch):
  """Orbax's tensorstore backend rejects relative paths mid-save; users pass --workdir=runs/x."""
  monkeypatch.chdir(tmp_path)
  _, states = _train("relative/ckpt", 2)
  ckpt = BridgeCheckpointer("relative/ckpt", save_every=2, max_to_keep=5, config=CONFIG)
  step, state, _ = ckpt.restore_latest(_abstract(), _data_iter())
  assert step == 2 and (tmp_path / "relative" / "ckpt" / "2").is_dir()
  _assert_same(state, states[2])
  ckpt.close()
