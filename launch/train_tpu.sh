#!/usr/bin/env bash
# Starts (or stops) nfnet_jax training on EVERY worker of a TPU VM slice. Step 3 of
# docs/tpu.md.
#
# A multi-host job only runs once every host has started the same command: a host
# that is missing leaves the others waiting at TPU initialisation ("TPU backend
# initialization is taking more than 60 seconds") or in the first collective,
# forever. So this script starts all workers in one `--worker=all` call, checks
# first that every worker has the same install and none is already training, and
# tells you how to stop everything if a worker could not be started.
set -euo pipefail

PROG=launch/train_tpu.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TRAIN_PATTERN='python.* -m nfnet_jax[.]train'   # pgrep/pkill -f pattern of a run

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE --workdir gs://BUCKET/RUN
           [--config CONFIG] [--name NAME] [--tfds-data-dir gs://BUCKET/tfds]
           [--dry-run] [-- EXTRA_TRAIN_ARGS ...]
       $PROG --project PROJECT --zone ZONE [--name NAME] --stop | --status

Runs, in the background on every worker (nohup, one log per worker in
~/nfnet_logs, ~/nfnet_logs/latest.log pointing at the newest):
  python -m nfnet_jax.train --config CONFIG --workdir WORKDIR --distributed EXTRA_TRAIN_ARGS...
A run resumes automatically from the newest checkpoint in WORKDIR: after a
preemption or a crash, run the same command again.

Options (each can also be set by the environment variable on the right):
  --project PROJECT        PROJECT        GCP project (required)
  --zone ZONE              ZONE           zone of the slice (required)
  --name NAME              TPU_NAME       default: nfnet-tpu
  --workdir gs://...       WORKDIR        checkpoints and metrics (required); must be on
                                          GCS: every host must see the same directory
  --config CONFIG          CONFIG         default: experiments/nfnet.py:F0
  --tfds-data-dir DIR      TFDS_DATA_DIR  where TFDS finds imagenet2012 (required, except
                                          for experiments/digits.py), e.g. gs://BUCKET/tfds
  --stop                                  stop the run on every worker (SIGTERM)
  --status                                say, for every worker, whether the run is
                                          going on, finished or not running. Exit code:
                                          0 running (on every worker, or finished on
                                          some), 3 finished everywhere (exit code 0),
                                          4 not running on some worker (never started,
                                          stopped or died), 1 a worker could not be reached
                           CHECK_AFTER_SECS  after starting, wait this long (default 90),
                                          then check the run is alive everywhere (0: don't)
  --dry-run                DRY_RUN=1      print the gcloud commands, run nothing
  -h, --help
Everything after -- goes to nfnet_jax.train, e.g. config overrides:
  -- --config.train.batch_size=4096 --config.train.log_every_steps=50
or an evaluation of the newest checkpoint instead of training:
  -- --mode=eval

Example:
  TFDS_DATA_DIR=gs://my-bucket/tfds $PROG --project my-project --zone us-central2-b \\
      --workdir gs://my-bucket/nfnet/f0 --config experiments/nfnet.py:F0
EOF
}



WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-experiments/nfnet.py:F0}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
REMOTE_DIR=${REMOTE_DIR:-nfnet_jax}
REMOTE_VENV=${REMOTE_VENV:-nfnet_venv}
REMOTE_LOGS=${REMOTE_LOGS:-nfnet_logs}
CHECK_AFTER_SECS=${CHECK_AFTER_SECS:-90}
STOP=0
STATUS=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name|--workdir|--config|--tfds-data-dir)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --config) CONFIG=$2 ;;
        --tfds-data-dir) TFDS_DATA_DIR=$2 ;;
      esac
      shift 2 ;;
    --stop) STOP=1; shift ;;
    --status) STATUS=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (arguments for nfnet_jax.train go after --)." ;;
  esac
done

