#!/usr/bin/env bash
# NFNet train-step speed on one NVIDIA machine, with timm's PyTorch port as the peer.
set -euo pipefail

PROG=launch/gpu_benchmark.sh

usage() {
  cat <<EOF
Usage: $PROG [--out DIR] [--variants LIST] [--timeout SECS] [--peak-tflops N] [--steps N]

Runs, each part in its own process under a time limit (a part that hangs or runs out of
memory costs only its own figures), and writes everything to DIR (summary.md, one log
and CSV per part):
  1. nfnet_jax's train step (forward, backward, cross-device mean, AGC + Nesterov SGD,
     EMA, metrics; 'python -m nfnet_jax.benchmark') of each variant at 32 images per
     device, bfloat16, the paper's train resolution (F0 192 px, F1 224 px): compile
     time, ms/step, img/s, XLA's peak memory per device; then achieved TFLOP/s and MFU.
  2. The same step with the other convolution lowering (--conv-impl native and dense):
     the backend's default ('auto') must be the faster one.
  3. timm's dm_nfnet_f0/f1 train step with bfloat16 autocast and torch.compile
     ('python -m nfnet_jax.timm_compare'), same batch and resolution, as the peer.
  4. The input pipeline ('python -m nfnet_jax.throughput'): images/s per host core
     against what the measured F0 step consumes.

MFU = (3 x 2 x forward MACs per image, nfnet_jax.count_flops) x img/s / peak. The
peak is the device's published dense bf16 tensor-core figure, looked up from the GPU
name (NVIDIA's datasheets, half their 2:4-sparsity figures: H100/H200 SXM 989.4,
H100 PCIe 756.5, A100 312 TFLOP/s) unless --peak-tflops is given; other GPUs need it
for an MFU. The figure used is printed.

Run from the repository root, after: pip install -e ".[gpu]" torch timm

Options (each can also be set by the environment variable on the right):
  --out DIR           OUT_DIR       default: gpu_benchmark_<UTC date-time>
  --variants LIST     VARIANTS      comma-separated, default: F0,F1
  --timeout SECS      PART_TIMEOUT  per part, default: 600
  --peak-tflops N     PEAK_TFLOPS   dense bf16 peak of one device; default: by GPU name
  --steps N           STEPS         timed steps per run, default: 50 (10 warm-up)
  --python PATH       PYTHON        default: python
  -h, --help
EOF
}

OUT_DIR=${OUT_DIR:-gpu_benchmark_$(date -u +%Y%m%d_%H%M%S)}
VARIANTS=${VARIANTS:-F0,F1}
PART_TIMEOUT=${PART_TIMEOUT:-600}
PEAK_TFLOPS=${PEAK_TFLOPS:-}
STEPS=${STEPS:-50}
PYTHON=${PYTHON:-python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --variants) VARIANTS=$2; shift 2 ;;
    --timeout) PART_TIMEOUT=$2; shift 2 ;;
    --peak-tflops) PEAK_TFLOPS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$PROG: error: unknown option $1" >&2; echo "Run '$PROG --help' for usage." >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
log() { echo "[$(date -u '+%F %T')] $*" >&2; }

# part NAME CMD...: runs CMD under the time limit, output in DIR/NAME.log; never fails
# the script (the summary says which parts did not finish).
part() {
  local name=$1; shift
  log "$name: $*"
  if timeout --kill-after=30 "$PART_TIMEOUT" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    tail -n 3 "$OUT_DIR/$name.log" >&2
  else
    local status=$?
    log "$name: exit status $status (timeout $PART_TIMEOUT s?); see $OUT_DIR/$name.log"
    echo "- $name: did not finish (exit status $status)" >> "$OUT_DIR/failed.md"
  fi
}

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
if [[ -z "$PEAK_TFLOPS" ]]; then
  case "$GPU_NAME" in
    *H100*PCIe*) PEAK_TFLOPS=756.5 ;;
    *H100*|*H200*) PEAK_TFLOPS=989.4 ;;
    *A100*) PEAK_TFLOPS=312 ;;
    *) PEAK_TFLOPS=0 ;;
  esac
