"""What training reports after each epoch besides its loss: how much of that epoch's samples is
copied from the training text, whether the model has started to overfit, and which epoch is best.

``train.py`` calls ``EpochWatch`` at the end of each epoch; the copy index of the run's
``data/train.jsonl`` (copies.py) is built on the first call and kept, so that ``tunesmith copies``
and ``tunesmith eval`` find it ready afterwards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from .copies import NOVELTY_NS, CopyIndex
from .errors import TunesmithError
from .events import TrainEvent

MIN_TOKENS = 12  # the shortest span that counts as copied, as `tunesmith copies` counts by default


class EpochWatch:
    """Per-epoch figures for one run directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._index: CopyIndex | None | bool = None  # False: the index cannot be built (said once)

    def index(self) -> CopyIndex | None:
        """The run's copy index, built on first use; None when it cannot be built (the run still
        trains and finishes: the index is a report, not part of the model)."""
        if self._index is None:
            try:
                self._index = CopyIndex.open(self.run_dir)
            except (TunesmithError, OSError, MemoryError, ValueError):
                self._index = False
        return self._index or None

    def epoch_end(self, step: int, epoch: float, samples: list[dict], log: Callable[[dict], None],
                  emit: Callable[[dict], None]) -> None:
        """After an epoch's validation and samples: log the samples' copying figures as a metrics
        row and say them, and warn when the model has started to overfit."""
        row = self.copying_row(step, epoch, samples)
        if row is not None:
            log(row)
            emit(TrainEvent("samples", step, metrics={k: v for k, v in row.items() if k != "step"}))
            emit(TrainEvent("info", message=describe_copying(row)))
        from .rundir import Run

        warning = overfitting_warning(Run(self.run_dir).metrics(), self.run_dir)
        if warning:
            emit(TrainEvent("info", message=warning, level="warning"))

    def copying_row(self, step: int, epoch: float, samples: list[dict]) -> dict | None:
        """The metrics row of an epoch's samples: the share of their tokens inside copied spans
        (12+ tokens), the longest span in tokens, and n-gram novelty pooled over all the samples
        (novel n-grams of all samples over all their n-grams). None when there is nothing to check."""
        texts = [s["text"] for s in samples if s.get("text", "").strip()]
        index = self.index() if texts else None
        if index is None:
            return None
        copied = total = longest = 0
        pooled = {n: [0, 0] for n in NOVELTY_NS}
        for text in texts:
            report = index.check(text, min_tokens=MIN_TOKENS)
            copied += round(report.copy_rate * report.n_tokens)
            total += report.n_tokens
            longest = max(longest, report.longest.n_tokens if report.longest else 0)
            for n, (novel, count) in report.ngrams.items():
                pooled[n][0] += novel
                pooled[n][1] += count
        row = {"step": step, "epoch": epoch, "samples_copy_rate": copied / total if total else 0.0,
               "samples_longest_copy_tokens": longest}
        for n, (novel, count) in pooled.items():
            if count:
                row[f"samples_novelty_{n}"] = novel / count
        return row


def describe_copying(row: dict) -> str:
    text = (f"epoch {row['epoch']:g} samples: {100 * row['samples_copy_rate']:.1f}% copied from the training text "
            f"(spans of {MIN_TOKENS}+ tokens; longest {row['samples_longest_copy_tokens']} tokens)")
    if "samples_novelty_8" in row:
        text += f", {100 * row['samples_novelty_8']:.1f}% of 8-grams novel"
    return text


def epoch_losses(metrics: list[dict]) -> list[dict]:
    """For each finished epoch (one with a validation row after its last step): its number, the
    mean training loss of its steps, its validation loss and the step it ended at."""
    out = []
    train: dict[int, list[float]] = {}
    for row in metrics:
        if row.get("training_loss") is not None:
            epoch = max(1, math.ceil(float(row["epoch"])))  # a step ending at epoch 1.0 belongs to epoch 1
            train.setdefault(epoch, []).append(float(row["training_loss"]))
        elif row.get("validation_loss") is not None and row.get("step", 0) > 0:
            epoch = round(float(row["epoch"]))
            losses = train.get(epoch)
            if losses and (not out or out[-1]["epoch"] != epoch):
                out.append({"epoch": epoch, "training_loss": sum(losses) / len(losses),
                            "validation_loss": float(row["validation_loss"]), "step": int(row["step"])})
    return out


def overfitting_warning(metrics: list[dict], run_dir: str | Path) -> str | None:
    """A warning when the last epoch's validation loss rose while its training loss fell: the model
    is learning the training text by heart rather than the author's way of writing."""
    epochs = epoch_losses(metrics)
    if len(epochs) < 2:
        return None
    prev, last = epochs[-2], epochs[-1]
    if not (last["validation_loss"] > prev["validation_loss"] and last["training_loss"] < prev["training_loss"]):
        return None
    best = best_epoch(metrics, run_dir)
    where = f" Epoch {best['epoch']} is the best so far; its weights are in {best['path']}." if best else ""
    return (f"warning: overfitting: validation loss rose from {prev['validation_loss']:.3f} (epoch {prev['epoch']}) "
            f"to {last['validation_loss']:.3f} (epoch {last['epoch']}) while training loss fell from "
            f"{prev['training_loss']:.3f} to {last['training_loss']:.3f}: the model is memorising the training "
            f"text.{where} Train fewer epochs or with a lower learning rate, or give it more text.")


def best_epoch(metrics: list[dict], run_dir: str | Path) -> dict | None:
    """The epoch whose weights are in ``best/`` (the lowest validation loss): its number, step,
    validation loss and the weights' path; None when the run has no ``best/``."""
    best_dir = Path(run_dir) / "best"
    try:
        best = json.loads((best_dir / "best.json").read_text())
    except (OSError, ValueError):
        return None
    epoch = None
    for row in epoch_losses(metrics):
        if row["step"] == best.get("step"):
            epoch = row["epoch"]
    if epoch is None:
        return None
    return {"epoch": epoch, "step": best["step"], "validation_loss": best.get("validation_loss"), "path": best_dir}


def best_epoch_note(run_dir: str | Path) -> str | None:
    """One line for the end of training: which epoch was best and where its weights are."""
    from .rundir import Run

    run = Run(run_dir)
    best = best_epoch(run.metrics(), run.path)
    if best is None:
        return None
    epochs = epoch_losses(run.metrics())
    last = epochs[-1]["epoch"] if epochs else best["epoch"]
    if best["epoch"] == last:
        return (f"best epoch: {best['epoch']} (the last; validation loss {best['validation_loss']:.3f}); "
                f"its weights are the run's own and also in {best['path']}")
    return (f"best epoch: {best['epoch']} of {last} (validation loss {best['validation_loss']:.3f}); its weights "
            f"are in {best['path']} (the run's own weights are the last epoch's)")
