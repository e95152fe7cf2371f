#!/usr/bin/env bash
# Set up .venv, convert the default model (first run only), detect + score + partition on the
# shared data, and show the resulting artifact with its plots.
source "$(dirname "$0")/env.sh"
ARTIFACT=${LANDERMT_ARTIFACT:-artifacts/gemma3-270m-base}
if [ ! -f "$ARTIFACT/manifest.json" ]; then
  python -m landermt.build --output "$ARTIFACT" "$@"
fi
python -m landermt.inspect "$ARTIFACT" --plot "$ARTIFACT/plots"
