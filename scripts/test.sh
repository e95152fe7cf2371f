#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite, lint included.
source "$(dirname "$0")/env.sh"
ruff check .
python -m pytest "$@"
