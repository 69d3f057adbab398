#!/usr/bin/env bash
# Barlow Twins ResNet-50 on ImageNet on Kubernetes: an Indexed Job of 4 pods x 8 GPUs behind a headless
# Service, then the evaluation stages as follow-up Jobs once pretraining completed.
#
#   kubectl create secret generic largessl-s3 --from-literal=AWS_ACCESS_KEY_ID=... \
#       --from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_ENDPOINT_URL=https://...]
#   IMAGE=registry.example.com/largessl:0.1.0 PVC=largessl-runs launchers/k8s_imagenet.sh
#   RENDER_ONLY=1 launchers/k8s_imagenet.sh           # write the manifests to $OUT and stop
#   OFFLINE=1 ...                                     # skip the data/storage checks (unreachable from here)
#
# The recipe is the paper's, named explicitly (configs/barlow_twins_r50_in1k.yaml: global BN, 1000 epochs, and
# Barlow Twins' linear protocol for the stages). `largessl launch k8s` checks at render time what can fail
# before the queue (batch vs 32 ranks, manifests, the stages' val set, object-storage write access) and exits 2.
# Exit codes: each pod runs `largessl launch node` (not torchrun), which keeps the ranks' codes, so the Job's
# podFailurePolicy sees 75 (ignored: requeue) apart from 1/2/4/5 (fail the Job).
#
# Pods that are preempted or evicted, and ranks that saved and exited 75, are replaced without counting
# against backoffLimit and resume from the run directory on the PVC (with NODES > 1 it must be
# ReadWriteMany; else add checkpoint.dir=s3://... as an extra argument); bug exit codes (1, 2, 4, 5) fail the
# Job at once. The script follows the Job until it completes (then applies the evaluation stages, exit 0),
# fails (exit 1, with the Job's reason) or WAIT_TIMEOUT_S passes (exit 124; the Job keeps running).
set -euo pipefail

IMAGE="${IMAGE:?set IMAGE to the largessl image (see docker/README.md)}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-$HERE/configs/barlow_twins_r50_in1k.yaml}"   # the paper's recipe
offline=()
[[ -n "${OFFLINE:-}" ]] && offline=(--offline)
NAMESPACE="${NAMESPACE:-default}"
NAME="${NAME:-largessl-imagenet}"
OUT="${OUT:-k8s-out/$NAME}"

largessl launch k8s --config "$CONFIG" ${offline[@]+"${offline[@]}"} --nodes "${NODES:-4}" --gpus-per-node "${GPUS_PER_NODE:-8}" \
  --image "$IMAGE" --namespace "$NAMESPACE" --name "$NAME" --pvc "${PVC:-largessl-runs}" --cpu "${CPU:-64}" \
  --memory "${MEMORY:-480Gi}" --out "$OUT" \
  train.run_dir=imagenet-bt-r50 \
  data.train_manifest="${TRAIN:-s3://largessl/imagenet/train/manifest.json}" \
  data.val_manifest="${VAL:-s3://largessl/imagenet/val/manifest.json}" 'stages=[linear,knn]' "$@"
[[ -n "${RENDER_ONLY:-}" ]] && exit 0

WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-604800}"  # 7 days: the paper's 1000 epochs took 124 h on 32 V100s (seed 002 §3)
POLL_S="${POLL_S:-60}"

# The Job's terminal condition (Complete or Failed), or nothing while it runs.
job_state() {
  local conditions
  conditions="$(kubectl -n "$NAMESPACE" get "job/$NAME" \
    -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{"\n"}{end}')" || return 1
  grep -xE 'Complete|Failed' <<<"$conditions" || true
}

kubectl apply -f "$OUT/pretrain.yaml"
echo "following job/$NAME for at most ${WAIT_TIMEOUT_S}s (Ctrl-C stops following, not the job)"
deadline=$(( $(date +%s) + WAIT_TIMEOUT_S ))
api_errors=0
while :; do
  if ! state="$(job_state)"; then
    api_errors=$((api_errors + 1))
    if (( api_errors >= 5 )); then
      echo "k8s_imagenet: cannot read job/$NAME from the API server ($api_errors attempts)" >&2
      exit 3
    fi
    state=""
  else
    api_errors=0
  fi
  case "$state" in
    *Complete*)
      echo "job/$NAME completed; applying the evaluation stages"
      kubectl apply -f "$OUT/stages.yaml"
      exit 0 ;;
    *Failed*)
      why="$(kubectl -n "$NAMESPACE" get "job/$NAME" \
        -o jsonpath='{.status.conditions[?(@.type=="Failed")].reason}: {.status.conditions[?(@.type=="Failed")].message}' || true)"
      echo "k8s_imagenet: job/$NAME failed (${why:-no reason given}); see kubectl -n $NAMESPACE describe job/$NAME" >&2
      exit 1 ;;
  esac
  if (( $(date +%s) >= deadline )); then
    echo "k8s_imagenet: job/$NAME did not finish within ${WAIT_TIMEOUT_S}s; it keeps running" \
         "(kubectl -n $NAMESPACE get job/$NAME; rerun with a larger WAIT_TIMEOUT_S to keep following)" >&2
    exit 124
  fi
  sleep "$POLL_S"
done
