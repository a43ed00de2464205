"""Every environment variable headrace reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """HEADRACE_CACHE_DIR: where converted tokenizers are kept (default ~/.cache/headrace)."""
    return Path(os.environ.get("HEADRACE_CACHE_DIR") or Path.home() / ".cache" / "headrace")
