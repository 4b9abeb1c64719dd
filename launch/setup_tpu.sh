#!/usr/bin/env bash
# Installs nfnet_jax on EVERY worker of a TPU VM slice. Step 2 of docs/tpu.md.
#
# Every host gets the same code (a `git archive HEAD` tarball of this checkout) and
# the same install of it with its TPU extra (`pip install -e ".[tpu]"`, jax pinned to one
# version), in its own virtualenv; each worker then reports what JAX
# sees, and the script checks that all workers ended up with identical installs.
set -euo pipefail

PROG=launch/setup_tpu.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
JAX_VERSION_DEFAULT=0.10.2   # the version setup.py's pins were tested with
PIP_EXTRA=tpu                # setup.py's extra: jax[tpu] (libtpu) on the project's jax pins

usage() {
  cat <<EOF
Usage: $PROG --project PROJECT --zone ZONE [--name NAME] [--commit REV] [--fresh-venv]
           [--dry-run]

Copies the committed code of this checkout (git archive HEAD) to every worker of
the TPU VM slice NAME, creates a virtualenv there, installs nfnet_jax with its TPU
extra and jax==JAX_VERSION (pip install "jax==JAX_VERSION" -e ~/nfnet_jax[tpu]),
and prints the JAX version and device count seen by every worker. Rerun it after
every commit you want to train with.
Uncommitted changes are NOT copied.

Options (each can also be set by the environment variable on the right):
  --project PROJECT   PROJECT        GCP project (required)
  --zone ZONE         ZONE           zone of the slice (required)
  --name NAME         TPU_NAME       default: nfnet-tpu
  --commit REV        COMMIT_REV     the commit to copy, default: HEAD (launch/run_spot.sh
                                     pins the one it started with, for every new slice)
  --jax-version V     JAX_VERSION    default: $JAX_VERSION_DEFAULT (pinned; all hosts get the same;
                                     it must lie in setup.py's jax range for the Python)
  --python PYTHON     REMOTE_PYTHON  interpreter on the workers, default: python3.11
                                     (installed with apt if missing; nfnet_jax needs >= 3.11,
                                     Ubuntu 22.04 ships 3.10)
  --fresh-venv        FRESH_VENV=1   delete and recreate the workers' virtualenv
  --dry-run           DRY_RUN=1      print the gcloud commands, run nothing
  -h, --help
Remote layout (in the home directory of every worker; REMOTE_DIR / REMOTE_VENV):
  ~/nfnet_jax   the code     ~/nfnet_venv   the virtualenv

Example:
  $PROG --project my-project --zone us-central2-b --name nfnet-tpu
EOF
}



JAX_VERSION=${JAX_VERSION:-$JAX_VERSION_DEFAULT}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
REMOTE_DIR=${REMOTE_DIR:-nfnet_jax}
REMOTE_VENV=${REMOTE_VENV:-nfnet_venv}
FRESH_VENV=${FRESH_VENV:-0}
COMMIT_REV=${COMMIT_REV:-HEAD}

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then          # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project|--zone|--name|--jax-version|--python|--commit)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --jax-version) JAX_VERSION=$2 ;;
        --python) REMOTE_PYTHON=$2 ;;
        --commit) COMMIT_REV=$2 ;;
      esac
      shift 2 ;;
    --fresh-venv) FRESH_VENV=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'." ;;
  esac
done

[[ -n "$PROJECT" ]] || die "no project: pass --project MY_PROJECT or export PROJECT=MY_PROJECT."
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or export ZONE=ZONE (the zone of the slice)."
[[ "$JAX_VERSION" =~ ^[0-9]+(\.[0-9]+){2,3}$ ]] \
  || die "JAX_VERSION must be an exact version such as $JAX_VERSION_DEFAULT (got '$JAX_VERSION'): every host must get the same one."
for dir in "$REMOTE_DIR" "$REMOTE_VENV"; do
  [[ "$dir" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] \
    || die "REMOTE_DIR / REMOTE_VENV must be plain directory names under the home directory (got '$dir')."
done
[[ "$REMOTE_PYTHON" =~ ^[A-Za-z0-9_./-]+$ ]] || die "invalid --python '$REMOTE_PYTHON'."
[[ "$COMMIT_REV" =~ ^[A-Za-z0-9_][A-Za-z0-9_./@~^-]*$ ]] \
  || die "invalid --commit '$COMMIT_REV' (a commit hash, branch or tag)."
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)."
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
head=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null) \
  || die "$REPO_ROOT is not a git checkout with a commit: setup copies 'git archive HEAD'."
COMMIT=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "$COMMIT_REV^{commit}") \
  || die "--commit $COMMIT_REV is not a commit of $REPO_ROOT."
if [[ "$COMMIT" != "$head" ]]; then
  echo "$PROG: note: the workers get commit $COMMIT (--commit $COMMIT_REV), not HEAD ($head)." >&2
elif [[ -n "$(git -C "$REPO_ROOT" status --porcelain)" ]]; then
  echo "$PROG: warning: uncommitted changes and untracked files in $REPO_ROOT are NOT copied; the workers get commit $COMMIT." >&2
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git -C "$REPO_ROOT" archive --format=tar.gz -o "$TMP/nfnet_jax.tar.gz" "$COMMIT"

