"""Where edit-jax keeps what it works out once per machine (trained BPE tokenizers, the XLA
flags this jaxlib accepts): $EDIT_JAX_CACHE, else ~/.cache/edit-jax."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("EDIT_JAX_CACHE") or Path.home() / ".cache" / "edit-jax")
