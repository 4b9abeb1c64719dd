#!/usr/bin/env bash
# Keeps one nfnet_jax training run going on spot (or preemptible) TPU capacity until
# it is done. docs/tpu.md, "Spot and preemptible runs".
#
# A preempted spot slice cannot be restarted: it has to be deleted, created again and
# set up again, and the same training command started again, which resumes from the
# newest checkpoint in the workdir. This script does that in a loop, with the other
# launch/ scripts, until the trainer's final export <workdir>/params_ema.npz exists.
set -euo pipefail

PROG=launch/run_spot.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE --workdir gs://BUCKET/RUN
           [--name NAME] [--accelerator-type TYPE] [--version VERSION]
           [--config CONFIG] [--tfds-data-dir DIR] [--spot | --preemptible]
           [--max-restarts N] [--max-failures N] [--poll-interval SECS]
           [--delete-when-done] [--dry-run] [-- EXTRA_TRAIN_ARGS ...]

Keeps one training run going on spot (or preemptible) capacity until it is done,
that is until WORKDIR/params_ema.npz (the trainer's final export) exists:
  1. creates the slice NAME if there is none      (launch/create_tpu.sh --spot)
  2. installs the commit checked out now, on every worker, and the same commit
     again on every new slice                     (launch/setup_tpu.sh --commit)
  3. starts the training on every worker          (launch/train_tpu.sh)
  4. every SECS seconds: is the run done, what state is the slice in, is the
     training still running on every worker       (launch/train_tpu.sh --status)
  5. when the slice is PREEMPTED, TERMINATED or gone: deletes it and goes back
     to 1; the same training command resumes from the newest checkpoint. When
     the training stops on a READY slice: starts it again (3).
A slice NAME that exists already is used; a run of this WORKDIR already going on
there is supervised as it is.

Every event is logged with a UTC timestamp. Exit code: 0 the run is done; 1 gave
up (more than --max-restarts preemptions, more than --max-failures failed steps,
or another run holds the slice); 2 bad arguments; 130 or 143 stopped by Ctrl-C or
SIGTERM.

Options (each can also be set by the environment variable on the right):
  --project PROJECT        PROJECT           GCP project (required)
  --zone ZONE              ZONE              zone with TPU capacity (required)
  --name NAME              TPU_NAME          default: nfnet-tpu
  --accelerator-type TYPE  ACCELERATOR_TYPE  default: v4-32
  --version VERSION        TPU_VERSION       TPU VM image, default: tpu-ubuntu2204-base
  --workdir gs://...       WORKDIR           checkpoints, metrics and the final export
                                             (required)
  --config CONFIG          CONFIG            default: experiments/nfnet.py:F0
  --tfds-data-dir DIR      TFDS_DATA_DIR     as for launch/train_tpu.sh
  --spot                                     spot capacity (the default)
  --preemptible            PREEMPTIBLE=1     preemptible capacity (24 h at most per slice)
  --max-restarts N         MAX_RESTARTS      give up at preemption N+1; default: 10
  --max-failures N         MAX_FAILURES      give up at failed step N+1, counted over the
                                             whole run: a create (e.g. no capacity left),
                                             a setup or a start that failed, a training
                                             that stopped on a READY slice; default: 5
  --poll-interval SECS     POLL_INTERVAL     default: 60
  --delete-when-done       DELETE_WHEN_DONE=1  delete the slice once the run is done
                                             (otherwise it is left, and billed)
  --dry-run                DRY_RUN=1         print the gcloud commands, run nothing
  -h, --help
                           MAX_POLL_ERRORS   give up after this many failed gcloud polls
                                             in a row; default: 10
Everything after -- goes to nfnet_jax.train, as for launch/train_tpu.sh.

Ctrl-C (or kill PID) stops this script only; the slice and the training on it go
on. Run the same command again to supervise them again, or stop them:
  launch/train_tpu.sh --stop ...     launch/delete_tpu.sh --yes ...

Example:
  $PROG --project my-project --zone us-central2-b --name nfnet-spot \\
      --accelerator-type v4-32 --workdir gs://my-bucket/nfnet/f0 \\
      --config experiments/nfnet.py:F0 --tfds-data-dir gs://my-bucket/tensorflow_datasets
EOF
}



ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-experiments/nfnet.py:F0}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
CAPACITY=spot
if [[ "${PREEMPTIBLE:-0}" == 1 ]]; then
  CAPACITY=preemptible
