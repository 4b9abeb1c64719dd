#!/usr/bin/env bash
# Shows the training logs of the workers of a TPU VM slice. Step 4 of docs/tpu.md.
set -euo pipefail

PROG=launch/tail_logs.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE [--name NAME]
           [--worker N|all] [--lines N] [--follow] [--dry-run]

Prints the last lines of the newest training log (~/nfnet_logs/latest.log,
written by launch/train_tpu.sh) of one worker, or of every worker with their
hostnames in front. Worker 0 runs process 0, the one that shows the progress
bar and writes metrics and checkpoints; the other workers' logs matter when a
run fails or hangs.

Options (each can also be set by the environment variable on the right):
  --project PROJECT   PROJECT     GCP project (required)
  --zone ZONE         ZONE        zone of the slice (required)
  --name NAME         TPU_NAME    default: nfnet-tpu
  --worker N|all      WORKER      default: 0
  --lines N           TAIL_LINES  default: 40
  --follow                        keep printing new lines (one worker only; Ctrl-C ends)
  --dry-run           DRY_RUN=1   print the gcloud command, run nothing
  -h, --help

The metrics themselves are in the workdir: gcloud storage cat gs://BUCKET/RUN/metrics.jsonl
EOF
}



WORKER=${WORKER:-0}
TAIL_LINES=${TAIL_LINES:-40}
REMOTE_LOGS=${REMOTE_LOGS:-nfnet_logs}
FOLLOW=0

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name|--worker|--lines)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --worker) WORKER=$2 ;;
        --lines) TAIL_LINES=$2 ;;
      esac
      shift 2 ;;
    --follow|-f) FOLLOW=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'." ;;
  esac
done

[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (the zone of the slice)."
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker takes a worker number or 'all', got '$WORKER'."
[[ "$TAIL_LINES" =~ ^[0-9]+$ ]] || die "--lines takes a number, got '$TAIL_LINES'."
[[ "$REMOTE_LOGS" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "REMOTE_LOGS must be a plain directory name (got '$REMOTE_LOGS')."
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."
fi

log="$REMOTE_LOGS/latest.log"       # relative to the worker's home directory
missing="echo \"[\$(hostname)] no $log: nothing was started there by launch/train_tpu.sh\""
if [[ "$FOLLOW" == 1 ]]; then
  [[ "$WORKER" != all ]] || die "--follow works on one worker at a time (e.g. --worker 0)."
  # A terminal (-t) so that Ctrl-C also ends the remote tail; the progress bar
  # redraws in place.
  run_quiet gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" --project "$PROJECT" \
    --zone "$ZONE" --command "if [ -e $log ]; then exec tail -n $TAIL_LINES -F $log; else $missing; fi" -- -t
else
  # The progress bar rewrites its line with \r: one line per update here.
  run_quiet gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" --project "$PROJECT" \
    --zone "$ZONE" --command "if [ -e $log ]; then tr '\\r' '\\n' < $log | tail -n $TAIL_LINES | sed \"s/^/[\$(hostname)] /\"; else $missing; fi"
fi
