"""deltahub: one shared base model plus 1-bit deltas for every fine-tune.

See :mod:`deltahub.api` for the Python API and ``deltahub --help`` for the command line.
"""

from __future__ import annotations

__version__ = "0.1.0"

from deltahub.api import Store, load_model, load_tokenizer  # noqa: E402
from deltahub.errors import DeltaHubError  # noqa: E402

__all__ = ["DeltaHubError", "Store", "__version__", "load_model", "load_tokenizer"]
