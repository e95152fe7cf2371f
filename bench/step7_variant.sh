#!/usr/bin/env bash
# Step 7 design variants of the delta preset against LoRA after the final comparison (docs/RESULTS.md, Step 7
# findings), chosen on FLORES dev BLEU only (test set flores_dev: dev lines 100 on, LIMIT per direction), never
# devtest:
#
#   bash bench/step7_variant.sh delta-attention --set method.attention_rank=16   # an attention update too
#   bash bench/step7_variant.sh delta-factors --set method.train_factors=true    # trained group factors
#   TIMED=0 bash bench/step7_variant.sh delta-lr2e-4 --set train.lr=2e-4         # same work per step: STEPS steps
#   (resumable: run it again; DEVTEST=1 also evaluates the variant on devtest, for the one that won on dev)
#
# 1. bench/step7_final.sh's delta and LoRA rows are evaluated on flores_dev (copies of their runs; training cached).
# 2. Equal training wall time: TIME_STEPS steps of the delta preset with and without the variant's settings, side by
#    side on this machine, give the ratio; the variant then trains STEPS x that ratio steps (same data order) and
#    is evaluated the same way. Every variant run so far is in the dev table.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
NAME=$1
shift
STEPS=${STEPS:-600}
LIMIT=${LIMIT:-50}
TIME_STEPS=${TIME_STEPS:-30}
FINAL=${FINAL:-runs/step7-final}
OUT=${OUT:-runs/step7-dev}
dev=(--set "eval.testsets=[flores_dev]" --set "eval.limit=$LIMIT" --set eval.batch_size=32)
share() { python -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from transfer import \
share_partition; share_partition(Path('$1'), Path('$2'))"; }

final_row() {
  [ -d "$OUT/$1" ] || cp -r "$FINAL/$1" "$OUT/$1"
  python -m training.run --config "$OUT/$1/config.yaml" --output "$OUT/$1" --resume "${dev[@]}"
}
final_row delta

seconds() {  # wall time of steps 6..TIME_STEPS of a short run (the first steps warm up)
  share "$FINAL/delta" "$OUT/time-$1"
  python -m training.run --config configs/quick-tuned.yaml --output "$OUT/time-$1" --resume --skip-eval \
    --set "train.steps=$TIME_STEPS" --set train.eval_every=1000 "${@:2}" >&2
  python -c "import json; log = [json.loads(l) for l in open('$OUT/time-$1/train_log.jsonl')]; \
print(log[-1]['seconds'] - log[4]['seconds'])"
}
if [ "${TIMED:-1}" = 1 ]; then
  plain=$(seconds "delta-beside-$NAME")
  variant=$(seconds "$NAME" "$@")
  VARIANT_STEPS=$(python -c "print(round($STEPS * $plain / $variant))")
  echo "equal wall time: $TIME_STEPS steps in $plain s (delta) / $variant s ($NAME): $VARIANT_STEPS steps"
else  # TIMED=0: the variant does the same work per step (a learning rate, say): timing it would only add noise
  VARIANT_STEPS=$STEPS
fi

share "$FINAL/delta" "$OUT/$NAME"
python -m training.run --config configs/quick-tuned.yaml --output "$OUT/$NAME" --resume "${dev[@]}" "$@" \
  --set "train.steps=$VARIANT_STEPS" --set train.eval_every=100
final_row lora
python bench/results_table.py "$OUT/lora" "$OUT/delta" "$OUT"/delta-* --testset flores_dev \
  --table flores_dev-step7 --against "$OUT/lora"

# 3. A variant that won on dev goes to the final table (bench/step7_final.sh's devtest sample and baselines).
if [ "${DEVTEST:-0}" = 1 ]; then
  [ -d "$FINAL/$NAME" ] || cp -r "$OUT/$NAME" "$FINAL/$NAME"
  python -m training.run --config "$FINAL/$NAME/config.yaml" --output "$FINAL/$NAME" --resume \
    --set "eval.testsets=[flores]" --set "eval.limit=${DEVTEST_LIMIT:-200}" --set eval.batch_size=32
  python bench/results_table.py "$FINAL/$NAME" --table flores-step7 --against "$FINAL/lora"
fi
