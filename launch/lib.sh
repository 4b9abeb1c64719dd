# shellcheck shell=bash
# Shared by the launch/*.sh scripts (sourced, not run). The caller sets PROG.

TPU_NAME=${TPU_NAME:-nfnet-tpu}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
DRY_RUN=${DRY_RUN:-0}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Echoes a command (shell-quoted), then runs it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Runs a command silently, or with DRY_RUN=1 only echoes it.
run_quiet() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
