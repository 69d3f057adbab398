#!/usr/bin/env bash
# Container entrypoint: cheap environment checks, then exec largessl so it is PID 1 and receives SIGTERM
# from Kubernetes/Docker directly (the trainer saves a checkpoint at the next step and exits 75).
set -euo pipefail

min_shm_mb="${LARGESSL_MIN_SHM_MB:-1024}"
shm_kb="$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 }' || true)"
if [[ -n "${shm_kb}" && "${shm_kb}" -lt $((min_shm_mb * 1024)) ]]; then
  echo "largessl-entrypoint: warning: /dev/shm has $((shm_kb / 1024)) MiB (< ${min_shm_mb} MiB); DataLoader" \
       "workers pass batches through it: use docker run --shm-size=16g or a memory emptyDir" >&2
fi

exec "${LARGESSL_BIN:-largessl}" "$@"
