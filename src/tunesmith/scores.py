"""Metrics of classifiers and regressors, their baselines, and their plots.

Written with numpy because scikit-learn and scipy are not dependencies of tunesmith; each
function follows the textbook definition (and scikit-learn's conventions) and is tested
against hand-computed values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``m[i, j]`` = rows of true class i predicted as class j."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def macro_f1(y_true, y_pred, n_classes: int) -> float:
    """Mean over the classes that occur (true or predicted) of 2·TP / (2·TP + FP + FN)."""
    m = confusion(y_true, y_pred, n_classes)
    tp = np.diag(m).astype(float)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    present = (m.sum(axis=0) + m.sum(axis=1)) > 0
    if not present.any():
        return 0.0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1[present].mean())


def pearson(x, y) -> float | None:
    """Pearson's r; None where either side is constant (r is undefined)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denom == 0:
        return None
    return float((dx * dy).sum() / denom)


def ranks(x) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    out = np.empty(len(x), dtype=float)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            out[order[start:end]] = (start + 1 + end) / 2
            start = end
    return out


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


def mse(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(((x - y) ** 2).mean()) if len(x) else 0.0


def classification_metrics(y_true, y_pred, n_classes: int, majority: int) -> dict:
    """Accuracy, macro-F1 and confusion matrix, beside those of always answering ``majority``."""
    base = np.full(len(y_true), majority)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, n_classes),
        "confusion": confusion(y_true, y_pred, n_classes).tolist(),
        "baseline_accuracy": accuracy(y_true, base),
        "baseline_macro_f1": macro_f1(y_true, base, n_classes),
    }


def regression_metrics(y_true, y_pred, train_mean: float) -> dict:
    """Pearson, Spearman and MSE, beside the MSE of always answering the training mean
    (a constant has no correlation: its Pearson and Spearman are reported as 0)."""
    return {
        "pearson": pearson(y_true, y_pred),
        "spearman": spearman(y_true, y_pred),
        "mse": mse(y_true, y_pred),
        "baseline_mse": mse(y_true, np.full(len(y_true), train_mean)),
        "baseline_pearson": 0.0,
    }


def plot_confusion(matrix, labels: list[str], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = min(12, 2.5 + 0.5 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (validation)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_scatter(y_true, y_pred, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.scatter(y_true, y_pred, s=8, alpha=0.5, color="#3b6ea5")
    lo, hi = float(min(np.min(y_true), np.min(y_pred))), float(max(np.max(y_true), np.max(y_pred)))
    ax.plot([lo, hi], [lo, hi], color="#999999", linewidth=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title or "validation: predicted vs true")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
