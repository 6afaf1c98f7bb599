"""Copied spans in generated text, for requests that ask with ``"tunesmith": {"check_copying": true}``.

The training text of the requested model is its run directory's ``data/train.jsonl`` (a checkpoint
reads its run's). The copy index of each run is opened once (copies.py builds and stores it on
first use) and kept, like loaded models; it is opened again when the run's data changes. A base
model has no training text, so asking to check its output is a 400.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..copies import CopyIndex, CopyReport
from ..errors import TunesmithError
from ..rundir import is_run_dir
from .errors import APIError
from .models_cache import is_checkpoint_dir

PARAM = "tunesmith.check_copying"
MAX_INDEXES = 8  # runs whose index is kept open at once (each is memory-mapped, so small)


def training_run(model_id: str, source: str) -> Path:
    """The run directory whose training text a model was trained on (``source`` as the catalog
    resolves it); a 400 for a base model."""
    path = Path(source)
    if is_checkpoint_dir(path):
        return path.parent.parent
    if is_run_dir(path):
        return path
    raise APIError(400, f"{PARAM} needs a fine-tuned model: '{model_id}' is a base model, which has no "
                   "training text to compare with. Ask a fine-tuned model or a run, or leave the option out.",
                   param=PARAM, code="invalid_value")


class CopyIndexes:
    """The open copy index of each run, least recently used dropped first."""

    def __init__(self, max_items: int = MAX_INDEXES):
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[tuple, CopyIndex]] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self.opens = 0

    def get(self, run_dir: Path) -> CopyIndex:
        """The index of ``run_dir``'s training text. Two requests for the same run open it once."""
        key = str(Path(run_dir).resolve())
        stamp = _stamp(Path(run_dir))
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] == stamp:
                self._items.move_to_end(key)
                return found[1]
            key_lock = self._opening.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found = self._items.get(key)
                if found is not None and found[0] == stamp:
                    return found[1]
            try:
                index = CopyIndex.open(run_dir)
            except TunesmithError as exc:
                raise APIError(400, f"{PARAM}: {exc}", param=PARAM) from None
            with self._lock:
                self.opens += 1
                self._items[key] = (stamp, index)
                self._items.move_to_end(key)
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return index


def _stamp(run_dir: Path) -> tuple:
    """What tells a changed training file from the one indexed: its size and modification time."""
    try:
        st = (run_dir / "data" / "train.jsonl").stat()
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns)


def copying_field(index: CopyIndex, text: str, min_tokens: int, offset: int = 0) -> dict:
    """The ``tunesmith`` extension of one choice: the copied spans of ``text`` with the summary figures.
    Span offsets are characters in the choice's text; ``offset`` is where ``text`` starts in it (after
    an echoed prompt)."""
    if text.strip():
        report = index.check(text, min_tokens=min_tokens).to_dict()
    else:  # nothing generated: nothing copied
        report = CopyReport(spans=[], copy_rate=0.0, longest=None, novelty={}, n_tokens=0,
                            min_tokens=min_tokens).to_dict()
    report.pop("ngrams", None)
    for span in report["spans"] + ([report["longest"]] if report["longest"] else []):
        span["start"] += offset
        span["end"] += offset
    return {"copying": report}
