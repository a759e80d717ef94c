#!/usr/bin/env bash
# Set up .venv-vllm (scripts/setup-vllm.sh) and run the vLLM and Ray Serve tests (tests/vllm) there.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-vllm.sh
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm "$@"
