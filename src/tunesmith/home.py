"""Where tunesmith keeps its state: the model cache, the jobs database, uploaded files."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$TUNESMITH_HOME``, default ``~/.cache/tunesmith``; created on first use."""
    root = Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
