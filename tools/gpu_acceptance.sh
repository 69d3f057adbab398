#!/usr/bin/env bash
# GPU acceptance run: everything a first device must show, in one call, every report written into OUT_DIR.
#
#   tools/gpu_acceptance.sh OUT_DIR            # on one H100/H200: about 8 minutes
#   tools/gpu_acceptance.sh --dry-run OUT_DIR  # the same flow on the CPU with tiny sizes (CI runs it)
#
# Steps (each writes OUT_DIR/<step>.log and, where the command has one, a JSON report):
#   1. gpu-test       make gpu-test (pytest -m gpu tests/gpu); skipped in --dry-run (no CUDA: all would skip)
#   2. step           bench step, BT-R50 (ours / reference / floor), then train.compile=true; the DBN step with
#                     whitening=eigh (one host sync per view) against newton_schulz (none): the cost of that sync
#   3. shards         real-size (~500x375, ~110 kB) JPEG shards written here, on the device's machine
#   4. data           bench data in every mode (GPU decode included when CUDA is there)
#   5. e2e-gpu/-cpu   bench e2e on those shards with data.decode=gpu and with the CPU path
#   6. syncs          bench syncs: host syncs per step for every method, synthetic and data.decode=gpu
# A failing step is recorded in OUT_DIR/summary.txt and the run goes on; the exit status is 1 if any failed.
# Environment: PYTHON (default: python), LARGESSL_GPU_TEST_CMD (default: make gpu-test).
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUT_DIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT" || { echo "cannot create OUT_DIR $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

if [ $DRY = 1 ]; then
  # tiny sizes: the same commands, a few seconds each on a CPU
  STEP_ARGS=(--per-rank-batch-size 4 --steps 1 --warmup 1 --no-loss-timing model.arch=resnet18
             model.small_input=true method.projector=32-32 data.image_size=16 train.device=cpu)
  COMPILE=()
  IMAGES=16; DATA_ARGS=(--images 16 --batch-size 4 --image-size 32 --rounds 1)
  E2E_ARGS=(--per-rank-batch-size 4 --steps 1 --warmup 1 --no-step model.arch=resnet18 model.small_input=true
            method.projector=32-32 data.image_size=32 data.num_workers=0 train.device=cpu)
  SYNC_ARGS=(--methods barlow_twins,decorrelation --batch-size 4 --steps 1 model.arch=resnet18
             model.small_input=true method.projector=32-32 data.image_size=16 train.device=cpu)
  SYNC_DATA_ARGS=(--methods barlow_twins --batch-size 4 --steps 1 model.arch=resnet18 model.small_input=true
                  method.projector=32-32 data.image_size=32 data.num_workers=0 train.device=cpu)
else
  STEP_ARGS=(--per-rank-batch-size 256 --steps 30 --warmup 10)
  COMPILE=(train.compile=true)
  IMAGES=2048; DATA_ARGS=(--images 1024 --batch-size 64 --image-size 224 --workers 8 --rounds 3)
  E2E_ARGS=(--per-rank-batch-size 256 --steps 40 --warmup 10 data.num_workers=12)
  SYNC_ARGS=(train.device=cuda)
  SYNC_DATA_ARGS=(--methods barlow_twins,decorrelation --batch-size 64 train.device=cuda data.num_workers=4)
fi

run() {  # run NAME CMD...: log to OUT/NAME.log, record ok/FAILED with the time taken
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else
    echo "   FAILED with status $? ($((SECONDS - t0)) s); see $name.log" | tee -a "$SUMMARY"
    FAILED=1
  fi
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no device')" > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" >> "$SUMMARY"

if [ $DRY = 1 ]; then
  echo "== gpu-test: skipped in --dry-run (without CUDA every GPU test skips)" | tee -a "$SUMMARY"
else
  # shellcheck disable=SC2086
  run gpu-test ${LARGESSL_GPU_TEST_CMD:-make gpu-test}
fi

run step "$PY" -m largessl bench step "${STEP_ARGS[@]}" --json "$OUT/step-bt-r50.json"
if [ ${#COMPILE[@]} -gt 0 ]; then
  run step-compile "$PY" -m largessl bench step "${STEP_ARGS[@]}" --warmup 15 "${COMPILE[@]}" \
    --json "$OUT/step-bt-r50-compile.json"
fi

# the one sync left in a step: DBN's linalg.eigh (one per view); Newton-Schulz whitening has none
for whitening in eigh newton_schulz; do
  run "step-dbn-$whitening" "$PY" -m largessl bench step "${STEP_ARGS[@]}" --variants ours method.name=decorrelation \
    "method.whitening=$whitening" --json "$OUT/step-dbn-$whitening.json"
done

SHARDS="$OUT/shards"
run shards "$PY" -c "
import sys, tempfile
from pathlib import Path
from largessl.bench.data import make_imagenet_like
from largessl.data.writer import write_source
with tempfile.TemporaryDirectory() as tmp:
    stats = make_imagenet_like(Path(tmp) / 'folder', $IMAGES)
    print(stats)
    print(write_source(str(Path(tmp) / 'folder'), sys.argv[1], shard_bytes=64 << 20, workers=2, progress=False))
" "$SHARDS"
MANIFEST="$SHARDS/manifest.json"

run data "$PY" -m largessl bench data "${DATA_ARGS[@]}" --workdir "$OUT" --json "$OUT/data.json"

run e2e-gpu "$PY" -m largessl bench e2e --data "$MANIFEST" "${E2E_ARGS[@]}" data.decode=gpu --json "$OUT/e2e-gpu.json"
run e2e-cpu "$PY" -m largessl bench e2e --data "$MANIFEST" "${E2E_ARGS[@]}" data.decode=cpu --json "$OUT/e2e-cpu.json"

run syncs "$PY" -m largessl bench syncs "${SYNC_ARGS[@]}" --json "$OUT/syncs.json"
run syncs-decode-gpu "$PY" -m largessl bench syncs --data "$MANIFEST" "${SYNC_DATA_ARGS[@]}" data.decode=gpu \
  --json "$OUT/syncs-decode-gpu.json"

echo "reports in $OUT" | tee -a "$SUMMARY"
exit $FAILED
