#!/usr/bin/env bash
# Set up .venv, convert the default model (first run only) and start the translation server on
# http://127.0.0.1:8000 with a trained quick-preset artifact. With no artifact trained from the preset's current
# settings, it trains one first (configs/quick-tuned.yaml; about 12 minutes on this project's 2-core CPU, progress
# shown; interrupted training resumes on the next start); otherwise every stage is cached and the check takes
# seconds (training/run.py compares each stage's fingerprint). LANDERMT_ARTIFACT=DIR serves another artifact;
# LANDERMT_ARTIFACT=none the plain base model with few-shot prompts. Flags pass through to the server.
source "$(dirname "$0")/env.sh"
if [ -z "${LANDERMT_ARTIFACT:-}" ]; then
  run=runs/quick-tuned-landermt
  python -m training.run --config configs/quick-tuned.yaml --output "$run" --resume --skip-eval
  export LANDERMT_ARTIFACT="$run/artifact"
elif [ "$LANDERMT_ARTIFACT" = none ]; then
  unset LANDERMT_ARTIFACT
fi
exec python -m server "$@"
