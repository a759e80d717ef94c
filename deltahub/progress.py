"""Progress bars for long work: shown on a terminal, hidden otherwise or when disabled.

Set ``DELTAHUB_DISABLE_PROGRESS_BARS=1`` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``) to hide them,
huggingface_hub's own bars included (:func:`quiet_hf_progress_bars`).
"""

from __future__ import annotations

import sys
import warnings

from tqdm.auto import tqdm

from deltahub.config import progress_disabled


def quiet_hf_progress_bars() -> None:
    """Apply ``DELTAHUB_DISABLE_PROGRESS_BARS`` to huggingface_hub's own bars (downloads, uploads,
    Xet) too. huggingface_hub reads ``HF_HUB_DISABLE_PROGRESS_BARS`` once, at import; this turns its
    bars off at run time. Bars are never turned back on: that is the user's HF setting."""
    if not progress_disabled():
        return
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return
    if not are_progress_bars_disabled():
        with warnings.catch_warnings():  # an explicit HF_HUB_DISABLE_PROGRESS_BARS=0 wins, quietly
            warnings.simplefilter("ignore")
            disable_progress_bars()


def progress_bar(total: int | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr that is disabled when stderr is not a terminal or bars are off."""
    disable = progress_disabled() or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False, **kwargs)
