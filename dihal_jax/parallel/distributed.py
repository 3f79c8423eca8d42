"""Multi-process start-up: one call at CLI start, before any JAX computation.

`DIHAL_DISTRIBUTED` picks how the processes of one job find each other:

  (unset or "")  one process (a CPU, one GPU host that sees all its GPUs, one TPU VM host).
  auto           `jax.distributed.initialize()` with JAX's cluster detection: Cloud TPU
                 VM pod slices (metadata server), SLURM (`srun`), Open MPI, ...
  cpu            N local CPU processes: DIHAL_COORDINATOR=host:port (process 0 listens
                 there), DIHAL_NUM_PROCESSES=N, DIHAL_PROCESS_ID=i; gloo collectives.
                 This is how the multi-host code path is tested on one machine.

`DIHAL_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the other processes
at start-up; `DIHAL_HEARTBEAT_TIMEOUT` (default 100) is how long a process waits on a
peer that stopped sending heartbeats before JAX stops it, so a crashed peer ends the
job instead of hanging it. After start-up every process runs the same program on its
share of each global batch (data/pipeline.py); only process 0 writes reports
(reports.py), and Orbax coordinates checkpoint writes.
"""

from __future__ import annotations

import os
import sys

from dihal_jax.errors import UserInputError

MODES = ("", "auto", "cpu")


def _int_env(name: str, default: int | None = None, minimum: int = 0) -> int:
  raw = os.environ.get(name, "")
  if not raw:
    if default is None:
      raise UserInputError(f"{name} is not set (needed with DIHAL_DISTRIBUTED=cpu)")
    return default
  try:
    value = int(raw)
  except ValueError:
    raise UserInputError(f"{name}={raw!r}: expected an integer") from None
  if value < minimum:
    raise UserInputError(f"{name}={value}: expected >= {minimum}")
  return value


def settings() -> dict:
  """The `jax.distributed.initialize` arguments the environment asks for ({} = one process)."""
  mode = os.environ.get("DIHAL_DISTRIBUTED", "").strip().lower()
  if mode not in MODES:
    raise UserInputError(f"DIHAL_DISTRIBUTED={mode!r}: expected one of auto, cpu (or unset)")
  if not mode:
    return {}
  timeouts = {"initialization_timeout": _int_env("DIHAL_INIT_TIMEOUT", 300, 1),
              "heartbeat_timeout_seconds": _int_env("DIHAL_HEARTBEAT_TIMEOUT", 100, 1)}
  if mode == "auto":
    return timeouts
  coordinator = os.environ.get("DIHAL_COORDINATOR", "")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise UserInputError(f"DIHAL_COORDINATOR={coordinator!r}: expected host:port "
                         "(e.g. 127.0.0.1:12355)")
  num = _int_env("DIHAL_NUM_PROCESSES", minimum=1)
  pid = _int_env("DIHAL_PROCESS_ID")
  if pid >= num:
    raise UserInputError(f"DIHAL_PROCESS_ID={pid}: expected < DIHAL_NUM_PROCESSES={num}")
  return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid,
          **timeouts}


def initialize() -> None:
  """Joins the job the environment describes; a no-op for one process."""
  args = settings()
  if not args:
    return
  import jax
  where = args.get("coordinator_address", "the detected cluster")
  # If the coordinator stays unreachable, JAX aborts the process (SIGABRT) after the
  # timeout with a DEADLINE_EXCEEDED log line; this line says what was being waited for.
  print(f"dihal: joining {args.get('num_processes', 'the')} processes via {where}"
        f"{' as process ' + str(args['process_id']) if 'process_id' in args else ''}, "
        f"waiting up to {args['initialization_timeout']} s", file=sys.stderr, flush=True)
  if "coordinator_address" in args:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**args)
  except Exception as e:  # a refused argument, or an error the service reports in Python
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserInputError(f"jax.distributed.initialize ({where}) failed: {first}") from None
