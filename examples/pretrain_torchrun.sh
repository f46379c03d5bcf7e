#!/usr/bin/env bash
# Data-, tensor-, pipeline- and context-parallel pretraining on one machine with torchrun.
#   NPROC=2 examples/pretrain_torchrun.sh                         # 2 ranks, default run (gloo on CPU)
#   NPROC=8 examples/pretrain_torchrun.sh --config examples/llama2_7b_paper.yaml
#   NPROC=4 examples/pretrain_torchrun.sh --use-distributed-optimizer   # Adam state sharded over 4 DP ranks
#   NPROC=4 examples/pretrain_torchrun.sh --context-parallel-size 2     # each sequence's segments split over 2 ranks, DP 2
#   NPROC=4 examples/pretrain_torchrun.sh --pipeline-model-parallel-size 2 --tensor-model-parallel-size 2
#                                          # 2 pipeline stages x 2 TP ranks (DP = NPROC / (TP x PP))
# Extra arguments are passed to pretrain/pretrain_gpt.py and override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-examples/default.yaml}"
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    pretrain/pretrain_gpt.py --config "$CONFIG" "$@"
