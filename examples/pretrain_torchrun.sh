#!/usr/bin/env bash
# Data-, tensor-, pipeline- and context-parallel pretraining on one machine with torchrun.
#   NPROC=2 examples/pretrain_torchrun.sh                         # 2 ranks, default run (gloo on CPU)
#   NPROC=8 examples/pretrain_torchrun.sh --config examples/llama2_7b_paper.yaml
#   NPROC=4 examples/pretrain_torchrun.sh --use-distributed-optimizer   # Adam state sharded over 4 DP ranks
#   NPROC=4 examples/pretrain_torchrun.sh --context-parallel-size 2     # each sequence's segments split over 2 ranks, DP 2
#   NPROC=4 examples/pretrain_torchrun.sh --pipeline-model-parallel-size 2 --tensor-model-parallel-size 2
#                                          # 2 pipeline stages x 2 TP ranks (DP = NPROC / (TP x PP))
# Extra arguments are passed to pretrain/pretrain_gpt.py and override the config.
#
# Preemption: SIGTERM or SIGUSR1 to this script reach every rank as SIGUSR1 (torchrun itself
# is left alone: it would turn them into a SignalException), every rank saves at the same
# step boundary, and the script exits 0 with one line saying how to resume: the same
# command, which resumes from --save.
set -uo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-examples/default.yaml}"
# TORCHRUN_ARGS: torchrun's rendezvous for several nodes (examples/pretrain_slurm.sbatch sets it).
# shellcheck disable=SC2086
torchrun ${TORCHRUN_ARGS:---standalone --nnodes 1} --nproc-per-node "$NPROC" \
    pretrain/pretrain_gpt.py --config "$CONFIG" "$@" &
launcher=$!
signalled=""
forward() {
    signalled="$1"
    pkill -USR1 -P "$launcher" 2>/dev/null || true  # the ranks are torchrun's children
}
trap 'forward SIGTERM' TERM
trap 'forward SIGUSR1' USR1
status=0
while true; do
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
if [ -z "$signalled" ] && [ "$status" -ne 0 ]; then
    echo "pretrain_torchrun.sh: the run failed (status $status; torchrun's report above names the failed rank); the same command resumes from the last complete checkpoint" >&2
fi
if [ -n "$signalled" ]; then
    if [ "$status" -eq 0 ]; then
        echo "pretrain_torchrun.sh: $signalled: every rank saved a checkpoint at the same step; resume with the same command" >&2
    else
        echo "pretrain_torchrun.sh: $signalled: the run exited with status $status while stopping" >&2
    fi
fi
exit "$status"
