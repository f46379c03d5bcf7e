#!/usr/bin/env bash
# The paper's regime at mini scale, through the real CLI (docs/benchmarks/recall.md):
#   (a) a small model pretrained with full attention on documents with a pass key in them,
#       the loss on the answers only (--loss-mask-data-path), until it recalls at its length;
#   (b) one long-range head in layer 1 calibrated on it (tools/select_heads.py), scored on the
#       answers of (c)'s documents;
#   (c) continued pretraining with segmented execution, TBPTT-1, from (a) through
#       --pretrained-checkpoint, at 4 segments;
#   (d) recall accuracy and retrieval hit rate at 1x .. 16x (c)'s training length, for the
#       aligned model and the arms on the same weights (tools/recall_eval.py), including the
#       misaligned arm: (a) run with (c)'s segment settings and head plan;
#   ARMS=1: also the training arms K = 0 (--tbptt-k 0) and M = 0 (--tail-length 0), each
#       trained like (c) (or like (c') with SPLIT) for ITERS_ARMS steps, and evaluated the same way.
#
#   examples/recall/run.sh                  # RUN=runs/recall: training about 37 min on 2 CPU cores, (d) at most 12 more (ARMS=1: + 2 x ITERS_ARMS steps)
#   FULL_LENGTHS="512 1024 2048 4096 8192" examples/recall/run.sh   # full attention at every length, not only the SHORT ones
#   KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json examples/recall/run.sh   # the 2-KV-group run of docs/benchmarks/recall.md
#   LAYERS=3 KV_GROUPS=2 examples/recall/run.sh   # other model shapes (also HEADS, HEAD_DIM): the variants of docs/benchmarks/recall.md
#   SEED_C=7 LR_C=5e-4 MIN_LR_C=5e-5 examples/recall/run.sh   # (c) with another document order or learning rate
#   SEED_A=12 KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json examples/recall/run.sh   # another (a): the base decides
#       whether (c) learns to read the prefix (seed 12: 0.98 at 1x, at most 0.08 beyond; docs/benchmarks/recall.md)
#   SEED_A=12 KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json T=1024 BATCH_C=16 GAP_C_MAX=7 \
#     LENGTHS="1024 2048 4096 8192 16384" SHORT="1024 2048" examples/recall/run.sh   # (c) on 1024-token documents, the
#       needle 2-7 segments back (the same tokens per step): the same base answers 0.73-0.79 at every length, its
#       failures never retrieved (docs/benchmarks/recall.md); (c) takes about 46 min here
#   FREEZE_QK=1 KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json examples/recall/run.sh   # (c) with the retrieval
#       group's query and key projections frozen: the selection drifts all the same (docs/benchmarks/recall.md)
#   SEED_A=12 KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json ITERS_C=600 T2=1024 ITERS_C2=300 \
#     LENGTHS="1024 2048 4096 8192 16384" SHORT="1024 2048" examples/recall/run.sh   # a length curriculum: (c) at 512
#       tokens, then (c2) at 1024 (docs/benchmarks/recall.md); with SPLIT=4 ITERS_SPLIT=300 THREADS=2 the headline
#       model: 0.93-0.97 at 1x-16x, 38.7 min end to end on 2 CPU cores
#   KV_GROUPS=2 PLAN=examples/recall/plan_2_groups.json SPLIT=4 examples/recall/run.sh   # then (c'): (c)'s KV
#       groups split into 4 (tools/split_kv_groups.py), one copy of the retrieval group kept as retrieval, and
#       ITERS_SPLIT more steps of segmented pretraining on new documents; (d) and the arms run on that model
#   QUICK=1 examples/recall/run.sh          # tiny sizes: checks the recipe end to end in a few minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN="${RUN:-runs/recall}"
# THREADS: CPU threads of every step. The thread count decides the order of float sums: a rerun of
# (a) with the same THREADS gave bitwise the same weights, one with another count other weights
export OMP_NUM_THREADS="${THREADS:-2}"
TOK="${TOK:-data/default/tokenizer.model}"
# The haystack: RULER's pass-key filler (repeated sentences), in which no pass key occurs, so
# finding the key is a lookup by content; CORPUS=stdlib plants it in natural text instead.
CORPUS="${CORPUS:-examples/recall/filler.txt}"
EVAL_CORPUS="${EVAL_CORPUS:-examples/recall/filler_long.txt}"   # the same filler, long enough for 16x
DIGITS="${DIGITS:-0}"              # 0: the pass key is one token (a word); N: N digits
S0="${S0:-256}"                    # (a): full attention over S0 tokens
S="${S:-128}"; M="${M:-32}"; R="${R:-64}"   # (c): segments, carried tail, retrieved prefix
T="${T:-512}"                      # (c): training length, 4 segments
ITERS_A="${ITERS_A:-600}"; ITERS_C="${ITERS_C:-1200}"; ITERS_SPLIT="${ITERS_SPLIT:-400}"
LR_C="${LR_C:-1e-3}"; MIN_LR_C="${MIN_LR_C:-1e-4}"   # (c) and the arms: peak and final learning rate
SEED_A="${SEED_A:-1234}"           # (a): the run seed (its initialisation and the order of its documents)
SEED_C="${SEED_C:-1234}"           # (c) and the arms: the run seed (the order of (c)'s documents)
BATCH_C="${BATCH_C:-32}"           # (c), (c') and the arms: documents per step (the same tokens per step at T=1024 with 16)
GAP_C_MIN="${GAP_C_MIN:-2}"; GAP_C_MAX="${GAP_C_MAX:-3}"   # (c), (c'): segment boundaries between needle and question
# FREEZE_QK=1: (c), (c') and the arms keep the retrieval groups' query and key projections at their starting values
# (--freeze-retrieval-qk), so the selection stays the one (a) learned under full attention
FREEZE=(); [[ -n "${FREEZE_QK:-}" ]] && FREEZE=(--freeze-retrieval-qk)
DOCS_A="${DOCS_A:-6000}"; DOCS="${DOCS:-20000}"; EVAL_DOCS="${EVAL_DOCS:-100}"
LENGTHS="${LENGTHS:-512 1024 2048 4096 8192}"
SHORT="${SHORT:-512 1024 2048}"    # StreamingLLM and Duo-style (slow at long lengths; the needle is outside their window anyway)
# full attention on the same weights: its time grows with the square of the length (at 16384 tokens 11 of the 16
# min its rows took on 2 CPU cores at 1x-16x) and it answered 0.00-0.06 from 4x on; FULL_LENGTHS="$LENGTHS" runs it
# at every length. State ratios need no full-attention run: every row counts full attention's state
if [[ -n "${QUICK:-}" ]]; then
  S0=128; S=32; M=8; R=16; T=256; ITERS_A=4; ITERS_C=4; ITERS_C2=3; ITERS_SPLIT=3; ITERS_ARMS=2; DOCS_A=200; DOCS=200
  DOCS_C2=200; EVAL_DOCS=4
  LENGTHS="256 512"; SHORT="256"; WARMUP=1
