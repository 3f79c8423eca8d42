"""The multi-host code path on one machine: two `dihal` processes over 127.0.0.1 (gloo).

`locate` and a few bridge train steps (interrupted and resumed from an Orbax
checkpoint) run as two processes (two CPU devices each) and must agree with
one process on one device: every process holds its
rows of the same global batches (data/pipeline.py), so only the order of
floating-point reductions differs. A second test kills one process and checks
that the other stops with a clear message within a bounded time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # two gloo processes per test, minutes on 2 cores

TINY = ["--config=configs/tiny_llama.py", "--config.locate.num_tokens=2048",
        "--config.locate.batch_size=8", "--config.locate.reservoir=512",
        "--config.locate.anchors=64", "--config.locate.pairs=1024"]
TRAIN = ["--config.bridge.layer=1", "--config.train.steps=8", "--config.train.warmup_steps=2",
         "--config.train.batch_size=8", "--config.train.cache_windows=32",
         "--config.train.val_windows=8", "--config.train.val_every=3",
         "--config.train.log_every=1", "--config.train.checkpoint_every=3",
         "--config.bridge.unet.channels=16", "--config.bridge.unet.heads=2",
         "--config.bridge.unet.groups=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("DIHAL_DISTRIBUTED", None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _dihal(args):
  return [sys.executable, "-m", "dihal_jax.cli", *args]


def _start_pair(args, **extra):
  port = _free_port()
  return [subprocess.Popen(
      _dihal(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_env(2, DIHAL_DISTRIBUTED="cpu", DIHAL_COORDINATOR=f"127.0.0.1:{port}",
               DIHAL_NUM_PROCESSES=2, DIHAL_PROCESS_ID=i, **extra)) for i in range(2)]


def _run_pair(args, timeout=600):
  procs = _start_pair(args)
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _run_single(args):
  proc = subprocess.run(_dihal(args), cwd=REPO, capture_output=True, text=True, env=_env(1),
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """One process, one device: the reference locate and train runs."""
  work = tmp_path_factory.mktemp("single")
  _run_single(["locate", *TINY, f"--workdir={work / 'locate'}"])
  _run_single(["train", *TINY, *TRAIN, _checkpoint(work), f"--workdir={work / 'train'}"])
  return work


def _checkpoint(single):
  """The seeded random backbone the reference run made (shared, not rebuilt per process)."""
  return f"--config.model.checkpoint={single / 'locate' / 'random_hf_checkpoint'}"


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_locate_and_train_like_one(single, tmp_path):
  ckpt = _checkpoint(single)
  outs = _run_pair(["locate", *TINY, ckpt, f"--workdir={tmp_path}"])
  assert "process 1/2" in outs[1][1]
  one = json.loads((single / "locate" / "report.json").read_text())
  two = json.loads((tmp_path / "report.json").read_text())
  assert two["num_tokens"] == one["num_tokens"]
  assert two["selected_layer"] == one["selected_layer"]
  for a, b in zip(one["layers"], two["layers"]):
    for proxy in ("erank", "curvature", "compactness", "stiffness", "score"):
      np.testing.assert_allclose(b[proxy], a[proxy], rtol=2e-3, atol=2e-3, err_msg=proxy)

  # 6 steps, then a second pair of processes resumes from the step-6 checkpoint to 8.
  _run_pair(["train", *TINY, *TRAIN, ckpt, "--config.train.steps=6", f"--workdir={tmp_path}"])
  outs = _run_pair(["train", *TINY, *TRAIN, ckpt, f"--workdir={tmp_path}"])
  assert "resumed from step 6" in outs[0][0]
  want, got = _metrics(single / "train"), _metrics(tmp_path)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
  # Reduction order (4 devices vs 1) drifts the losses by ~1e-5 at first, ~1e-4 by step 7;
  # a wrong batch, optimizer state or resume point moves them by ~1e-2.
  losses = [r["loss"] for r in got], [r["loss"] for r in want]
  np.testing.assert_allclose(losses[0][:4], losses[1][:4], rtol=2e-5)
  np.testing.assert_allclose(*losses, rtol=1e-3)
  np.testing.assert_allclose([r["val_loss"] for r in got if "val_loss" in r],
                             [r["val_loss"] for r in want if "val_loss" in r], rtol=1e-3)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      "3", "6", "8"]


def test_a_killed_peer_stops_the_other_process_in_bounded_time(single, tmp_path):
  """Process 1 is killed mid-run; process 0 must exit non-zero with a message naming the
  lost peer well before the heartbeat timeout runs out several times over."""
  ckpt = _checkpoint(single)
  args = ["train", *TINY, *TRAIN, ckpt, "--config.train.steps=100000", f"--workdir={tmp_path}"]
  procs = _start_pair(args, DIHAL_HEARTBEAT_TIMEOUT=10)
  try:
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
      time.sleep(1)  # both processes are training
    assert (tmp_path / "metrics.jsonl").is_file(), "training never started"
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    waited = time.monotonic() - start
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0
  assert waited < 120
  print(f"process 0 stopped {waited:.0f} s after its peer was killed:\n{err[-1500:]}")
  assert any(w in err for w in ("heartbeat", "task", "peer", "Connection", "unavailable",
                                "UNAVAILABLE", "coordination")), err[-3000:]


@pytest.mark.parametrize("env, message", [
    ({"DIHAL_DISTRIBUTED": "mpi"}, "DIHAL_DISTRIBUTED='mpi'"),
    ({"DIHAL_DISTRIBUTED": "cpu", "DIHAL_COORDINATOR": "localhost"}, "DIHAL_COORDINATOR"),
    ({"DIHAL_DISTRIBUTED": "cpu", "DIHAL_COORDINATOR": "127.0.0.1:1234"},
     "DIHAL_NUM_PROCESSES is not set"),
    ({"DIHAL_DISTRIBUTED": "cpu", "DIHAL_COORDINATOR": "127.0.0.1:1234",
      "DIHAL_NUM_PROCESSES": "2", "DIHAL_PROCESS_ID": "2"}, "DIHAL_PROCESS_ID=2"),
    ({"DIHAL_DISTRIBUTED": "auto", "DIHAL_INIT_TIMEOUT": "soon"}, "DIHAL_INIT_TIMEOUT"),
])
def test_bad_distributed_environment_exits_2(tmp_path, env, message):
  proc = subprocess.run(_dihal(["locate", *TINY, f"--workdir={tmp_path}"]), cwd=REPO,
                        capture_output=True, text=True, env=_env(1, **env), timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("dihal: error:") and message in last, proc.stderr[-2000:]


def test_distributed_settings_for_local_cpu_processes(monkeypatch):
  from dihal_jax.parallel import distributed
  for name in ("DIHAL_DISTRIBUTED", "DIHAL_INIT_TIMEOUT", "DIHAL_HEARTBEAT_TIMEOUT"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.settings() == {}
  monkeypatch.setenv("DIHAL_DISTRIBUTED", "cpu")
  monkeypatch.setenv("DIHAL_COORDINATOR", "127.0.0.1:4321")
  monkeypatch.setenv("DIHAL_NUM_PROCESSES", "4")
  monkeypatch.setenv("DIHAL_PROCESS_ID", "3")
  monkeypatch.setenv("DIHAL_HEARTBEAT_TIMEOUT", "7")
  assert distributed.settings() == {
      "coordinator_address": "127.0.0.1:4321", "num_processes": 4, "process_id": 3,
      "initialization_timeout": 300, "heartbeat_timeout_seconds": 7}
  monkeypatch.setenv("DIHAL_DISTRIBUTED", "auto")
  assert distributed.settings() == {"initialization_timeout": 300,
                                    "heartbeat_timeout_seconds": 7}


def test_an_unreachable_coordinator_fails_within_the_init_timeout(tmp_path):
  port = _free_port()  # nobody listens there
  start = time.monotonic()
  proc = subprocess.run(
      _dihal(["locate", *TINY, f"--workdir={tmp_path}"]), cwd=REPO, capture_output=True,
      text=True, timeout=120,
      env=_env(1, DIHAL_DISTRIBUTED="cpu", DIHAL_COORDINATOR=f"127.0.0.1:{port}",
               DIHAL_NUM_PROCESSES=2, DIHAL_PROCESS_ID=1, DIHAL_INIT_TIMEOUT=3))
  assert proc.returncode != 0 and time.monotonic() - start < 60
  assert f"joining 2 processes via 127.0.0.1:{port} as process 1" in proc.stderr
  assert "DEADLINE_EXCEEDED" in proc.stderr
  assert not (tmp_path / "report.json").exists()
