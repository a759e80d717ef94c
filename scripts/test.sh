#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
