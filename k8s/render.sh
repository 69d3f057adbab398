#!/usr/bin/env bash
# Regenerates k8s/base from the renderer: Barlow Twins ResNet-50 on ImageNet with the paper's recipe, named
# explicitly (configs/barlow_twins_r50_in1k.yaml: LARS, global batch 2048, global BN, 1000 epochs, and Barlow
# Twins' linear protocol for the stages), 4 nodes x 8 GPUs, run directory on the PVC `largessl-runs`, shards on
# S3. --offline: the committed manifests are rendered without reaching the bucket (`largessl launch k8s` checks
# the manifests and storage when it is run for real). tests/unit/test_launch_k8s.py checks that k8s/base is exactly
# this command's output.
set -euo pipefail
cd "$(dirname "$0")/.."
largessl launch k8s --config configs/barlow_twins_r50_in1k.yaml --offline --nodes 4 --gpus-per-node 8 \
  --image ghcr.io/largessl/largessl:0.1.0 --name largessl-imagenet --pvc largessl-runs --cpu 64 --memory 480Gi \
  --out k8s/base train.run_dir=imagenet-bt-r50 data.train_manifest=s3://largessl/imagenet/train/manifest.json \
  data.val_manifest=s3://largessl/imagenet/val/manifest.json 'stages=[linear,knn]'
