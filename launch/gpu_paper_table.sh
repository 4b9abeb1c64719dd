#!/usr/bin/env bash
# Times the paper's table 3 (arXiv 2102.06171, appendix A.2 protocol) on an NVIDIA machine.
set -euo pipefail

PROG=launch/gpu_paper_table.sh

usage() {
  cat <<EOF
Usage: $PROG [--out DIR] [--models LIST] [--timeout SECS] [-- BENCHMARK_FLAGS...]

Runs 'python -m nfnet_jax.benchmark --paper-table' once per model, each in its own
process under a time limit, so that one model that hangs or runs out of memory costs
only its own row: one full training step (forward, backward, cross-device mean,
optimizer) at the model's train size, 32 images per device, bfloat16, median of the
timed steps on data preloaded on every local GPU, remat where XLA's memory analysis
says a step does not fit a GPU's memory. Writes DIR/table3.csv (one row per model,
with the paper's figures), DIR/table3.md (the markdown table and the F1 vs
EfficientNet-B7 speed-up line) and DIR/logs/MODEL.log.

Run from the repository root, after: pip install -e ".[gpu]"

Options (each can also be set by the environment variable on the right):
  --out DIR         OUT_DIR      default: paper_table_<UTC date-time>
  --models LIST     MODELS       comma-separated; default: the benchmark's (every
                                 row of table 3, F6 without SAM, BN-ResNet50)
  --timeout SECS    MODEL_TIMEOUT  per model, default: 1800
  --python PATH     PYTHON       default: python
  -h, --help

Flags after -- go to every benchmark run, e.g. -- --steps 200 --warmup 10
(defaults: --steps 100 --warmup 10; the paper took the median of 5000 steps).
EOF
}

OUT_DIR=${OUT_DIR:-paper_table_$(date -u +%Y%m%d_%H%M%S)}
MODELS=${MODELS:-}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-1800}
PYTHON=${PYTHON:-python}
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --timeout) MODEL_TIMEOUT=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "$PROG: error: unknown option $1" >&2; echo "Run '$PROG --help' for usage." >&2; exit 2 ;;
  esac
done

if [[ -z "$MODELS" ]]; then
  MODELS=$("$PYTHON" -c 'from nfnet_jax import benchmark; print(",".join(benchmark.PAPER_MODELS))')
fi
mkdir -p "$OUT_DIR/logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpus.csv" || true

IFS=, read -r -a NAMES <<< "$MODELS"
PARTS=()
for name in "${NAMES[@]}"; do
  safe=${name//+/_plus}
  part="$OUT_DIR/logs/$safe.csv"
  echo "[$(date -u '+%F %T')] $name" >&2
  # The CSV of each model on its own: a model killed by the timeout leaves no row, and is
  # reported below instead.
  if timeout --kill-after=60 "$MODEL_TIMEOUT" "$PYTHON" -m nfnet_jax.benchmark --paper-table \
      --models "$name" --steps 100 --warmup 10 "${EXTRA[@]}" --csv "$part" \
      > "$OUT_DIR/logs/$safe.log" 2>&1; then
    PARTS+=("$part")
  else
    echo "$name: exit status $? (timeout $MODEL_TIMEOUT s?); see $OUT_DIR/logs/$safe.log" >&2
    printf '%s\n' "$name" >> "$OUT_DIR/timed_out.txt"
  fi
done

# One table from the per-model rows, the speed-up line measured over all of them.
"$PYTHON" - "$OUT_DIR" "${PARTS[@]}" <<'EOF'
import csv, os, sys
from nfnet_jax import benchmark

out, parts = sys.argv[1], sys.argv[2:]
rows = [row for part in parts for row in csv.DictReader(open(part))]
for row in rows:
  for key in ('ms_per_step', 'paper_tpuv3_ms', 'paper_v100_ms'):
    row[key] = float(row[key]) if row[key] else ''
  row['remat'] = {'True': True, 'False': False}.get(row['remat'], '')
benchmark.write_csv(os.path.join(out, 'table3.csv'), rows, benchmark.PAPER_FIELDS)
text = benchmark.markdown_table(rows) + '\n\n' + benchmark.speedup_line(rows) + '\n'
open(os.path.join(out, 'table3.md'), 'w').write(text)
print(text)
EOF
echo "Wrote $OUT_DIR/table3.csv and $OUT_DIR/table3.md" >&2