# What every worker runs. Arguments: commit, jax version, python, code dir,
# venv dir, fresh venv (0/1), setup.py extra. Paths are relative to the home directory.
cat > "$TMP/nfnet_jax_setup.sh" <<'REMOTE'
#!/usr/bin/env bash
set -euo pipefail
commit=$1 jax_version=$2 python=$3 repo_dir=$4 venv=$5 fresh_venv=$6 extra=$7
host=$(hostname)
say() { echo "[$host] $*"; }
cd "$HOME"

if ! command -v "$python" >/dev/null 2>&1; then
  if [[ "$python" =~ ^python3\.[0-9]+$ ]]; then
    say "installing $python and $python-venv (apt)"
    # A fresh VM may still be running unattended-upgrades: wait for the dpkg lock.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      "$python" "$python-venv" >/dev/null
  else
    say "error: $python not found"
    exit 1
  fi
fi

say "unpacking commit $commit into ~/$repo_dir"
rm -rf "$repo_dir.new"
mkdir -p "$repo_dir.new"
tar -xzf nfnet_jax.tar.gz -C "$repo_dir.new"
rm -rf "$repo_dir"
mv "$repo_dir.new" "$repo_dir"
rm -f nfnet_jax.tar.gz

if [[ "$fresh_venv" == 1 ]]; then
  rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
  say "creating the virtualenv ~/$venv ($python)"
  "$python" -m venv "$venv"
fi
say "installing nfnet_jax[$extra] with jax==$jax_version"
"$venv/bin/python" -m pip install -q --upgrade pip
# One resolver run: the extra brings jax[tpu] (the jaxlib and libtpu of that jax, from PyPI)
# within setup.py's range, and the exact pin makes every worker resolve the same jax.
"$venv/bin/python" -m pip install -q "jax==$jax_version" -e "$HOME/$repo_dir[$extra]"

packages=$("$venv/bin/python" -m pip freeze --all | sha256sum | cut -c1-16)
jax_installed=$("$venv/bin/python" -c 'import jax; print(jax.__version__)')
echo "commit=$commit jax=$jax_installed packages=$packages" > "$repo_dir/.nfnet_setup"

# Initialising the TPU needs every worker to do it at the same time, which
# `--worker=all` does; bounded, so that one failed worker cannot hang the others.
err=$(mktemp)
if seen=$(timeout 300 "$venv/bin/python" -c \
    'import jax; print(jax.__version__, jax.device_count(), jax.local_device_count())' 2>"$err"); then
  read -r v global local <<< "$seen"
  say "jax $v: $global devices in the slice, $local on this worker; commit ${commit:0:12}, packages $packages"
  rm -f "$err"
else
  say "error: JAX could not initialise the TPU within 300 s:"
  tail -n 5 "$err" | sed "s/^/[$host]   /"
  say "(another worker failed its setup -- see above -- or a process, e.g. a training run, holds the TPU)"
  exit 1
fi
REMOTE

echo "Copying commit $COMMIT to every worker of $TPU_NAME ..."
run gcloud compute tpus tpu-vm scp "$TMP/nfnet_jax.tar.gz" "$TMP/nfnet_jax_setup.sh" "$TPU_NAME:" \
  --worker=all --project "$PROJECT" --zone "$ZONE"

echo "Installing on every worker (several minutes) ..."
remote=$(printf 'bash nfnet_jax_setup.sh %q %q %q %q %q %q %q' "$COMMIT" "$JAX_VERSION" \
  "$REMOTE_PYTHON" "$REMOTE_DIR" "$REMOTE_VENV" "$FRESH_VENV" "$PIP_EXTRA")
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --project "$PROJECT" --zone "$ZONE" \
  --command "$remote" \
  || die "the setup failed on at least one worker (see its [hostname] lines above). Fix that and rerun $PROG."

# All workers must hold the same install; mismatched versions across hosts hang or
# break multi-host jobs.
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
echo "Checking that every worker has the same install ..."
out=$(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --project "$PROJECT" --zone "$ZONE" \
  --command "echo \"NFNET_SETUP \$(cat $REMOTE_DIR/.nfnet_setup 2>/dev/null || echo missing)\"") \
  || die "could not reach every worker to check the installs."
stamps=$(printf '%s\n' "$out" | grep '^NFNET_SETUP ' || true)
workers=$(printf '%s\n' "$stamps" | grep -c . || true)
distinct=$(printf '%s\n' "$stamps" | sed '/^$/d' | sort | uniq -c)
if [[ "$workers" -eq 0 || $(printf '%s\n' "$distinct" | wc -l) -ne 1 || "$distinct" == *missing* ]]; then
  echo "$PROG: error: the workers do not all have the same install (count, setup):" >&2
  printf '%s\n' "$distinct" >&2
  echo "Rerun $PROG (add --fresh-venv if a virtualenv is damaged)." >&2
  exit 1
fi
echo "All $workers workers: ${stamps%%$'\n'*}" | sed 's/NFNET_SETUP //'
echo
echo "Next: launch/train_tpu.sh --name $TPU_NAME --project $PROJECT --zone $ZONE --workdir gs://BUCKET/RUN"