fi
MAX_RESTARTS=${MAX_RESTARTS:-10}
MAX_FAILURES=${MAX_FAILURES:-5}
POLL_INTERVAL=${POLL_INTERVAL:-60}
MAX_POLL_ERRORS=${MAX_POLL_ERRORS:-10}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}
EXTRA=()

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name|--accelerator-type|--version|--workdir|--config|--tfds-data-dir|--max-restarts|--max-failures|--poll-interval)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --accelerator-type) ACCELERATOR_TYPE=$2 ;;
        --version) TPU_VERSION=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --config) CONFIG=$2 ;;
        --tfds-data-dir) TFDS_DATA_DIR=$2 ;;
        --max-restarts) MAX_RESTARTS=$2 ;;
        --max-failures) MAX_FAILURES=$2 ;;
        --poll-interval) POLL_INTERVAL=$2 ;;
      esac
      shift 2 ;;
    --spot) CAPACITY=spot; shift ;;
    --preemptible) CAPACITY=preemptible; shift ;;
    --delete-when-done) DELETE_WHEN_DONE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (arguments for nfnet_jax.train go after --)." ;;
  esac
done

# Checked here: the scripts below would only see an empty --project, --zone, --workdir.
[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (a zone with TPU capacity, e.g. us-central2-b for v4, europe-west4-a for v3)."
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir gs://BUCKET/RUN (or export WORKDIR)."
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts takes a whole number, got '$MAX_RESTARTS'."
[[ "$MAX_FAILURES" =~ ^[0-9]+$ ]] || die "--max-failures takes a whole number, got '$MAX_FAILURES'."
[[ "$POLL_INTERVAL" =~ ^[0-9]+([.][0-9]+)?$ ]] \
  || die "--poll-interval takes a number of seconds, got '$POLL_INTERVAL'."
[[ "$MAX_POLL_ERRORS" =~ ^[1-9][0-9]*$ ]] || die "MAX_POLL_ERRORS must be a number >= 1, got '$MAX_POLL_ERRORS'."

SLICE_ARGS=(--project "$PROJECT" --zone "$ZONE" --name "$TPU_NAME")
CREATE_ARGS=("${SLICE_ARGS[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$TPU_VERSION"
  "--$CAPACITY")
TRAIN_ARGS=("${SLICE_ARGS[@]}" --workdir "$WORKDIR" --config "$CONFIG")
if [[ -n "$TFDS_DATA_DIR" ]]; then
  TRAIN_ARGS+=(--tfds-data-dir "$TFDS_DATA_DIR")
fi
if [[ ${#EXTRA[@]} -gt 0 ]]; then
  TRAIN_ARGS+=(-- "${EXTRA[@]}")
fi

# Runs another launch/ script with the settings given here only: an exported SPOT,
# QUEUED or DRY_RUN meant for it must not change what this script asked for.
child() {
  local script=$1
  shift
  SPOT=0 PREEMPTIBLE=0 QUEUED=0 DRY_RUN=0 "$HERE/$script" "$@"
}

# The other scripts check their own settings; ask them (--dry-run runs nothing)
# before anything is created, and report their complaint as ours.
check_with() {
  local err
  if ! err=$(child "$1" --dry-run "${@:2}" 2>&1 >/dev/null); then
    err=$(printf '%s\n' "$err" | grep -m 1 ': error: ' || printf '%s' "$err")
    die "${err#*: error: }"
  fi
}
check_with create_tpu.sh "${CREATE_ARGS[@]}"
check_with train_tpu.sh "${TRAIN_ARGS[@]}"

# Every new slice gets the commit checked out now, so that a run resumed after a
# preemption runs the same code even if the checkout has moved on meanwhile.
COMMIT=$(git -C "$HERE/.." rev-parse HEAD 2>/dev/null) \
  || die "$(cd "$HERE/.." && pwd) is not a git checkout with a commit: the workers get 'git archive' of a commit."
MARKER="${WORKDIR%/}/params_ema.npz"
DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --project "$PROJECT" --zone "$ZONE"
  --format='value(state)')
LIST_MARKER=(gcloud storage ls "$MARKER")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "Every $POLL_INTERVAL s: is the run done, in what state is the slice?"
  run "${LIST_MARKER[@]}"
  run "${DESCRIBE[@]}"
  echo "When there is no slice, or it was preempted (deleted first):"
  child delete_tpu.sh --dry-run "${SLICE_ARGS[@]}" --yes
  child create_tpu.sh --dry-run "${CREATE_ARGS[@]}"
  child setup_tpu.sh --dry-run "${SLICE_ARGS[@]}" --commit "$COMMIT"
  child train_tpu.sh --dry-run "${TRAIN_ARGS[@]}"
  echo "While it trains:"
  child train_tpu.sh --dry-run --status "${SLICE_ARGS[@]}"
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

log() {
  printf '[%s] %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$*"
}

give_up() {
  log "giving up: $*" >&2
  log "the checkpoints are in $WORKDIR: run the same command again to go on." >&2
  exit 1
}

SLEEP_PID=
# In the background, so that a signal ends the wait at once rather than after it.
pause() {
  sleep "$POLL_INTERVAL" &
  SLEEP_PID=$!
  wait "$SLEEP_PID" || true
  SLEEP_PID=
}

on_signal() {
  local pid
  for pid in $(jobs -p); do         # the pause's sleep, also if SLEEP_PID was not set yet
    kill "$pid" 2>/dev/null || true
  done
  log "stopped by $1. The slice and the training on it are left as they are:" >&2
  log "  stop the training: launch/train_tpu.sh --stop ${SLICE_ARGS[*]}" >&2
  log "  delete the slice:  launch/delete_tpu.sh --yes ${SLICE_ARGS[*]}" >&2
  exit "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

restarts=0        # preemptions (or slices lost otherwise) so far
failures=0        # failed steps so far, over the whole run
poll_errors=0     # failed gcloud polls in a row
have_slice=0      # 1 while there is a slice this script knows of
fresh=0           # 1 if this script created the slice (so no run of ours can be on it)
need_setup=1      # the slice has not been set up by this script yet
started=0         # the training was started (or found going on) on this slice
stale=0           # the last training start on this slice may have left processes behind
suspect=0         # the last poll found the training not running on every worker
loss_counted=0    # the loss of the current slice is counted in $restarts
done_waits=0      # polls spent waiting for the trainer to exit before deleting the slice
waiting_for=      # the transitional state (CREATING, REPAIRING, ...) last logged
STATE=

# Sets STATE to the slice's state (READY, CREATING, PREEMPTED, ...), MISSING when
# there is no such slice, ERROR when gcloud could not tell.
slice_state() {
  local out
  if out=$("${DESCRIBE[@]}" 2>"$TMP/err"); then
    STATE=${out:-UNKNOWN}
  elif grep -q -E 'NOT_FOUND|not found' "$TMP/err"; then
    STATE=MISSING
  else
    STATE=ERROR
  fi
}

# 0: the final export exists; 1: not yet; 2: gcloud could not tell.
run_done() {
  if "${LIST_MARKER[@]}" >/dev/null 2>"$TMP/err"; then
    return 0
  elif grep -q 'matched no objects' "$TMP/err"; then
    return 1
  fi
  return 2
}

poll_error() {
  poll_errors=$((poll_errors + 1))
  log "could not $1 ($poll_errors failed polls in a row, at most $MAX_POLL_ERRORS): $(tail -n 1 "$TMP/err")"
  [[ "$poll_errors" -lt "$MAX_POLL_ERRORS" ]] \
    || give_up "$MAX_POLL_ERRORS polls in a row failed (is gcloud still logged in?)."
}

failure() {
  failures=$((failures + 1))
  log "$* (failed step $failures; --max-failures $MAX_FAILURES)"
  [[ "$failures" -le "$MAX_FAILURES" ]] \
    || give_up "more than --max-failures $MAX_FAILURES failed steps; the last one: $*."
}

# The slice was preempted or is gone: it cannot be restarted, only replaced.
lost() {
  if [[ "$loss_counted" == 0 ]]; then
    loss_counted=1
    restarts=$((restarts + 1))
    log "slice $TPU_NAME $1: preemption $restarts (--max-restarts $MAX_RESTARTS)"
  fi
  local deleted=1
  if [[ "$STATE" != MISSING ]]; then
    # Deleted even when giving up: a preempted slice only holds quota.
    log "deleting $TPU_NAME"
    child delete_tpu.sh "${SLICE_ARGS[@]}" --yes || deleted=0
  fi
  [[ "$restarts" -le "$MAX_RESTARTS" ]] \
    || give_up "the slice was preempted $restarts times, more than --max-restarts $MAX_RESTARTS."
  if [[ "$deleted" == 0 ]]; then
    failure "deleting the slice failed"
    return 1
  fi
  have_slice=0
  return 0
}

create_slice() {
  log "creating $TPU_NAME ($ACCELERATOR_TYPE, $CAPACITY)"
  if ! child create_tpu.sh "${CREATE_ARGS[@]}"; then
    failure "creating the slice failed (no $CAPACITY capacity in $ZONE right now?)"
    return 1
  fi
  log "created $TPU_NAME"
  have_slice=1 fresh=1 need_setup=1 started=0 stale=0 suspect=0 loss_counted=0
}

# Runs train_tpu.sh --status; sets STATUS_RC (0 running, 3 finished, 4 not running
# on some worker, 1 unreachable) and STATUS_OUT.
training_status() {
  STATUS_RC=0
  STATUS_OUT=$(child train_tpu.sh --status "${SLICE_ARGS[@]}" 2>&1) || STATUS_RC=$?
  printf '%s\n' "$STATUS_OUT" | tail -n 1 > "$TMP/err"
}

# On a slice this script did not create: is our run going on there already (e.g.
# this script was stopped and started again)? Then it is supervised as it is.
adopt_running_run() {
  training_status
  [[ "$STATUS_RC" == 0 ]] || return 1
  local line
  while IFS= read -r line; do
    if [[ "$line" == NFNET_ALIVE* && "$line " == *" --workdir $WORKDIR "* ]]; then
      log "the training of $WORKDIR is already going on on $TPU_NAME: supervising it"
      return 0
    fi
  done <<< "$STATUS_OUT"
  printf '%s\n' "$STATUS_OUT" >&2
  give_up "another run is going on on $TPU_NAME (above). Stop it (launch/train_tpu.sh --stop ${SLICE_ARGS[*]}) or use another --name."
}

finish() {
  if [[ "$DELETE_WHEN_DONE" == 1 ]]; then
    slice_state
    if [[ "$STATE" == READY && "$done_waits" -lt 5 ]]; then
      training_status
      if [[ "$STATUS_RC" == 0 ]]; then
        # The export is the trainer's last write; let it exit before its VMs go.
        done_waits=$((done_waits + 1))
        log "the run is done ($MARKER exists); waiting for the trainer to exit before deleting $TPU_NAME"
        return 1
      fi
    fi
    log "the run is done: $MARKER exists. Deleting $TPU_NAME."
    if [[ "$STATE" != MISSING ]] && ! child delete_tpu.sh "${SLICE_ARGS[@]}" --yes; then
      log "warning: could not delete $TPU_NAME, which is billed until deleted: launch/delete_tpu.sh --yes ${SLICE_ARGS[*]}" >&2
    fi
  else
    log "the run is done: $MARKER exists."
    if [[ "$have_slice" == 1 ]]; then
      log "$TPU_NAME is left as it is, and billed until deleted: launch/delete_tpu.sh --yes ${SLICE_ARGS[*]}"
    fi
  fi
  log "preemptions: $restarts, failed steps: $failures"
  exit 0
}

printf -v train_command ' %q' --config "$CONFIG" --workdir "$WORKDIR" --distributed \
  ${EXTRA[@]+"${EXTRA[@]}"}
log "supervising the run of $WORKDIR on $TPU_NAME ($ACCELERATOR_TYPE, $CAPACITY) in $PROJECT/$ZONE, commit ${COMMIT:0:12}"
log "training command on every worker: python -m nfnet_jax.train$train_command"

while true; do
  done_rc=0
  run_done || done_rc=$?
  if [[ "$done_rc" == 0 ]]; then
    finish || { pause; continue; }
  elif [[ "$done_rc" == 2 ]]; then
    poll_error "list $MARKER"
    pause
    continue
  fi

  slice_state
  if [[ "$STATE" == ERROR ]]; then
    poll_error "describe $TPU_NAME"
    pause
    continue
  fi
  if [[ "$STATE" != READY || "$started" == 0 ]]; then
    poll_errors=0                   # else the training's status below completes the poll
  fi
  if [[ "$STATE" != "$waiting_for" ]]; then
    waiting_for=
  fi

  case "$STATE" in
    MISSING)
      if [[ "$have_slice" == 1 ]]; then
        lost "is gone" || { pause; continue; }
      fi
      create_slice || pause
      continue ;;
    PREEMPTED|TERMINATED|STOPPED)
      lost "is $STATE" || pause
      continue ;;
    READY) have_slice=1 ;;
    *)
      if [[ "$STATE" != "$waiting_for" ]]; then
        log "slice $TPU_NAME is $STATE: waiting"
        waiting_for=$STATE
      fi
      have_slice=1
      pause
      continue ;;
  esac

  if [[ "$need_setup" == 1 ]]; then
    if [[ "$fresh" == 0 ]] && adopt_running_run; then
      need_setup=0 started=1 fresh=1
      pause
      continue
    fi
  fi
  if [[ "$started" == 0 && "$stale" == 1 ]]; then
    # Nothing may hold the TPU for the setup's check and the next start.
    log "stopping what is left of the last training on every worker"
    child train_tpu.sh --stop "${SLICE_ARGS[@]}" || true
    stale=0
  fi
  if [[ "$need_setup" == 1 ]]; then
    log "setting up $TPU_NAME (commit ${COMMIT:0:12})"
    if ! child setup_tpu.sh "${SLICE_ARGS[@]}" --commit "$COMMIT"; then
      failure "the setup failed"
      pause
      continue
    fi
    need_setup=0 fresh=1
  fi

  if [[ "$started" == 0 ]]; then
    log "starting the training on every worker of $TPU_NAME"
    stale=1
    if ! child train_tpu.sh "${TRAIN_ARGS[@]}"; then
      # Set up again before the next start: a worker may lack the install.
      need_setup=1
      failure "starting the training failed"
      pause
      continue
    fi
    started=1 suspect=0
    log "training started"
    pause
    continue
  fi

  training_status
  if [[ "$STATUS_RC" == [034] ]]; then
    poll_errors=0
  fi
  case "$STATUS_RC" in
    0) suspect=0 ;;
    3|4)
      printf '%s\n' "$STATUS_OUT"
      if [[ "$suspect" == 0 ]]; then
        # A preempted slice often still reads READY for a while after its VMs
        # stopped the trainer: look at the slice again before restarting anything.
        suspect=1
        if [[ "$STATUS_RC" == 3 ]]; then
          log "the training exited with code 0 on every worker; looking again in $POLL_INTERVAL s"
        else
          log "the training is not running on every worker; looking again in $POLL_INTERVAL s"
        fi
      elif [[ "$STATUS_RC" == 3 ]]; then
        log "warning: the training exited with code 0 on every worker, but there is no $MARKER (was it --mode=eval?); not starting it again."
        log "preemptions: $restarts, failed steps: $failures"
        exit 0
      else
        suspect=0 started=0
        failure "the training stopped on the READY slice $TPU_NAME (its log: launch/tail_logs.sh --worker all ${SLICE_ARGS[*]})"
      fi ;;
    *) poll_error "reach every worker of $TPU_NAME" ;;
  esac
  pause
done