fi
FULL_LENGTHS="${FULL_LENGTHS:-$SHORT}"
[[ -f "$TOK" ]] || python tools/prepare_default_data.py
mkdir -p "$RUN"
# LAYERS x KV_GROUPS KV groups: the one retrieval group (in layer 1) keeps a pool of every token,
# 1/(LAYERS x KV_GROUPS) of full attention's KV state (plus tails and prefixes); HEADS query heads of
# HEAD_DIM, so each KV group is read by HEADS / KV_GROUPS query heads; PLAN=FILE skips (b) and trains with that plan
LAYERS="${LAYERS:-2}"; KV_GROUPS="${KV_GROUPS:-4}"; HEADS="${HEADS:-4}"; HEAD_DIM="${HEAD_DIM:-32}"
MODEL=(--num-layers "$LAYERS" --hidden-size 128 --num-attention-heads "$HEADS" --num-query-groups "$KV_GROUPS"
       --kv-channels "$HEAD_DIM")
DATA=(--tokenizer-model "$TOK" --tasks passkey --value-digits "$DIGITS" --align-answer --corpus "$CORPUS")
WARMUP="${WARMUP:-30}"
COMMON=(--lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" --micro-batch-size 32 --global-batch-size 32
        --eval-iters 0 --split 100,0,0 --log-interval 25 --exit-signal-handler --long-range-layers 1)

echo "== (a) full attention over $S0 tokens, loss on the answers"
python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/a" --documents "$DOCS_A" --length "$S0" \
  --segment-length $((S0 / 4)) --min-gap-segments 1 --max-gap-segments 2 --loss-mask --seed 1
python pretrain/pretrain_gpt.py "${MODEL[@]}" "${COMMON[@]}" --data-path "$RUN/a_text_document" \
  --loss-mask-data-path "$RUN/a_loss_mask_document" --tokenizer-model "$TOK" \
  --seq-length "$S0" --segment-length "$S0" --tail-length 0 --retrieval-length 0 --num-long-range-heads 0 \
  --train-iters "$ITERS_A" --seed "$SEED_A" --save "$RUN/full" --save-interval "$ITERS_A"

