#!/usr/bin/env bash
# One host, N GPUs, ONE process: jax single-process multi-GPU.
usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh [options] [-- COMMAND ...]

Runs a dihal command as ONE process that sees all the host's GPUs
(jax single-process multi-GPU: the mesh spans every visible GPU; no
jax.distributed: DIHAL_DISTRIBUTED is set empty). Runs from the repository
root.

Options (--opt VALUE and --opt=VALUE both work):
  --gpus N             use GPUs 0..N-1 (sets CUDA_VISIBLE_DEVICES);
                       default: every visible GPU (CUDA_VISIBLE_DEVICES
                       left as it is)
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90)
  --install            first pip install "jax[cuda12]==JAX_VERSION" into
                       the venv
  --venv DIR           the project's venv (default .venv)
  --jax-version V      default 0.10.2 (must match pyproject.toml)
  --dry-run            print every command, one per line prefixed with
                       "+ ", and run nothing
  -h, --help           this text

COMMAND defaults to
  dihal train --config=configs/llama3_1_8b_instruct.py --workdir=runs/llama3_1_8b_gpu
with dihal taken from the venv (VENV/bin/dihal) when it is there. The 8B
configs need --config.model.checkpoint=DIR (a local HF download).

Example:
  launch/gpu_single_node.sh --install --gpus 8 -- \
    .venv/bin/dihal train --config=configs/qwen3_8b.py --workdir=runs/qwen3_8b \
    --config.model.checkpoint=/data/Qwen3-8B
EOF
}

set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS=""
MEM_FRACTION="0.90"
INSTALL=0
VENV=".venv"
JAX_VERSION="0.10.2"
CMD=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus|--gpus=*) opt_value GPUS "$@"; shift "$OPT_WORDS" ;;
    --mem-fraction|--mem-fraction=*) opt_value MEM_FRACTION "$@"; shift "$OPT_WORDS" ;;
    --install) INSTALL=1; shift ;;
    --venv|--venv=*) opt_value VENV "$@"; shift "$OPT_WORDS" ;;
    --jax-version|--jax-version=*) opt_value JAX_VERSION "$@"; shift "$OPT_WORDS" ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; CMD=("$@"); break ;;
    *) die "unknown flag '$1' (see --help; the command goes after --)" ;;
  esac
done

[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus '$GPUS': a positive integer"
[[ "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction '$MEM_FRACTION': a number in (0, 1]"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

if [[ ${#CMD[@]} -eq 0 ]]; then
  dihal="dihal"
  [[ ! -x "$VENV/bin/dihal" ]] || dihal="$VENV/bin/dihal"
  CMD=("$dihal" train --config=configs/llama3_1_8b_instruct.py --workdir=runs/llama3_1_8b_gpu)
fi

if [[ "$INSTALL" == 1 ]]; then
  run "$VENV/bin/pip" install --quiet "jax[cuda12]==$JAX_VERSION"
fi

# DIHAL_DISTRIBUTED= (empty): one process, whatever the calling shell exported.
ENV=(DIHAL_DISTRIBUTED= XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
if [[ -n "$GPUS" ]]; then
  ENV+=(CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((GPUS - 1)))")
fi
run env "${ENV[@]}" "${CMD[@]}"