fi
log "GPU: ${GPU_NAME:-none found}; dense bf16 peak used for MFU: $PEAK_TFLOPS TFLOP/s (--peak-tflops)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PYTHON" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' || true
  "$PYTHON" -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)' || true
} > "$OUT_DIR/environment.txt" 2>&1

IFS=, read -r -a NAMES <<< "$VARIANTS"
for v in "${NAMES[@]}"; do
  # 1 and 2: ours, the backend's default lowering, then both explicit ones.
  for impl in auto native dense; do
    part "nfnet_${v}_${impl}" "$PYTHON" -m nfnet_jax.benchmark --variant "$v" --mode train \
      --batch-per-device 32 --dtype bfloat16 --conv-impl "$impl" --steps "$STEPS" --warmup 10 \
      --csv "$OUT_DIR/nfnet.csv"
  done
  # 3: the peer.
  part "timm_${v}" "$PYTHON" -m nfnet_jax.timm_compare --variant "$v" --batch 32 \
    --steps "$STEPS" --warmup 10 --device cuda --amp bfloat16 --compile
done

# 4: the input pipeline, against the F0 step measured above (the paper's V100 figure if
# that run did not finish).
F0_MS=$("$PYTHON" - "$OUT_DIR/nfnet.csv" <<'EOF' || true
import csv, sys
try:
  rows = [r for r in csv.DictReader(open(sys.argv[1])) if r['variant'].endswith('F0')]
except FileNotFoundError:
  rows = []
print(rows[0]['ms_per_step'] if rows else '')  # the first F0 run: the default lowering
EOF
)
part throughput "$PYTHON" -m nfnet_jax.throughput --variant F0 --images 256 --batches 16 \
  --rounds 3 ${F0_MS:+--step-ms "$F0_MS"}

# The summary: our rows with TFLOP/s and MFU, the peer's lines, the pipeline's.
"$PYTHON" - "$OUT_DIR" "$PEAK_TFLOPS" <<'EOF' > "$SUMMARY"
import csv, glob, os, sys
import nfnet_jax

out, peak = sys.argv[1], float(sys.argv[2])
print(f'# GPU benchmark\n\npeak used for MFU: {peak or "unknown (pass --peak-tflops)"} TFLOP/s '
      'dense bf16 per device; train FLOPs = 3 x 2 x forward MACs (nfnet_jax.count_flops)\n')
print('| variant | px | conv | devices | compile s | ms/step | img/s | TFLOP/s/device | MFU | '
      'XLA peak MiB/device |')
print('|---|---|---|---|---|---|---|---|---|---|')
path = os.path.join(out, 'nfnet.csv')
for r in csv.DictReader(open(path)) if os.path.exists(path) else []:
  macs = nfnet_jax.count_flops(r['variant'].replace('NFNet-', ''), int(r['image_size'])).macs
  tflops = 6 * macs * float(r['images_per_sec']) / int(r['devices']) / 1e12
  mfu = f'{100 * tflops / peak:.1f}%' if peak else 'n/a'
  print(f'| {r["variant"]} | {r["image_size"]} | {r["conv_impl"]} | {r["devices"]} | '
        f'{r["compile_s"]} | {r["ms_per_step"]} | {r["images_per_sec"]} | {tflops:.1f} | '
        f'{mfu} | {r["peak_mib"]} |')
print('\n## timm (peer)\n')
for log in sorted(glob.glob(os.path.join(out, 'timm_*.log'))):
  lines = [l for l in open(log).read().splitlines() if l.startswith('timm ')]
  print(f'- {os.path.basename(log)[:-4]}: {lines[-1] if lines else "no result, see the log"}')
print('\n## input pipeline\n')
log = os.path.join(out, 'throughput.log')
print('```\n' + (open(log).read()[-3000:] if os.path.exists(log) else 'not run') + '\n```')
failed = os.path.join(out, 'failed.md')
if os.path.exists(failed):
  print('\n## did not finish\n\n' + open(failed).read())
EOF
cat "$SUMMARY"
log "Wrote $SUMMARY"