echo "== (b) one long-range head in layer 1, calibrated on (a) with (c)'s documents (scored on their answers)"
python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/c" --documents "$DOCS" --length "$T" \
  --segment-length "$S" --min-gap-segments "$GAP_C_MIN" --max-gap-segments "$GAP_C_MAX" --loss-mask --seed 2
if [[ -n "${PLAN:-}" ]]; then
  cp "$PLAN" "$RUN/plan.json"
else
  python tools/select_heads.py "$RUN/full" --output "$RUN/plan.json" --budget 1 --long-range-layers 1 \
    --segment-length "$S" --tail-length "$M" --recall-data "$RUN/c" --recall-documents 32
fi

echo "== (c) segmented continued pretraining from (a): S=$S M=$M R=$R, TBPTT-1, $T tokens"
segmented() {  # FROM DATA PLAN: the flags of (c), (c') and the arms (the tail and K are added per run)
  SEGMENTED=(--pretrained-checkpoint "$1" --data-path "${2}_text_document" --loss-mask-data-path "${2}_loss_mask_document"
             --seq-length "$T" --segment-length "$S" --retrieval-length "$R" --head-plan-file "$3"
             --lr "$LR_C" --min-lr "$MIN_LR_C" --seed "$SEED_C" --micro-batch-size "$BATCH_C" --global-batch-size "$BATCH_C"
             "${FREEZE[@]}")
}
segmented "$RUN/full" "$RUN/c" "$RUN/plan.json"
python pretrain/pretrain_gpt.py "${COMMON[@]}" "${SEGMENTED[@]}" --tail-length "$M" --tbptt-k 1 \
  --train-iters "$ITERS_C" --save "$RUN/aligned" --save-interval "$ITERS_C"
ALIGNED="$RUN/aligned"; FULL="$RUN/full"; EVAL_PLAN="$RUN/plan.json"; LAST_ITERS="$ITERS_C"
if [[ -n "${T2:-}" ]]; then
  # T2=L: a length curriculum: ITERS_C2 more steps from (c) on L-token documents, the needle 2 to L / S - 1 segment
  # boundaries back, BATCH_C x T / L documents per step (the same tokens), lr LR_C2 -> MIN_LR_C2; L is then the
  # training length of what follows ((c'), the arms, the held-out documents)
  # ((c') then trains on documents of that length and those gaps too, drawn with another seed)
  ITERS_C2="${ITERS_C2:-300}"; BATCH_C=$((BATCH_C * T / T2)); T="$T2"; GAP_C_MIN=2; GAP_C_MAX=$((T / S - 1)); SPLIT_SEED=6
  echo "== (c2) $ITERS_C2 steps from (c) on $T-token documents, $BATCH_C per step"
  python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/c_$T" --documents "${DOCS_C2:-5000}" --length "$T" \
    --segment-length "$S" --min-gap-segments "$GAP_C_MIN" --max-gap-segments "$GAP_C_MAX" --loss-mask --seed 5
  segmented "$RUN/aligned" "$RUN/c_$T" "$RUN/plan.json"
  python pretrain/pretrain_gpt.py "${COMMON[@]}" "${SEGMENTED[@]}" --lr "${LR_C2:-5e-4}" --min-lr "${MIN_LR_C2:-5e-5}" \
    --tail-length "$M" --tbptt-k 1 --train-iters "$ITERS_C2" --save "$RUN/aligned_$T" --save-interval "$ITERS_C2"
  ALIGNED="$RUN/aligned_$T"; LAST_ITERS="$ITERS_C2"
fi
if [[ -n "${SPLIT:-}" ]]; then
  # SPLIT=G: every KV group copied into G / KV_GROUPS groups; only the last copy of the retrieval group keeps its
  # pool (RETRIEVAL_COPIES), or SPLIT_PLAN=FILE gives the whole plan
  echo "== (c') (c) split into $SPLIT KV groups per layer, one retrieval copy: $ITERS_SPLIT steps on new documents"
  if [[ -n "${SPLIT_PLAN:-}" ]]; then PLAN_SPLIT=(--head-plan-file "$SPLIT_PLAN"); else PLAN_SPLIT=(--retrieval-copies "${RETRIEVAL_COPIES:-1}"); fi
  python tools/split_kv_groups.py "$ALIGNED" "$RUN/split" --kv-groups "$SPLIT" "${PLAN_SPLIT[@]}" \
    --plan-output "$RUN/plan_split.json"
  # (a) split the same way (the same function under full attention): the misaligned arm and the baselines
  python tools/split_kv_groups.py "$RUN/full" "$RUN/full_split" --kv-groups "$SPLIT"
  python tools/make_recall_data.py "${DATA[@]}" --output-prefix "$RUN/c2" --documents "${DOCS_SPLIT:-$((ITERS_SPLIT * 32))}" \
    --length "$T" --segment-length "$S" --min-gap-segments "$GAP_C_MIN" --max-gap-segments "$GAP_C_MAX" --loss-mask --seed "${SPLIT_SEED:-5}"
  segmented "$RUN/split" "$RUN/c2" "$RUN/plan_split.json"
  python pretrain/pretrain_gpt.py "${COMMON[@]}" "${SEGMENTED[@]}" --tail-length "$M" --tbptt-k 1 \
    --train-iters "$ITERS_SPLIT" --save "$RUN/aligned_split" --save-interval "$ITERS_SPLIT"
  ALIGNED="$RUN/aligned_split"; FULL="$RUN/full_split"; EVAL_PLAN="$RUN/plan_split.json"; LAST_ITERS="$ITERS_SPLIT"
