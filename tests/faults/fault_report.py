"""Figures of a fault-injection run, for docs/reliability.md and the closing note.

Every test in ``tests/faults`` that counts something (kills, survivors, operations, inputs tried and
rejected) calls :func:`record`. When ``DELTAHUB_FAULTS_REPORT`` names a file, one JSON line per call
is appended to it; otherwise the figures only go to the test's log (``pytest -s`` shows them).

    DELTAHUB_FAULTS_REPORT=/tmp/faults.jsonl python -m pytest tests/faults -q
    python tests/faults/fault_report.py /tmp/faults.jsonl     # a summary table
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV = "DELTAHUB_FAULTS_REPORT"


def record(section: str, **figures: Any) -> None:
    """Record ``figures`` (JSON-serializable) under ``section`` (e.g. ``"kills/add"``)."""
    line = {"section": section, "time": round(time.time(), 3), **figures}
    print(f"[faults] {json.dumps(line, sort_keys=True, default=str)}", file=sys.stderr)
    target = os.environ.get(ENV)
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True, default=str) + "\n")


def summarize(path: Path) -> str:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows:
        figures = ", ".join(f"{k}={v}" for k, v in sorted(row.items()) if k not in ("section", "time"))
        out.append(f"{row['section']:<32} {figures}")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
