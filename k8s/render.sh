#!/usr/bin/env bash
# Regenerates k8s/base from the renderer: Barlow Twins ResNet-50 on ImageNet (the defaults are the paper's
# recipe: LARS, global batch 2048, 100 epochs), 4 nodes x 8 GPUs, run directory on the PVC `largessl-runs`,
# shards on S3. tests/unit/test_launch_k8s.py checks that k8s/base is exactly this command's output.
set -euo pipefail
cd "$(dirname "$0")/.."
largessl launch k8s --nodes 4 --gpus-per-node 8 --image ghcr.io/largessl/largessl:0.1.0 \
  --name largessl-imagenet --pvc largessl-runs --cpu 64 --memory 480Gi --out k8s/base \
  train.run_dir=imagenet-bt-r50 data.train_manifest=s3://largessl/imagenet/train/manifest.json \
  data.val_manifest=s3://largessl/imagenet/val/manifest.json 'stages=[linear,knn]'
