"""The loss curve of a run, as a PNG."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def plot_loss(metrics: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["training_loss"]) for m in metrics if m.get("training_loss") is not None]
    valid = [(m["step"], m["validation_loss"]) for m in metrics if m.get("validation_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="#3b6ea5", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", color="#d1495b", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
