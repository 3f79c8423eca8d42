#!/usr/bin/env bash
# N local CPU processes on 127.0.0.1: the multi-host code path on one machine.
usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [options] [-- COMMAND ...]

Starts N copies of a dihal command on this machine, each its own jax
process on CPU, joined through a coordinator on 127.0.0.1 (loopback only,
always): process i gets
  JAX_PLATFORMS=cpu DIHAL_DISTRIBUTED=cpu DIHAL_COORDINATOR=127.0.0.1:PORT
  DIHAL_NUM_PROCESSES=N DIHAL_PROCESS_ID=i
Waits for all of them; if one fails, the others are killed and the script
exits with that process's status (non-zero). Runs from the repository root.

Options (--opt VALUE and --opt=VALUE both work):
  -n, --num-processes N   how many processes (default 2)
  --port PORT             coordinator port on 127.0.0.1 (default: a free
                          port picked with python)
  --log-dir DIR           write process i's output to DIR/process_i.log
                          (default: all to this terminal)
  --dry-run               print every command, one per line prefixed with
                          "+ ", and run nothing
  -h, --help              this text

COMMAND defaults to
  dihal locate --config=configs/tiny_llama.py --workdir=runs/mp_locate
with dihal taken from .venv/bin when it is there.
EOF
}

set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM=2
PORT=""
LOG_DIR=""
CMD=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes|--num-processes=*) opt_value NUM "$@"; shift "$OPT_WORDS" ;;
    --port|--port=*) opt_value PORT "$@"; shift "$OPT_WORDS" ;;
    --log-dir|--log-dir=*) opt_value LOG_DIR "$@"; shift "$OPT_WORDS" ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; CMD=("$@"); break ;;
    *) die "unknown flag '$1' (see --help; the command goes after --)" ;;
  esac
done

[[ "$NUM" =~ ^[1-9][0-9]*$ ]] || die "--num-processes '$NUM': a positive integer"
if [[ -n "$PORT" ]]; then
  [[ "$PORT" =~ ^[1-9][0-9]*$ && "$PORT" -le 65535 ]] || die "--port '$PORT': an integer in 1..65535"
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PYTHON="python3"
[[ ! -x .venv/bin/python ]] || PYTHON=".venv/bin/python"
if [[ -z "$PORT" ]]; then
  # Bind port 0 on loopback and read what the kernel gave (a query, run in --dry-run too).
  PORT="$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')"
fi

if [[ ${#CMD[@]} -eq 0 ]]; then
  dihal="dihal"
  [[ ! -x .venv/bin/dihal ]] || dihal=".venv/bin/dihal"
  CMD=("$dihal" locate --config=configs/tiny_llama.py --workdir=runs/mp_locate)
fi

proc_cmd() {  # proc_cmd I: the full command line of process I
  PROC=(env JAX_PLATFORMS=cpu DIHAL_DISTRIBUTED=cpu DIHAL_COORDINATOR="127.0.0.1:$PORT"
        DIHAL_NUM_PROCESSES="$NUM" DIHAL_PROCESS_ID="$1" "${CMD[@]}")
}

if [[ "$DRY_RUN" == 1 ]]; then
  [[ -z "$LOG_DIR" ]] || show mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM; i++)); do
    proc_cmd "$i"
    show "${PROC[@]}"
  done
  exit 0
fi

(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501 )) || die "needs bash >= 5.1 (wait -n -p)"

# The children still running. On exit (a failure, Ctrl-C, TERM) they get
# SIGTERM, then SIGKILL from a watchdog if they have not ended in 10 s.
PIDS=()
cleanup() {
  local watchdog
  [[ ${#PIDS[@]} -gt 0 ]] || return 0
  kill "${PIDS[@]}" 2>/dev/null || true
  ( sleep 10; kill -9 "${PIDS[@]}" 2>/dev/null ) &
  watchdog=$!
  wait "${PIDS[@]}" 2>/dev/null || true
  kill "$watchdog" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ -z "$LOG_DIR" ]] || mkdir -p "$LOG_DIR"
for ((i = 0; i < NUM; i++)); do
  proc_cmd "$i"
  if [[ -n "$LOG_DIR" ]]; then
    "${PROC[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${PROC[@]}" &
  fi
  PIDS+=("$!")
done

# Reap them as they end; the first failure stops the rest (EXIT trap).
while [[ ${#PIDS[@]} -gt 0 ]]; do
  status=0
  finished=""
  wait -n -p finished || status=$?
  left=()
  for pid in "${PIDS[@]}"; do
    [[ "$pid" == "$finished" ]] || left+=("$pid")
  done
  PIDS=("${left[@]}")
  if [[ "$status" != 0 ]]; then
    echo "local_multiprocess.sh: process pid $finished exited with status $status; stopping the others" >&2
    exit "$status"
  fi
done
