#!/usr/bin/env bash
# Deletes a TPU VM slice (it is billed until deleted). Last step of docs/tpu.md.
set -euo pipefail

PROG=launch/delete_tpu.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE [--name NAME] [--queued] [--yes] [--dry-run]

Deletes the TPU VM slice NAME, or, with --queued, the queued resource NAME and
its slice (for slices made with launch/create_tpu.sh --queued). The workdir and
the checkpoints on GCS are not touched: a new slice resumes from them.

Options (each can also be set by the environment variable on the right):
  --project PROJECT   PROJECT     GCP project (required)
  --zone ZONE         ZONE        zone of the slice (required)
  --name NAME         TPU_NAME    default: nfnet-tpu
  --queued            QUEUED=1    delete the queued resource (and its slice)
  --yes                           do not ask for confirmation
  --dry-run           DRY_RUN=1   print the gcloud command, run nothing
  -h, --help
EOF
}



QUEUED=${QUEUED:-0}
YES=0

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
      esac
      shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --yes|-y) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'." ;;
  esac
done

[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (the zone of the slice)."
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."
fi

extra=()
if [[ "$YES" == 1 ]]; then
  extra+=(--quiet)                  # gcloud asks for confirmation otherwise
fi
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --force \
    --project "$PROJECT" --zone "$ZONE" ${extra[@]+"${extra[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" \
    --project "$PROJECT" --zone "$ZONE" ${extra[@]+"${extra[@]}"}
fi
