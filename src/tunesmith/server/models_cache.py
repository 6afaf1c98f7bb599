"""Loaded models kept in memory: a least-recently-used cache bounded by an estimated byte budget.

The first request for a model loads it (seconds); later requests reuse it. When loading one more
would exceed the budget, the least recently used models are dropped (a request still generating
with a dropped model keeps its own reference until it finishes). A model bigger than the whole
budget is still loaded, alone.

A source is what ``generate.load`` takes (a base name, a run directory, a path), or a run's
``checkpoints/step-N`` directory: that checkpoint's weights on the run's base (catalog.py names them).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..rundir import Run, is_run_dir

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
    total = 0
    try:
        for tensor in list(model.model.parameters()) + list(model.model.buffers()):
            total += tensor.numel() * tensor.element_size()
    except Exception:
        return 0
    return total


class CheckpointRun(Run):
    """A run seen with the weights of one of its checkpoints instead of its latest ones."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        super().__init__(self.checkpoint.parent.parent)

    @property
    def weights_dir(self) -> Path:
        return self.checkpoint / super().weights_dir.name


def is_checkpoint_dir(path: Path) -> bool:
    return path.parent.name == "checkpoints" and is_run_dir(path.parent.parent)


def load_source(source: str, quant: str | None = None) -> Any:
    """Load a model for generation: ``generate.load``, or a checkpoint on the run's base;
    ``quant`` as ``generate.load`` takes it (language models only)."""
    from ..classify import Classifier, is_classifier_run
    from ..generate import Model, load, quantize

    path = Path(source)
    if is_classifier_run(path):
        return Classifier.load(path)
    if not is_checkpoint_dir(path):
        return load(source, quant=quant)
    from ..device import pick_device, pick_dtype, setup_threads

    # as generate.load does for a run directory, with the checkpoint's weights
    setup_threads()
    device = pick_device(None)
    run = CheckpointRun(path)
    net, tok = run.load_model(dtype=pick_dtype(device, "auto"))
    quantize(net.to(device).eval(), quant)
    return Model(net, tok, name=f"{run.name}:{path.name}", path=path, base=run.config.get("base"))


def _load_ready(source: str, quant: str | None) -> Any:
    """``load_source``, with a language model's fused decoder built too (it is built on first use
    otherwise, on whichever thread asks first)."""
    model = load_source(source, quant)
    if hasattr(model, "decoder"):
        model.decoder  # noqa: B018 - built here, on the loading thread
    return model


def _in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread that ends when it returns.

    OpenMP (libgomp, under PyTorch's CPU kernels) keeps a pool of worker threads for every thread
    that has run a parallel region, for as long as that thread lives; once a process holds more
    of them than it has CPUs, no pool spins between regions, and the decoding loop's steps took
    45 ms instead of 26 (bench/NOTES.md). A request's thread lives on in the server's thread
    pool after loading a model; this one does not, so the decoding loop's pool stays the only one.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="tunesmith-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ModelCache:
    def __init__(self, max_bytes: int | None = None, loader: Callable[[str], Any] | None = None,
                 sizer: Callable[[Any], int] = model_bytes, quant: str | None = None, warm: bool = False):
        self.max_bytes = default_cache_bytes() if max_bytes is None else max_bytes
        self._loader = loader
        self._quant = quant
        self._warm = warm
        self._sizer = sizer
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def _load(self, source: str) -> Any:
        if self._loader:
            return self._loader(source)
        model = _in_own_thread(_load_ready, source, self._quant)
        if self._warm and hasattr(model, "warm"):
            # the compiled decoding step is built beside the requests; they decode eagerly until it is ready
            threading.Thread(target=model.warm, name="tunesmith-warm", daemon=True).start()
        return model

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
