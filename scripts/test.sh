#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (what CI runs); then set up
# .venv-vllm (vLLM's CPU build, Ray Serve) and run the vLLM plug-in tests there (tests/vllm).
# Extra arguments go to the first pytest run only, and skip the vLLM part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/vllm "$@"
if [ "$#" -eq 0 ]; then
    bash scripts/test-vllm.sh
fi
