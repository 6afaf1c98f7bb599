"""What training reports after each epoch: copying in the samples, overfitting, the best epoch."""

from __future__ import annotations

import json

import pytest
from test_train import TEXT, TINY
from typer.testing import CliRunner

from tunesmith import finetune
from tunesmith.watch import EpochWatch, best_epoch, epoch_losses, overfitting_warning


def _rows(epochs: list[tuple[list[float], float]], steps_per_epoch: int = 2) -> list[dict]:
    """metrics.jsonl rows as training writes them: a validation at step 0, then each epoch's steps
    and its validation."""
    rows = [{"step": 0, "epoch": 0.0, "validation_loss": 3.0}]
    step = 0
    for e, (train, valid) in enumerate(epochs):
        for i, loss in enumerate(train):
            step += 1
            rows.append({"step": step, "epoch": round(e + (i + 1) / steps_per_epoch, 4), "training_loss": loss})
        rows.append({"step": step, "epoch": float(e + 1), "validation_loss": valid})
    return rows


def _best(run, step: int, loss: float) -> None:
    (run / "best").mkdir(parents=True)
    (run / "best" / "best.json").write_text(json.dumps({"step": step, "validation_loss": loss}))


def test_epoch_losses_are_the_mean_training_loss_of_each_epoch():
    rows = _rows([([3.0, 2.0], 2.2), ([1.8, 1.6], 2.4)])
    assert epoch_losses(rows) == [
        {"epoch": 1, "training_loss": 2.5, "validation_loss": 2.2, "step": 2},
        {"epoch": 2, "training_loss": pytest.approx(1.7), "validation_loss": 2.4, "step": 4},
    ]


def test_overfitting_is_named_with_the_best_epoch_and_its_weights(tmp_path):
    rows = _rows([([3.0, 2.0], 2.2), ([1.8, 1.6], 2.4)])
    _best(tmp_path, 2, 2.2)
    warning = overfitting_warning(rows, tmp_path)
    assert warning.startswith("warning: overfitting: validation loss rose from 2.200 (epoch 1) to 2.400 (epoch 2) "
                              "while training loss fell from 2.500 to 1.700")
    assert f"Epoch 1 is the best so far; its weights are in {tmp_path / 'best'}." in warning
    assert best_epoch(rows, tmp_path)["epoch"] == 1


@pytest.mark.parametrize("epochs", [
    [([3.0, 2.0], 2.2), ([1.8, 1.6], 2.1)],  # both fall: learning
    [([3.0, 2.0], 2.2), ([2.6, 2.8], 2.3)],  # both rise: a bad step size, not overfitting
    [([3.0, 2.0], 2.2)],  # one epoch: nothing to compare
])
def test_no_warning_unless_validation_rises_while_training_falls(tmp_path, epochs):
    assert overfitting_warning(_rows(epochs), tmp_path) is None


def test_the_warning_is_said_at_the_end_of_an_epoch(tmp_path):
    rows = _rows([([3.0, 2.0], 2.2), ([1.8, 1.6], 2.4)])
    (tmp_path / "config.json").write_text(json.dumps({"tunesmith_run": 1}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events, logged = [], []
    EpochWatch(tmp_path).epoch_end(4, 2.0, [], logged.append, events.append)
    assert logged == []  # no samples, no copying row
    assert [e["level"] for e in events] == ["warning"] and "overfitting" in events[0]["message"]


def test_each_epoch_logs_the_copying_in_its_samples(tmp_path, tiny_model_dir, monkeypatch):
    """Samples that recite a paragraph of the training text, and samples of the model's own: the
    metrics row of each epoch pools them, and the copy index is left ready in the run."""
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    paragraph = TEXT.split("\n\n")[5]
    own = "Grey gulls wheeled above the market while a violinist tuned his strings beside the fountain."
    fake = [{"prompt": "a", "text": " " + paragraph}, {"prompt": "b", "text": " " + own}]
    monkeypatch.setattr("tunesmith.train._write_samples", lambda model, tok, prompts, cfg: fake)
    events = []
    run = finetune(book, out=tmp_path / "run", progress=False, on_event=events.append, **TINY)
    rows = [r for r in run.metrics() if "samples_copy_rate" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(v["step"], v["epoch"]) for v in run.metrics()
                                                       if "validation_loss" in v and v["step"] > 0]
    # the reference: each sample checked on its own against an index of the training data, pooled by hand
    from tunesmith.copies import CopyIndex

    index = CopyIndex.open(run.path)
    a, b = index.check(fake[0]["text"]), index.check(fake[1]["text"])
    assert a.copy_rate == 1.0 and b.copy_rate == 0.0
    for row in rows:
        assert row["samples_copy_rate"] == pytest.approx(a.n_tokens / (a.n_tokens + b.n_tokens))
        assert row["samples_longest_copy_tokens"] == a.longest.n_tokens == a.n_tokens
        for n in (4, 8):
            novel = (a.ngrams[n][0] + b.ngrams[n][0]) / (a.ngrams[n][1] + b.ngrams[n][1])
            assert row[f"samples_novelty_{n}"] == pytest.approx(novel)
    said = [e["message"] for e in events if e["type"] == "info" and "samples:" in e["message"]]
    assert len(said) == 2 and said[0].startswith(f"epoch 1 samples: {100 * rows[0]['samples_copy_rate']:.1f}% copied")
    assert json.loads((run.path / "copies" / "meta.json").read_text())["tokens"] > 0  # built during training


def test_train_names_the_best_epoch_and_its_weights(tmp_path, tiny_model_dir):
    from tunesmith.cli import app

    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(book), "--out", str(out), "--base", "tiny-llama", "--epochs", "2",
                                      "--batch-size", "2", "--block-size", "64", "--compile", "off"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if "validation_loss" in r and r["step"] > 0]
    lowest = min(valid, key=lambda r: r["validation_loss"])
    assert json.loads((out / "best" / "best.json").read_text())["step"] == lowest["step"]
    assert f"best epoch: {int(lowest['epoch'])}" in result.output and str(out / "best") in result.output
