"""The ``auto`` hyperparameters: epochs, batch size and learning rate chosen from the size of the
training data. One policy, so a fine-tuning job and ``tunesmith train`` with the same data pick the
same settings."""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig

MB = 1024 * 1024
BYTES_PER_TOKEN = 4  # English prose in a SmolLM2-style BPE vocabulary: about 4 bytes per token


@dataclass(frozen=True)
class AutoHyperparameters:
    epochs: int
    batch_size: int
    learning_rate: float


def auto_hyperparameters(data_bytes: int, cfg: TrainConfig | None = None) -> AutoHyperparameters:
    """Settings for ``data_bytes`` of training text; ``cfg`` supplies the method and block size
    (default: TrainConfig's)."""
    cfg = cfg or TrainConfig()
    # Small data needs more passes to move the model; big data makes each pass long.
    epochs = 4 if data_bytes < 1 * MB else 3 if data_bytes < 10 * MB else 2
    # A tiny file has only a few blocks: keep several optimizer steps per epoch (up to the default batch).
    blocks = max(1, data_bytes // (BYTES_PER_TOKEN * cfg.block_size))
    batch_size = max(1, min(TrainConfig.batch_size, blocks // 4))
    return AutoHyperparameters(epochs=epochs, batch_size=batch_size, learning_rate=cfg.learning_rate)
