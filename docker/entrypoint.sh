#!/usr/bin/env bash
# Container entry point.
#
#   <image> [pretrain_gpt.py flags]   pretraining: torchrun over this node's GPUs; under Slurm
#                                     (one container per node) a multi-node rendezvous
#   <image> gpu-check [flags]         tools/gpu_check.py
#   <image> python|torchrun|bash ...  that command as is
set -euo pipefail
cd "${MEGASEG_HOME:-/opt/megaseg}"

case "${1:-}" in
  gpu-check) shift; exec python tools/gpu_check.py "$@" ;;
  python|python3|torchrun|bash|sh) exec "$@" ;;
esac

if [[ -z "${NPROC:-}" ]]; then
  NPROC="$(nvidia-smi -L 2>/dev/null | wc -l)"
  [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then
  # One task (container) per node; node 0 hosts the rendezvous.
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    if ! command -v scontrol >/dev/null; then
      echo "multi-node run: set MASTER_ADDR to the first node's hostname (scontrol is not in the container)" >&2
      exit 2
    fi
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
  MASTER_PORT="${MASTER_PORT:-29500}"
  exec torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC" \
      --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
      pretrain/pretrain_gpt.py "$@"
fi
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" pretrain/pretrain_gpt.py "$@"
