"""The training-time estimate: it counts what a run really does and prices it with measured costs."""

from __future__ import annotations

import json
import math

import pytest

from tunesmith import estimate
from tunesmith.train import finetune

# Made-up costs, each of a different size, so that a wrong count of any part moves the total by
# far more than the measured data-reading time can.
COSTS = {
    "load_seconds": 7.0, "micro_batch": 4, "block_seconds": 1.0, "first_step_extra_seconds": 3.0, "compiled": False,
    "eval_block_seconds": 50.0, "sample_prefill_seconds": 200.0, "sample_token_seconds": 30.0,
    "checkpoint_seconds": 1000.0, "finish_seconds": 11.0, "tokens_per_second": 123.0, "basis": "fixed for the test",
}
DATA_SECONDS_AT_MOST = 20.0  # reading and packing a few kB of text with the tiny model's tokenizer


@pytest.fixture()
def fixed_costs(monkeypatch):
    seen = []

    def calibrate(cfg, *, compiled=False, refresh=False):
        seen.append(compiled)
        return dict(COSTS)

    monkeypatch.setattr(estimate, "calibrate", calibrate)
    return seen


def _book(tmp_path, paragraphs: int = 24):
    words = ["the", "sea", "was", "calm", "and", "ship", "sailed", "north", "under", "a", "grey", "sky", "while", "crew"]
    text = "\n\n".join(
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(18 + i % 5)).capitalize() + "." for i in range(paragraphs)
    )
    path = tmp_path / "book.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _blocks(rows: list[dict], tok, block_size: int) -> int:
    """Blocks of a book's rows, counted by hand: each piece, then a paragraph break, in one stream."""
    joiner = len(tok.encode("\n\n", add_special_tokens=False))
    tokens = sum(len(tok.encode(row["text"], add_special_tokens=False)) + joiner for row in rows)
    return math.ceil((tokens - 1) / block_size)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("options", [
    {"epochs": 2, "batch_size": 4, "block_size": 32},
    {"epochs": 3, "batch_size": 3, "block_size": 24, "max_steps": "one epoch and one step", "save_every": 2},
])
def test_plan_counts_and_prices_what_the_run_does(tmp_path, tiny_model_dir, fixed_costs, options):
    from tunesmith.models import load_tokenizer

    book = _book(tmp_path)
    tok = load_tokenizer("tiny-llama")
    settings = {"base": "tiny-llama", "seed": 0, "sample_prompts": ["The sea"], "sample_tokens": 5, **options}
    if options.get("max_steps"):  # stop one step into the second epoch
        first = plan_of(book, {**settings, "max_steps": None})
        settings["max_steps"] = first["optimizer steps"] // settings["epochs"] + 1
    planned = plan_of(book, settings)

    events = []
    run = finetune(book, out=tmp_path / "run", progress=False, on_event=events.append, **settings)
    metrics = _read_jsonl(run.path / "metrics.jsonl")
    train_rows = [m for m in metrics if "training_loss" in m]
    valid_rows = [m for m in metrics if "validation_loss" in m]
    samples = (run.path / "samples.md").read_text().count("Prompt:")
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    train_blocks = _blocks(_read_jsonl(run.path / "data" / "train.jsonl"), tok, settings["block_size"])
    valid_blocks = _blocks(_read_jsonl(run.path / "data" / "valid.jsonl"), tok, settings["block_size"])

    assert planned["training blocks"] == f"{train_blocks} x {settings['block_size']} tokens"
    assert planned["optimizer steps"] == len(train_rows)
    assert planned["validation"] == f"{len(valid_rows)} passes over {valid_blocks} blocks"
    assert planned["samples"] == f"{samples} of up to 5 tokens"
    assert planned["checkpoints"] == len(checkpoints)
    assert fixed_costs == [False] * len(fixed_costs)  # runs this short are never compiled

    blocks_trained = train_rows[-1]["elapsed_tokens"] // settings["block_size"]
    by_hand = (7.0 + 3.0 + blocks_trained * 1.0 + len(valid_rows) * valid_blocks * 50.0
               + samples * (200.0 + 4 * 30.0) + len(checkpoints) * 1000.0 + 11.0)
    assert by_hand <= planned["estimated seconds"] <= by_hand + DATA_SECONDS_AT_MOST


def plan_of(book, settings):
    return estimate.plan(book, **settings)


