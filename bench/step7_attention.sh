#!/usr/bin/env bash
# Step 7, the design change after the final comparison (docs/RESULTS.md, "Attention update (step7)"): LoRA adapts
# attention as well as the FFNs; does a language-general attention update beside the routed FFN update
# (method.attention_rank, landermt.routing.AttentionUpdate) close the gap? Chosen on FLORES dev BLEU only
# (test set flores_dev: dev lines 100 on, LIMIT per direction), never devtest.
#
#   bash bench/step7_attention.sh     # resumable: run it again; DEVTEST=0 stops before step 3
#
# 1. bench/step7_final.sh's delta and LoRA rows are evaluated on flores_dev (copies of their runs; training cached).
# 2. Equal training wall time: TIME_STEPS steps of the delta preset with and without the attention update, side by
#    side on this machine, give the ratio; the attention variant then trains STEPS x that ratio steps (same data
#    order) and is evaluated the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
STEPS=${STEPS:-600}
LIMIT=${LIMIT:-50}
RANK=${RANK:-16}
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
plain=$(seconds delta)
with_attention=$(seconds attention --set "method.attention_rank=$RANK")
ATTENTION_STEPS=$(python -c "print(round($STEPS * $plain / $with_attention))")
echo "equal wall time: $TIME_STEPS steps in $plain s (delta) / $with_attention s (+ attention): $ATTENTION_STEPS steps"

share "$FINAL/delta" "$OUT/delta-attention"
python -m training.run --config configs/quick-tuned.yaml --output "$OUT/delta-attention" --resume "${dev[@]}" \
  --set "method.attention_rank=$RANK" --set "train.steps=$ATTENTION_STEPS" --set train.eval_every=100
final_row lora
python bench/results_table.py "$OUT/lora" "$OUT/delta" "$OUT/delta-attention" --testset flores_dev \
  --table flores_dev-step7 --against "$OUT/lora"

# 3. The variant that won on dev goes to the final table (bench/step7_final.sh's devtest sample and baseline).
if [ "${DEVTEST:-1}" = 1 ]; then
  [ -d "$FINAL/delta-attention" ] || cp -r "$OUT/delta-attention" "$FINAL/delta-attention"
  python -m training.run --config "$FINAL/delta-attention/config.yaml" --output "$FINAL/delta-attention" --resume \
    --set "eval.testsets=[flores]" --set "eval.limit=${DEVTEST_LIMIT:-100}" --set eval.batch_size=32
  python bench/results_table.py "$FINAL/delta-attention" --table flores-step7 --against "$FINAL/lora"
fi
