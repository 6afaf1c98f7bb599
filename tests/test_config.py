"""Settings written once: the library, the CLI and the server agree on defaults and bounds; training
events carry metrics.jsonl's names, and job events OpenAI's."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from tunesmith import TunesmithError
from tunesmith.config import SamplingConfig, TrainConfig
from tunesmith.events import TrainEvent


@pytest.mark.parametrize("block_size, ok", [(15, False), (16, True), (512, True), (8192, True), (8193, False)])
def test_block_size_bounds_agree_in_library_prepare_and_server(block_size, ok, tmp_path):
    from tunesmith.prepare import prepare
    from tunesmith.server.schemas import Hyperparameters

    if ok:
        TrainConfig(block_size=block_size).check()
        Hyperparameters(block_size=block_size)
    else:
        with pytest.raises(TunesmithError) as err:
            TrainConfig(block_size=block_size).check()
        assert err.value.field == "block_size" and "between 16 and 8192" in str(err.value)
        with pytest.raises(ValidationError):
            Hyperparameters(block_size=block_size)
    if block_size < 16:  # prepare checks its settings before it reads the file
        with pytest.raises(TunesmithError, match="at least 16 tokens"):
            prepare(tmp_path / "missing.txt", block_size=block_size)


def test_sampling_bounds_and_the_servers_tighter_temperature():
    from tunesmith.server.schemas import SamplingRequest

    SamplingConfig(temperature=2.5).check()  # the library allows up to 5
    with pytest.raises(ValidationError):
        SamplingRequest(model="m", temperature=2.5)  # OpenAI's range ends at 2
    for bad, message in [({"top_p": 0}, "in (0, 1]"), ({"max_tokens": 8193}, "between 1 and 8192"),
                         ({"top_k": -1}, "0 (off) or positive"), ({"repetition_penalty": 0}, "in (0, 10]")]:
        with pytest.raises(TunesmithError) as err:
            SamplingConfig(**bad).check()
        assert message in str(err.value) and err.value.field == next(iter(bad))


def test_cli_defaults_come_from_the_config():
    import inspect

    from tunesmith import cli

    def default(command, name):
        return inspect.signature(command).parameters[name].default.default

    assert default(cli.train, "block_size") == default(cli.prepare, "block_size") == 512
    assert (default(cli.train, "epochs"), default(cli.train, "batch_size")) == (4, 8)
    # `tunesmith generate` reads better than the library's plain sampling
    assert (default(cli.generate, "max_tokens"), default(cli.generate, "top_p")) == (200, 0.95)
    assert default(cli.generate, "repetition_penalty") == 1.1
    assert (SamplingConfig().max_tokens, SamplingConfig().top_p, SamplingConfig().repetition_penalty) == (256, 1.0, 1.0)


def test_event_reads_fields_and_metrics():
    event = TrainEvent("validation", 0, metrics={"validation_loss": 2.5, "validation_perplexity": 12.18})
    assert (event["type"], event["step"], event["validation_loss"]) == ("validation", 0, 2.5)
    assert event.get("message", "") == "" and event.get("path") is None
    with pytest.raises(KeyError):
        event["path"]
    assert event.as_dict() == {"type": "validation", "step": 0, "validation_loss": 2.5, "validation_perplexity": 12.18}


class _Store:
    def __init__(self):
        self.events, self.checkpoints = [], []

    def add_event(self, job_id, message, **kw):
        self.events.append((message, kw.get("data")))

    def update_job(self, job_id, **kw):
        pass

    def add_checkpoint(self, job_id, step, path, metrics):
        self.checkpoints.append((step, path, metrics))


def test_job_events_use_openais_names_for_the_metrics_openai_defines():
    from tunesmith.server.worker import JobRunner

    store = _Store()
    runner = JobRunner(store, {"id": "ftjob-1"}, threading.Event())
    runner.on_event(TrainEvent("metrics", 3, total_steps=10, metrics={
        "epoch": 0.3, "elapsed_tokens": 384, "training_loss": 2.0, "training_token_accuracy": 0.5,
        "learning_rate": 1e-3, "tokens_per_second": 100.0, "elapsed_seconds": 3.84}))
    runner.on_event(TrainEvent("validation", 3, metrics={
        "epoch": 0.3, "elapsed_tokens": 384, "validation_loss": 2.25, "validation_token_accuracy": 0.4,
        "validation_perplexity": 9.49}))
    runner.on_event(TrainEvent("checkpoint", 3, path="/runs/x/checkpoints/step-000003"))
    (m_text, m_data), (v_text, v_data), _ = store.events
    assert m_text == "Step 3/10: training loss=2.0000"
    assert m_data == {"step": 3, "total_steps": 10, "epoch": 0.3, "train_loss": 2.0,
                      "train_mean_token_accuracy": 0.5, "elapsed_tokens": 384, "tokens_per_second": 100.0}
    assert v_text == "Step 3: validation loss=2.2500, perplexity=9.49"
    assert v_data == {"step": 3, "valid_loss": 2.25, "valid_mean_token_accuracy": 0.4, "validation_perplexity": 9.49}
    assert store.checkpoints == [(3, "/runs/x/checkpoints/step-000003", {
        "step": 3, "train_loss": 2.0, "train_mean_token_accuracy": 0.5, "valid_loss": 2.25,
        "valid_mean_token_accuracy": 0.4})]
