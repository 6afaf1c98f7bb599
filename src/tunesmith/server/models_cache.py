"""Loaded models kept in memory: a least-recently-used cache bounded by an estimated byte budget.

The first request for a model loads it (seconds); later requests reuse it. When loading one more
would exceed the budget, the least recently used models are dropped (a request still generating
with a dropped model keeps its own reference until it finishes). A model bigger than the whole
budget is still loaded, alone.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable

DEFAULT_CACHE_BYTES = 4 * 1024**3


def parse_bytes(text: str | int | None, default: int = DEFAULT_CACHE_BYTES) -> int:
    """``4GB``, ``512MiB``, ``1e9`` or a plain number of bytes."""
    if text is None or text == "":
        return default
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "K": 1024, "M": 1024**2, "G": 1024**3, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(float(s))


def default_cache_bytes() -> int:
    return parse_bytes(os.environ.get("TUNESMITH_MODEL_CACHE"), DEFAULT_CACHE_BYTES)


def model_bytes(model: Any) -> int:
    """Bytes held by a loaded model's parameters and buffers (``Model.model`` is the torch module)."""
    net = getattr(model, "model", model)
    total = 0
    try:
        for tensor in list(net.parameters()) + list(net.buffers()):
            total += tensor.numel() * tensor.element_size()
    except Exception:
        return 0
    return total


class ModelCache:
    def __init__(self, max_bytes: int | None = None, loader: Callable[[str], Any] | None = None,
                 sizer: Callable[[Any], int] = model_bytes):
        self.max_bytes = default_cache_bytes() if max_bytes is None else max_bytes
        self._loader = loader
        self._sizer = sizer
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def _load(self, source: str) -> Any:
        if self._loader is not None:
            return self._loader(source)
        from ..generate import load

        return load(source)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, key: str, source: str | None = None) -> Any:
        """The model cached under ``key``, loading it from ``source`` (default: ``key``) on a miss.
        Two requests for the same missing model load it once."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]
            model = self._load(source if source is not None else key)
            size = int(self._sizer(model))
            with self._lock:
                self.loads += 1
                self._items[key] = (model, size)
                self._items.move_to_end(key)
                self._evict_locked(keep=key)
                self._loading.pop(key, None)
            return model

    def _evict_locked(self, keep: str) -> None:
        while len(self._items) > 1 and sum(s for _, s in self._items.values()) > self.max_bytes:
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            self._items.pop(oldest)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)
