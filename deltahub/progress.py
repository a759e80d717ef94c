"""Progress bars for long work: shown on a terminal, hidden otherwise or when disabled.

Set ``DELTAHUB_DISABLE_PROGRESS_BARS=1`` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``) to hide them,
huggingface_hub's own bars included (:func:`deltahub.hub.transfer.quiet_hf_progress_bars`).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from deltahub.config import progress_disabled


def progress_bar(total: int | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr that is disabled when stderr is not a terminal or bars are off."""
    disable = progress_disabled() or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False, **kwargs)