fi
ITERS_ARMS="${ITERS_ARMS:-$LAST_ITERS}"
CKPTS=(--checkpoint aligned="$ALIGNED")
if [[ -n "${ARMS:-}" ]]; then
  echo "== arms: K = 0 and M = 0, trained like the last step for $ITERS_ARMS steps"
  python pretrain/pretrain_gpt.py "${COMMON[@]}" "${SEGMENTED[@]}" --tail-length "$M" --tbptt-k 0 \
    --train-iters "$ITERS_ARMS" --save "$RUN/k0" --save-interval "$ITERS_ARMS"
  python pretrain/pretrain_gpt.py "${COMMON[@]}" "${SEGMENTED[@]}" --tail-length 0 --tbptt-k 1 \
    --train-iters "$ITERS_ARMS" --save "$RUN/m0" --save-interval "$ITERS_ARMS"
  CKPTS+=(--checkpoint k0="$RUN/k0" --checkpoint m0="$RUN/m0")
fi

echo "== (d) recall at 1x .. 16x the training length: new documents (pass keys of the training split), and"
echo "   held-out pass keys at 1x (one-token values the untied output layer was never trained to emit)"
EVAL=()
for L in $LENGTHS; do
  python tools/make_recall_data.py "${DATA[@]}" --corpus "$EVAL_CORPUS" --output-prefix "$RUN/eval_$L" --documents "$EVAL_DOCS" \
    --length "$L" --segment-length "$S" --min-gap-segments 2 --max-gap-segments $(((L - 1) / S - 1)) --seed 3
  EVAL+=(--data "${L}=$RUN/eval_$L")
done
python tools/make_recall_data.py "${DATA[@]}" --corpus "$EVAL_CORPUS" --output-prefix "$RUN/heldout_$T" --split eval --documents "$EVAL_DOCS" \
  --length "$T" --segment-length "$S" --min-gap-segments 2 --max-gap-segments 3 --seed 4
EVAL+=(--data "heldout${T}=$RUN/heldout_$T")
SHORT_EVAL=()
for L in $SHORT; do SHORT_EVAL+=(--data "${L}=$RUN/eval_$L"); done
FULL_EVAL=()
for L in $FULL_LENGTHS; do FULL_EVAL+=(--data "${L}=$RUN/eval_$L"); done
python tools/recall_eval.py "${CKPTS[@]}" "${EVAL[@]}" \
  --mode own --mode no_retrieval --mode "interleaved=$S:$M:$R:1:1" --documents "$EVAL_DOCS" --json "$RUN/recall.json"
python tools/recall_eval.py --checkpoint full="$FULL" "${EVAL[@]}" --mode "misaligned=$S:$M:$R:@$EVAL_PLAN" \
  --documents "$EVAL_DOCS" --json "$RUN/recall_misaligned.json"
python tools/recall_eval.py --checkpoint aligned="$ALIGNED" --checkpoint full="$FULL" "${FULL_EVAL[@]}" --mode full \
  --documents "$EVAL_DOCS" --json "$RUN/recall_full.json"
python tools/recall_eval.py --checkpoint aligned="$ALIGNED" --checkpoint full="$FULL" "${SHORT_EVAL[@]}" \
  --mode "streaming=4:$((S + M))" --mode "duo=4:$((S + M))" --documents "$EVAL_DOCS" --json "$RUN/recall_baselines.json"
echo "recipe wall time: $SECONDS s"
JSONS="$RUN/recall.json $RUN/recall_misaligned.json $RUN/recall_full.json $RUN/recall_baselines.json"
echo "wrote $JSONS"
echo "table and plot: python examples/recall/report.py $JSONS"
