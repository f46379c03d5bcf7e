#!/usr/bin/env bash
# Recall capacity of the retrieved prefix (docs/benchmarks/recall.md, "Capacity"): multi-query
# associative recall (MQAR, the Zoology formulation: a block of single-token key/value pairs,
# later a block of queried keys, each followed by its value) through the real CLI:
#   (a) the recipe's small model pretrained with full attention on MQAR documents of PAIRS pairs;
#   (b) one long-range KV group in the last layer, calibrated on (c)'s documents;
#   (c) continued pretraining with segmented execution from it (S, M, R_TRAIN, TBPTT-1);
#   (d) accuracy and retrieval hit rate on new documents of 4 .. 128 pairs at EVAL_LENGTH tokens,
#       the pairs block at least two segments before the queries, for R in R_EVAL on the same
#       weights; beside them (a) with full attention and (c) with no retrieval.
# The prefix is selected once per segment, by the query of the segment's last token, before
# the queries are read: a block of P pairs fits in R retrieved tokens when 2P <= R.
#
#   examples/recall/capacity.sh             # RUN=runs/recall_capacity
#   QUICK=1 examples/recall/capacity.sh     # tiny sizes: checks the script end to end
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN="${RUN:-runs/recall_capacity}"
# THREADS: CPU threads of every step. The thread count decides the order of float sums: a rerun of
# (a) with the same THREADS gave bitwise the same weights, one with another count other weights
export OMP_NUM_THREADS="${THREADS:-2}"
TOK="${TOK:-data/default/tokenizer.model}"
CORPUS="${CORPUS:-examples/recall/filler.txt}"
EVAL_CORPUS="${EVAL_CORPUS:-examples/recall/filler_long.txt}"
PAIRS="${PAIRS:-16}"; QUERIES="${QUERIES:-8}"   # training documents
S0="${S0:-256}"; S="${S:-128}"; M="${M:-32}"; R_TRAIN="${R_TRAIN:-64}"; T="${T:-512}"
ITERS_A="${ITERS_A:-600}"; ITERS_C="${ITERS_C:-600}"
DOCS_A="${DOCS_A:-6000}"; DOCS="${DOCS:-12000}"; EVAL_DOCS="${EVAL_DOCS:-40}"
EVAL_LENGTH="${EVAL_LENGTH:-2048}"; EVAL_PAIRS="${EVAL_PAIRS:-4 8 16 32 64 128}"; R_EVAL="${R_EVAL:-16 64 256}"
WARMUP="${WARMUP:-30}"
if [[ -n "${QUICK:-}" ]]; then
  S0=128; S=32; M=8; R_TRAIN=16; T=256; ITERS_A=4; ITERS_C=4; DOCS_A=200; DOCS=200; EVAL_DOCS=4
  EVAL_LENGTH=512; EVAL_PAIRS="4 16"; R_EVAL="8 32"; WARMUP=1
fi
[[ -f "$TOK" ]] || python tools/prepare_default_data.py
mkdir -p "$RUN"
MODEL=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 4)
DATA=(--tokenizer-model "$TOK" --tasks mqar --mqar-pairs "$PAIRS" --mqar-queries "$QUERIES" --corpus "$CORPUS")
COMMON=(--lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" --micro-batch-size 32 --global-batch-size 32
        --eval-iters 0 --split 100,0,0 --log-interval 25 --exit-signal-handler)

echo "== (a) full attention over $S0 tokens on MQAR documents of $PAIRS pairs, loss on the values asked"
python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/a" --documents "$DOCS_A" --length "$S0" \
  --segment-length $((S0 / 4)) --min-gap-segments 1 --max-gap-segments 2 --loss-mask --seed 11
python pretrain/pretrain_gpt.py "${MODEL[@]}" "${COMMON[@]}" --data-path "$RUN/a_text_document" \
  --loss-mask-data-path "$RUN/a_loss_mask_document" --tokenizer-model "$TOK" \
  --seq-length "$S0" --segment-length "$S0" --tail-length 0 --retrieval-length 0 --num-long-range-heads 0 \
  --long-range-layers 1 --train-iters "$ITERS_A" --save "$RUN/full" --save-interval "$ITERS_A"

echo "== (b) one long-range head in layer 1, calibrated on (a) with (c)'s documents (scored on their answers)"
python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/c" --documents "$DOCS" --length "$T" \
  --segment-length "$S" --min-gap-segments 2 --max-gap-segments 3 --loss-mask --seed 12
python tools/select_heads.py "$RUN/full" --output "$RUN/plan.json" --budget 1 --long-range-layers 1 \
  --segment-length "$S" --tail-length "$M" --recall-data "$RUN/c" --recall-documents 32

echo "== (c) segmented continued pretraining from (a): S=$S M=$M R=$R_TRAIN, TBPTT-1, $T tokens"
python pretrain/pretrain_gpt.py "${COMMON[@]}" --pretrained-checkpoint "$RUN/full" --data-path "$RUN/c_text_document" \
  --loss-mask-data-path "$RUN/c_loss_mask_document" --seq-length "$T" --segment-length "$S" --tail-length "$M" \
  --retrieval-length "$R_TRAIN" --head-plan-file "$RUN/plan.json" --tbptt-k 1 --lr 1e-3 --min-lr 1e-4 \
  --train-iters "$ITERS_C" --save "$RUN/segmented" --save-interval "$ITERS_C"

echo "== (d) MQAR accuracy vs pairs at $EVAL_LENGTH tokens for R in $R_EVAL"
EVAL=()
for P in $EVAL_PAIRS; do
  python tools/make_recall_data.py "${DATA[@]}" --corpus "$EVAL_CORPUS" --mqar-pairs "$P" --mqar-queries $((P < QUERIES ? P : QUERIES)) \
    --output-prefix "$RUN/eval_p$P" --documents "$EVAL_DOCS" --length "$EVAL_LENGTH" --segment-length "$S" \
    --min-gap-segments 2 --max-gap-segments $(((EVAL_LENGTH - 1) / S - 1)) --seed 13
  EVAL+=(--data "p${P}=$RUN/eval_p$P")
done
MODES=()
for R in $R_EVAL; do MODES+=(--mode "r$R=$S:$M:$R:@$RUN/plan.json"); done
python tools/recall_eval.py --checkpoint segmented="$RUN/segmented" "${EVAL[@]}" "${MODES[@]}" --mode no_retrieval \
  --documents "$EVAL_DOCS" --json "$RUN/capacity.json"
python tools/recall_eval.py --checkpoint full="$RUN/full" "${EVAL[@]}" --mode full --documents "$EVAL_DOCS" \
  --json "$RUN/capacity_full.json"
echo "capacity: $SECONDS s; wrote $RUN/capacity.json, $RUN/capacity_full.json"
echo "table and plot: python examples/recall/report.py --capacity $RUN/capacity.json $RUN/capacity_full.json"
