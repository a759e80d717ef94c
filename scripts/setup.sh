#!/usr/bin/env bash
# Create .venv (if missing) and install deltahub with the given extras, e.g. `scripts/setup.sh test`.
# torch is pinned to 2.13.0 first: that pin is a local CPU wheel here; an unpinned torch would pull
# several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv" >&2
    python3 -m venv .venv
fi
. .venv/bin/activate
echo "== installing torch==2.13.0 (CPU)" >&2
python -m pip install -q "torch==2.13.0"
echo "== installing deltahub[$extras]" >&2
python -m pip install -q -e ".[$extras]"
