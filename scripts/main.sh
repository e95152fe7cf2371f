#!/usr/bin/env bash
# Set up .venv, convert the default model (first run only) and start the translation server on
# http://127.0.0.1:8000 with a trained quick-preset artifact. With no artifact cached, it trains one
# first (configs/quick-tuned.yaml; about 12 minutes on this project's 2-core CPU, progress shown; interrupted
# training resumes on the next start). LANDERMT_ARTIFACT=DIR serves another artifact;
# LANDERMT_ARTIFACT=none the plain base model with few-shot prompts. Flags pass through to the server.
source "$(dirname "$0")/env.sh"
if [ -z "${LANDERMT_ARTIFACT:-}" ]; then
  run=runs/quick-tuned-landermt
  # a trained artifact has its weights: update.safetensors (routing delta, the default) or ffn.safetensors (mask)
  if [ ! -f "$run/artifact/update.safetensors" ] && [ ! -f "$run/artifact/ffn.safetensors" ]; then
    echo "no trained artifact in $run: training the quick preset first" >&2
    python -m training.run --config configs/quick-tuned.yaml --output "$run" --resume --skip-eval
  fi
  export LANDERMT_ARTIFACT="$run/artifact"
elif [ "$LANDERMT_ARTIFACT" = none ]; then
  unset LANDERMT_ARTIFACT
fi
exec python -m server "$@"
