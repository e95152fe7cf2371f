#!/usr/bin/env bash
# Set up .venv, convert the default model (first run only) and start the translation server on
# http://127.0.0.1:8000. With LANDERMT_ARTIFACT=DIR (or --artifact DIR) it serves that artifact's
# routed language pairs; without one, the base model with few-shot prompts. Flags pass through.
source "$(dirname "$0")/env.sh"
exec python -m server "$@"
