# shellcheck shell=bash
# Helpers shared by the launch/ scripts, which source this file right after
# `set -euo pipefail`:
#   # shellcheck source=SCRIPTDIR/common.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# (SCRIPTDIR: shellcheck finds this file from any working directory;
# launch/.shellcheckrc lets it follow the file without -x.)
# A library, not an entry point: no shebang, not executable.
# gpu_slurm.sbatch keeps its own copy of these: sbatch runs a copy of the
# script from its spool directory, where no sibling file can be sourced.

# One error line on stderr, prefixed with the running script's name
# ($0: the script that sourced this file), and exit 2.
die() { echo "${0##*/}: error: $*" >&2; exit 2; }

# Print a command as one copy-pastable line: words made of safe characters
# as they are, anything else in single quotes.
show() {
  local out="+" w sq="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" $w"
    else
      out+=" '${w//${sq}/${sq}\\${sq}${sq}}'"
    fi
  done
  printf '%s\n' "$out"
}

# --dry-run sets DRY_RUN=1: run then prints the command instead of running it.
DRY_RUN=0
run() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; else "$@"; fi
}

need_value() {  # need_value FLAG NUMBER_OF_REMAINING_ARGS
  [[ "$2" -ge 2 ]] || die "$1 needs a value"
}

# opt_value VAR "$@": the flag in $1 takes a value, as "--opt VALUE" or
# "--opt=VALUE"; sets VAR to it and OPT_WORDS to the words used (2 or 1).
# In the option loop: --opt|--opt=*) opt_value VAR "$@"; shift "$OPT_WORDS" ;;
OPT_WORDS=0
# shellcheck disable=SC2034 # OPT_WORDS is read by the callers (shift "$OPT_WORDS")
opt_value() {
  local var="$1"
  shift
  if [[ "$1" == *=* ]]; then
    printf -v "$var" '%s' "${1#*=}"
    OPT_WORDS=1
  else
    need_value "$1" "$#"
    printf -v "$var" '%s' "$2"
    OPT_WORDS=2
  fi
}
