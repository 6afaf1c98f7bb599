"""What training reports while it runs: one typed event, and the one vocabulary of metric names.

The metric names below are those of ``metrics.jsonl``; the events carry the same names, and the CLI
reads them. Fine-tuning job events (the server) use OpenAI's names for the four metrics OpenAI
defines (``JOB_METRIC_NAMES``) and these names for the rest; the playground reads the job events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# One row of metrics.jsonl per optimizer step ...
STEP_METRICS = ("epoch", "elapsed_tokens", "training_loss", "training_token_accuracy", "learning_rate",
                "tokens_per_second", "elapsed_seconds")
# ... and one per validation (step 0: the base model, before training).
VALIDATION_METRICS = ("epoch", "elapsed_tokens", "validation_loss", "validation_token_accuracy",
                      "validation_perplexity")

# ... and one per epoch for the copying in that epoch's samples (watch.py).
SAMPLE_METRICS = ("epoch", "samples_copy_rate", "samples_longest_copy_tokens", "samples_novelty_4",
                  "samples_novelty_8", "samples_novelty_16", "samples_novelty_32")

# tunesmith's name -> the name in OpenAI's fine-tuning job events and checkpoints.
JOB_METRIC_NAMES = {
    "training_loss": "train_loss",
    "training_token_accuracy": "train_mean_token_accuracy",
    "validation_loss": "valid_loss",
    "validation_token_accuracy": "valid_mean_token_accuracy",
}

EventType = Literal["info", "metrics", "validation", "samples", "checkpoint", "done"]


@dataclass(frozen=True)
class TrainEvent:
    """One thing that happened during training.

    - ``info``: a ``message`` for the reader (``level`` "warning" for warnings);
    - ``metrics``: an optimizer step finished; ``metrics`` holds its ``STEP_METRICS``, ``total_steps`` the plan;
    - ``validation``: a validation finished; ``metrics`` holds its ``VALIDATION_METRICS``;
    - ``samples``: an epoch's samples were checked for copying; ``metrics`` holds its ``SAMPLE_METRICS``;
    - ``checkpoint``: a checkpoint was saved at ``path``;
    - ``done``: training ended with ``status`` (succeeded, cancelled, interrupted); ``path`` is the run.

    ``event["name"]`` and ``event.get("name")`` read a field or a metric, so a handler may treat the
    event as the flat record it describes.
    """

    type: EventType
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    total_steps: int | None = None
    message: str | None = None
    level: str = "info"
    path: str | None = None
    status: str | None = None

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.metrics:
            return self.metrics[name]
        value = getattr(self, name, None) if name in self.__dataclass_fields__ else None
        return default if value is None else value

    def __getitem__(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def as_dict(self) -> dict:
        """The flat record: the set fields and the metrics side by side."""
        out = {k: getattr(self, k) for k in ("type", "step", "total_steps", "message", "path", "status")
               if getattr(self, k) is not None}
        if self.type == "info":
            out["level"] = self.level
        return {**out, **self.metrics}