[[ "$CHECK_AFTER_SECS" =~ ^[0-9]+$ ]] || die "CHECK_AFTER_SECS must be a number of seconds."
[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (the zone of the slice)."
for dir in "$REMOTE_DIR" "$REMOTE_VENV" "$REMOTE_LOGS"; do
  [[ "$dir" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] \
    || die "REMOTE_DIR / REMOTE_VENV / REMOTE_LOGS must be plain directory names under the home directory (got '$dir')."
done
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."
fi
[[ "$STOP" != 1 || "$STATUS" != 1 ]] || die "--stop and --status: pass one of them."
GCLOUD_SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --project "$PROJECT" --zone "$ZONE")
# One line per worker: NFNET_ALIVE (with the run's command line, so that a caller can
# tell which run it is), NFNET_DONE (exited 0), NFNET_NONE (never started there) or
# NFNET_DEAD (with the end of its log, which holds the exit code).
status_body="if pgrep -f '$TRAIN_PATTERN' >/dev/null; then echo \"NFNET_ALIVE \$(hostname): \$(pgrep -af '$TRAIN_PATTERN' | tail -n 1)\"; elif [ ! -e $REMOTE_LOGS/latest.log ]; then echo \"NFNET_NONE \$(hostname): no run was started here\"; elif grep -q 'exited with code 0]' $REMOTE_LOGS/latest.log; then echo \"NFNET_DONE \$(hostname)\"; else echo \"NFNET_DEAD \$(hostname), last lines of its log:\"; tr '\\r' '\\n' < $REMOTE_LOGS/latest.log | tail -n 15; fi"

# ---------------------------------------------------------------------------
# --stop: every worker, so that no host is left waiting for the others.
# ---------------------------------------------------------------------------
if [[ "$STOP" == 1 ]]; then
  # SIGTERM, up to 60 s to exit (the TPU is free only then), then SIGKILL.
  stop_body="if pkill -f '$TRAIN_PATTERN'; then for i in \$(seq 60); do pgrep -f '$TRAIN_PATTERN' >/dev/null || break; sleep 1; done; pkill -9 -f '$TRAIN_PATTERN' && echo \"[\$(hostname)] killed: it did not exit within 60 s\"; echo \"[\$(hostname)] stopped\"; else echo \"[\$(hostname)] no run\"; fi"
  run_quiet "${GCLOUD_SSH[@]}" --command "$stop_body"
  exit 0
fi

# ---------------------------------------------------------------------------
# --status: for people, and for launch/run_spot.sh, which reads the exit code.
# ---------------------------------------------------------------------------
if [[ "$STATUS" == 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    run_quiet "${GCLOUD_SSH[@]}" --command "$status_body"
    exit 0
  fi
  if ! out=$("${GCLOUD_SSH[@]}" --command "$status_body"); then
    printf '%s\n' "$out"
    echo "$PROG: could not reach every worker of $TPU_NAME." >&2
    exit 1
  fi
  printf '%s\n' "$out"
  alive=$(printf '%s\n' "$out" | grep -c '^NFNET_ALIVE ' || true)
  finished=$(printf '%s\n' "$out" | grep -c '^NFNET_DONE ' || true)
  stopped=$(printf '%s\n' "$out" | grep -c -E '^NFNET_(NONE|DEAD) ' || true)
  echo "Running on $alive workers, finished on $finished, not running on $stopped."
  if [[ "$stopped" -gt 0 ]]; then
    exit 4
  elif [[ "$alive" -gt 0 ]]; then
    exit 0
  elif [[ "$finished" -gt 0 ]]; then
    exit 3
  fi
  echo "$PROG: no worker of $TPU_NAME answered." >&2
  exit 1
fi

# ---------------------------------------------------------------------------
# Refuse what would break a multi-host run.
# ---------------------------------------------------------------------------
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir gs://BUCKET/RUN (or export WORKDIR)."
[[ "$WORKDIR" == gs://?* ]] \
  || die "the workdir must be on GCS (gs://BUCKET/...), got '$WORKDIR': every host saves to and restores from the same checkpoint directory, and a local path (e.g. /tmp) differs per host and is lost with the VM."
case "$CONFIG" in
  experiments/digits.py*) ;;          # embedded dataset: no TFDS
  *)
    [[ -n "$TFDS_DATA_DIR" ]] \
      || die "TFDS_DATA_DIR is not set: pass --tfds-data-dir gs://BUCKET/tensorflow_datasets (or export TFDS_DATA_DIR), the TFDS data_dir holding the prepared imagenet2012 (see docs/tpu.md)."
    if [[ "$TFDS_DATA_DIR" != gs://* ]]; then
      echo "$PROG: warning: TFDS_DATA_DIR=$TFDS_DATA_DIR is not on GCS: every worker needs the prepared data at that path." >&2
    fi ;;
esac

if [[ "$DRY_RUN" != 1 ]]; then
  echo "Checking the workers ..."
  check_body="if pgrep -f '$TRAIN_PATTERN' >/dev/null; then echo \"NFNET_BUSY \$(hostname)\"; fi; echo \"NFNET_SETUP \$(cat $REMOTE_DIR/.nfnet_setup 2>/dev/null || echo missing)\""
  out=$("${GCLOUD_SSH[@]}" --command "$check_body") \
    || die "could not reach every worker of $TPU_NAME; nothing was started."
  if busy=$(printf '%s\n' "$out" | grep '^NFNET_BUSY '); then
    die "a run is already going on, on: $(printf '%s\n' "$busy" | sed 's/^NFNET_BUSY //' | tr '\n' ' ')
Stop it on every worker first: $PROG --stop --name $TPU_NAME --project $PROJECT --zone $ZONE"
  fi
  distinct=$(printf '%s\n' "$out" | grep '^NFNET_SETUP ' | sort | uniq -c || true)
  if [[ -z "$distinct" || $(printf '%s\n' "$distinct" | wc -l) -ne 1 || "$distinct" == *missing* ]]; then
    die "the workers do not all have the same install (count, setup):
$distinct
Run launch/setup_tpu.sh --name $TPU_NAME --project $PROJECT --zone $ZONE first; nothing was started."
  fi
  echo "$(printf '%s\n' "$distinct" | awk '{print $1}') workers ready, with the same install: ${distinct#*NFNET_SETUP }"
fi

# ---------------------------------------------------------------------------
# Start on every worker at once.
# ---------------------------------------------------------------------------
RUN_ID=$(date -u +%Y%m%d-%H%M%S)
TRAIN_ARGS=(--config "$CONFIG" --workdir "$WORKDIR" --distributed ${EXTRA[@]+"${EXTRA[@]}"})
# Runs on each worker; $1..$5 are the settings below, the rest the training args.
# One line on purpose: the remote login shell gets it as a plain string. The
# subshell adds the exit code to the log once the run ends.
# shellcheck disable=SC2016  # expanded on the worker, not here
start_body='set -eu; repo=$1 venv=$2 logs=$3 run=$4 tfds=$5; shift 5; cd "$HOME/$repo"; mkdir -p "$HOME/$logs"; log="$HOME/$logs/train-$run-$(hostname).log"; ln -sfn "$log" "$HOME/$logs/latest.log"; if [ -n "$tfds" ]; then export TFDS_DATA_DIR="$tfds"; fi; ( set +e; nohup "$HOME/$venv/bin/python" -m nfnet_jax.train "$@"; echo "[nfnet_jax.train exited with code $?]" ) >"$log" 2>&1 </dev/null & echo "[$(hostname)] started (log: $log)"'
remote=$(printf 'bash -c %q nfnet_train' "$start_body"; printf ' %q' \
  "$REMOTE_DIR" "$REMOTE_VENV" "$REMOTE_LOGS" "$RUN_ID" "$TFDS_DATA_DIR" "${TRAIN_ARGS[@]}")

echo "Starting on every worker of $TPU_NAME:"
printf '  python -m nfnet_jax.train'
printf ' %q' "${TRAIN_ARGS[@]}"
printf '\n'
if ! run_quiet "${GCLOUD_SSH[@]}" --command "$remote"; then
  cat >&2 <<EOF

$PROG: error: starting failed on at least one worker (see above). The workers that
did start are now waiting for the missing one and will hang. Stop them all, then
start again:
  $PROG --stop --name $TPU_NAME --project $PROJECT --zone $ZONE
EOF
  exit 1
fi
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi

# A bad flag or config kills the run on every host within seconds; one host dying
# alone leaves the others hanging. Look once, after a while.
if [[ "$CHECK_AFTER_SECS" -gt 0 ]]; then
  echo "Checking in $CHECK_AFTER_SECS s that the run is alive on every worker ..."
  sleep "$CHECK_AFTER_SECS"
  out=$("${GCLOUD_SSH[@]}" --command "$status_body") || true
  if [[ "$out" == *NFNET_DEAD* || "$out" == *NFNET_NONE* \
        || ( "$out" != *NFNET_ALIVE* && "$out" != *NFNET_DONE* ) ]]; then
    printf '%s\n' "$out" >&2
    cat >&2 <<EOF

$PROG: error: the run is not alive on every worker (see above). Stop what is
left, fix the cause and start again:
  $PROG --stop --name $TPU_NAME --project $PROJECT --zone $ZONE
EOF
    exit 1
  fi
  echo "Running on $(printf '%s\n' "$out" | grep -c '^NFNET_ALIVE ') workers, finished on $(printf '%s\n' "$out" | grep -c '^NFNET_DONE ')."
fi

cat <<EOF

Started on every worker (run $RUN_ID). Follow process 0's log:
  launch/tail_logs.sh --name $TPU_NAME --project $PROJECT --zone $ZONE --follow
Metrics: gcloud storage cat $WORKDIR/metrics.jsonl | tail
Status:  $PROG --status --name $TPU_NAME --project $PROJECT --zone $ZONE
Stop:    $PROG --stop --name $TPU_NAME --project $PROJECT --zone $ZONE
EOF
