#!/usr/bin/env bash
# Barlow Twins ResNet-50 on ImageNet on Kubernetes: an Indexed Job of 4 pods x 8 GPUs behind a headless
# Service, then the evaluation stages as follow-up Jobs once pretraining completed.
#
#   kubectl create secret generic largessl-s3 --from-literal=AWS_ACCESS_KEY_ID=... \
#       --from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_ENDPOINT_URL=https://...]
#   IMAGE=registry.example.com/largessl:0.1.0 PVC=largessl-runs launchers/k8s_imagenet.sh
#   RENDER_ONLY=1 launchers/k8s_imagenet.sh           # write the manifests to $OUT and stop
#
# Pods that are preempted or evicted are replaced without counting against backoffLimit and resume from
# the run directory on the PVC; bug exit codes (1, 2, 4) fail the Job at once.
set -euo pipefail

IMAGE="${IMAGE:?set IMAGE to the largessl image (see docker/README.md)}"
NAMESPACE="${NAMESPACE:-default}"
NAME="${NAME:-largessl-imagenet}"
OUT="${OUT:-k8s-out/$NAME}"

largessl launch k8s --nodes "${NODES:-4}" --gpus-per-node "${GPUS_PER_NODE:-8}" --image "$IMAGE" \
  --namespace "$NAMESPACE" --name "$NAME" --pvc "${PVC:-largessl-runs}" --cpu "${CPU:-64}" \
  --memory "${MEMORY:-480Gi}" --out "$OUT" \
  train.run_dir=imagenet-bt-r50 \
  data.train_manifest="${TRAIN:-s3://largessl/imagenet/train/manifest.json}" \
  data.val_manifest="${VAL:-s3://largessl/imagenet/val/manifest.json}" 'stages=[linear,knn]' "$@"
[[ -n "${RENDER_ONLY:-}" ]] && exit 0

kubectl apply -f "$OUT/pretrain.yaml"
echo "following job/$NAME (Ctrl-C stops following, not the job)"
kubectl -n "$NAMESPACE" wait --for=condition=complete "job/$NAME" --timeout=-1s
kubectl apply -f "$OUT/stages.yaml"
