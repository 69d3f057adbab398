#!/usr/bin/env bash
# Barlow Twins ResNet-50 on ImageNet on SLURM: 4 nodes x 8 GPUs, requeued on preemption/time-out and resumed
# from the last checkpoint in the run directory. Run it on a login node with largessl installed:
#
#   launchers/slurm_imagenet.sh                      # submit
#   DRY_RUN=1 launchers/slurm_imagenet.sh            # print the sbatch script only
#   NODES=2 PARTITION=gpu ACCOUNT=myproj launchers/slurm_imagenet.sh optim.base_lr=0.3   # extra overrides
#   OFFLINE=1 DRY_RUN=1 launchers/slurm_imagenet.sh  # skip the data/storage checks (this machine cannot reach them)
#
# The recipe is the paper's, named explicitly: configs/barlow_twins_r50_in1k.yaml (global BN, 1000 epochs, LARS,
# and Barlow Twins' own linear protocol for the stages). Before submitting, `largessl launch slurm` checks what
# can fail before the queue (the batch against the 32 tasks, the manifests and their shards, the val set of the
# stages, write access to the run directory) and exits 2 naming each problem.
# The run directory must be on a filesystem every node sees. Downstream stages (stages=[linear,knn]) are
# submitted as afterok jobs. Follow with: tail -f "$RUN_DIR/slurm/<job id>/<job id>_0_log.err"
#
# Exit codes: every SLURM task is one rank running the trainer in-process (submitit), no torchrun, so a task's
# code is the trainer's: 75 requeues the job itself (scontrol requeue), 1/2/4/5 end it (docs/operations.md).
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-$HERE/configs/barlow_twins_r50_in1k.yaml}"   # the paper's recipe
RUN_DIR="${RUN_DIR:-$PWD/runs/imagenet-bt-r50}"
TRAIN="${TRAIN:-s3://largessl/imagenet/train/manifest.json}"   # `largessl shards` writes these manifests
VAL="${VAL:-s3://largessl/imagenet/val/manifest.json}"

args=(--nodes "${NODES:-4}" --gpus-per-node "${GPUS_PER_NODE:-8}" --cpus-per-task "${CPUS_PER_TASK:-10}"
      --mem-gb "${MEM_GB:-480}" --time "${TIME:-24:00:00}")
args+=(--config "$CONFIG")
[[ -n "${PARTITION:-}" ]] && args+=(--partition "$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && args+=(--account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && args+=(--qos "$QOS")
[[ -n "${DRY_RUN:-}" ]] && args+=(--dry-run)
[[ -n "${OFFLINE:-}" ]] && args+=(--offline)

exec largessl launch slurm "${args[@]}" \
  train.run_dir="$RUN_DIR" data.train_manifest="$TRAIN" data.val_manifest="$VAL" 'stages=[linear,knn]' "$@"
