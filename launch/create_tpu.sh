#!/usr/bin/env bash
# Creates a Cloud TPU VM slice for nfnet_jax. Step 1 of docs/tpu.md.
set -euo pipefail

PROG=launch/create_tpu.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE [--name NAME]
           [--accelerator-type TYPE] [--version VERSION] [--spot | --preemptible]
           [--queued] [--dry-run]

Creates the TPU VM slice NAME (gcloud compute tpus tpu-vm create), or asks for
one through a queued resource of the same name (--queued).

Options (each can also be set by the environment variable on the right):
  --project PROJECT        PROJECT           GCP project (required)
  --zone ZONE              ZONE              zone with TPU capacity (required), e.g.
                                             europe-west4-a (v3), us-central2-b (v4)
  --name NAME              TPU_NAME          default: nfnet-tpu
  --accelerator-type TYPE  ACCELERATOR_TYPE  default: v4-32 (also v3-32, v3-8, v4-8, ...)
  --version VERSION        TPU_VERSION       TPU VM image, default: tpu-ubuntu2204-base
  --spot                   SPOT=1            spot capacity: cheaper, can be preempted
                                             (training resumes from the last checkpoint;
                                             launch/run_spot.sh does that for you)
  --preemptible            PREEMPTIBLE=1     the older preemptible capacity: can be
                                             preempted, and runs for 24 h at most
  --queued                 QUEUED=1          queued resource: waits for capacity instead
                                             of failing when none is free right now
  --dry-run                DRY_RUN=1         print the gcloud command, run nothing
  -h, --help

Example:
  $PROG --project my-project --zone us-central2-b --accelerator-type v4-32 --spot
EOF
}



ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
QUEUED=${QUEUED:-0}

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name|--accelerator-type|--version)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --accelerator-type) ACCELERATOR_TYPE=$2 ;;
        --version) TPU_VERSION=$2 ;;
      esac
      shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'." ;;
  esac
done

[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (a zone with TPU capacity, e.g. us-central2-b for v4, europe-west4-a for v3)."
[[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "invalid TPU name '$TPU_NAME': lowercase letters, digits and hyphens, starting with a letter."
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
  || die "invalid accelerator type '$ACCELERATOR_TYPE' (expected e.g. v3-32 or v4-32)."
[[ "$SPOT" != 1 || "$PREEMPTIBLE" != 1 ]] \
  || die "--spot and --preemptible are two kinds of capacity: pass one of them."
# Queued resources know spot capacity only; preemptible is a flag of tpu-vm create.
[[ "$QUEUED" != 1 || "$PREEMPTIBLE" != 1 ]] \
  || die "--queued takes --spot, not --preemptible (queued resources have no preemptible capacity)."
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."
fi

extra=()
if [[ "$SPOT" == 1 ]]; then
  extra+=(--spot)
fi
if [[ "$PREEMPTIBLE" == 1 ]]; then
  extra+=(--preemptible)
fi

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" \
    --node-id "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$TPU_VERSION" ${extra[@]+"${extra[@]}"}
  cat <<EOF

Queued. The slice exists once the queued resource is ACTIVE:
  gcloud compute tpus queued-resources describe $TPU_NAME --project $PROJECT --zone $ZONE
Then: launch/setup_tpu.sh --name $TPU_NAME --project $PROJECT --zone $ZONE
Delete it with: launch/delete_tpu.sh --queued --name $TPU_NAME --project $PROJECT --zone $ZONE
EOF
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" \
    --project "$PROJECT" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$TPU_VERSION" ${extra[@]+"${extra[@]}"}
  cat <<EOF

Next: launch/setup_tpu.sh --name $TPU_NAME --project $PROJECT --zone $ZONE
EOF
fi