def test_estimate_scales_with_epochs_and_block_size(tmp_path, tiny_model_dir, fixed_costs):
    book = _book(tmp_path, paragraphs=40)
    base = {"base": "tiny-llama", "sample_prompts": ["A"], "sample_tokens": 1, "batch_size": 4}
    one = plan_of(book, {**base, "epochs": 1, "block_size": 32})
    three = plan_of(book, {**base, "epochs": 3, "block_size": 32})
    half = plan_of(book, {**base, "epochs": 1, "block_size": 64})
    blocks_32 = int(one["training blocks"].split()[0])
    blocks_64 = int(half["training blocks"].split()[0])
    assert blocks_64 == pytest.approx(blocks_32 / 2, abs=1)
    # Two more epochs: two more passes over the blocks, validations, samples and checkpoints.
    valid_32 = int(one["validation"].split()[3])
    extra = 2 * (blocks_32 * 1.0 + valid_32 * 50.0 + 200.0 + 1000.0)
    assert three["estimated seconds"] - one["estimated seconds"] == pytest.approx(extra, abs=DATA_SECONDS_AT_MOST)
    assert one["estimated seconds"] - half["estimated seconds"] == pytest.approx(
        (blocks_32 - blocks_64) * 1.0 + 2 * (valid_32 - int(half["validation"].split()[3])) * 50.0,
        abs=DATA_SECONDS_AT_MOST)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, tiny_model_dir, fixed_costs):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    book = _book(tmp_path)
    result = CliRunner().invoke(app, ["train", str(book), "--base", "tiny-llama", "--dry-run", "--block-size", "32",
                                      "--batch-size", "4", "--epochs", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = dict(line.strip().split(": ", 1) for line in result.output.splitlines() if ": " in line)
    planned = estimate.plan(book, base="tiny-llama", block_size=32, batch_size=4, epochs=2)
    assert lines["optimizer steps"] == str(planned["optimizer steps"])
    assert float(lines["estimated seconds"]) == pytest.approx(planned["estimated seconds"], abs=DATA_SECONDS_AT_MOST)
    assert float(lines["estimated seconds"]) > 2000  # two epochs: two checkpoints of 1000 s each
    assert not (tmp_path / "run").exists()


def test_prepare_report_estimates_a_default_run(tmp_path, tiny_model_dir, fixed_costs):
    from tunesmith.models import load_tokenizer
    from tunesmith.prepare import prepare
    from tunesmith.train import TrainConfig

    prepared = prepare(_book(tmp_path), base="tiny-llama", block_size=32, estimate=estimate.report_estimate)
    est = prepared.report["estimate"]
    tok = load_tokenizer("tiny-llama")
    defaults = TrainConfig()
    train_blocks, valid_blocks = _blocks(prepared.train, tok, 32), _blocks(prepared.valid, tok, 32)
    prompts = len((prepared.valid or prepared.train)[:2])  # train samples the first two validation examples
    assert valid_blocks and prompts
    by_hand = (7.0 + 3.0 + defaults.epochs * train_blocks * 1.0 + (defaults.epochs + 1) * valid_blocks * 50.0
               + defaults.epochs * prompts * (200.0 + (defaults.sample_tokens - 1) * 30.0)
               + defaults.epochs * 1000.0 + 11.0)
    assert by_hand <= est["seconds"] <= by_hand + DATA_SECONDS_AT_MOST
    assert "4 epochs at batch 8" in est["basis"] and est["tokens_per_second"] == 123.0


def test_calibration_measures_once_and_is_cached(tunesmith_home, tiny_model_dir, monkeypatch):
    from tunesmith.train import TrainConfig

    cfg = TrainConfig(base="tiny-llama", block_size=16, batch_size=2, sample_tokens=4)
    first = estimate.calibrate(cfg)
    for name in ("load_seconds", "block_seconds", "eval_block_seconds", "sample_token_seconds", "checkpoint_seconds",
                 "finish_seconds", "sample_prefill_seconds"):
        assert first[name] > 0, name
    assert first["micro_batch"] == 2 and first["tokens_per_second"] == pytest.approx(2 * 16 / (2 * first["block_seconds"]))

    import tunesmith.train

    monkeypatch.setattr(tunesmith.train, "build_model", lambda cfg: pytest.fail("measured again"))
    assert estimate.calibrate(cfg) == first
    cached = json.loads((tunesmith_home / "throughput.json").read_text())
    assert list(cached.values()) == [first]
