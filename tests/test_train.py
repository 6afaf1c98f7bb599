"""Training on the tiny random Llama: the run directory, learning, stopping, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tunesmith import TunesmithError, finetune, load
from tunesmith.rundir import Run, is_run_dir
from tunesmith.tokens import Blocks
from tunesmith.train import TrainConfig, build_model, make_optimizer, train_step

TEXT = "".join(
    f"The lamp burned low in study number {i}. Holmes leaned back and closed his eyes for {i} minutes. "
    f"\"You have come {i} miles,\" he said at last. The visitor nodded and said nothing.\n\n"
    for i in range(24)
)

TINY = dict(base="tiny-llama", block_size=64, batch_size=2, epochs=2, sample_tokens=8)


@pytest.fixture()
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT)
    return path


def test_run_directory_has_everything(book, tmp_path, tiny_model_dir):
    events = []
    run = finetune(book, out=tmp_path / "run", progress=False, on_event=events.append, **TINY)
    assert run.status == "succeeded" and is_run_dir(run.path)
    names = {p.name for p in run.path.iterdir()}
    assert {"config.json", "metrics.jsonl", "loss.png", "samples.md", "README.md", "adapter", "tokenizer", "data"} <= names
    config = run.config
    assert config["base"] == "tiny-llama" and config["epochs"] == 2 and config["seed"] == 0
    assert config["versions"]["torch"] == torch.__version__
    rows = run.metrics()
    train_rows = [r for r in rows if "training_loss" in r]
    valid_rows = [r for r in rows if "validation_loss" in r]
    for column in ("step", "elapsed_tokens", "training_loss", "training_token_accuracy"):
        assert all(column in r for r in train_rows)
    assert [r["step"] for r in train_rows] == list(range(1, len(train_rows) + 1))
    assert len(valid_rows) == 3  # before training and after each of 2 epochs
    assert (run.path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run.path / "samples.md").read_text()
    assert "Epoch 1" in samples and "Epoch 2" in samples
    assert {e["type"] for e in events} >= {"info", "metrics", "validation", "checkpoint", "done"}
    # the events carry metrics.jsonl's rows under the same names
    reported = [{"step": e.step, **e.metrics} for e in events if e.type in ("metrics", "validation", "samples")]
    assert reported == rows
    assert run.checkpoints(), "each epoch leaves a checkpoint"
    state = torch.load(run.checkpoints()[-1]["path"] + "/trainer_state.pt", weights_only=False)
    assert {"optimizer", "scheduler", "rng", "epoch", "batch_in_epoch"} <= set(state)


def test_config_object_and_keyword_overrides(book, tmp_path, tiny_model_dir):
    config = TrainConfig(**{**TINY, "epochs": 1})
    run = finetune(book, config, out=tmp_path / "run", progress=False, samples=False, max_steps=2)
    assert (run.config["epochs"], run.config["max_steps"], run.config["block_size"]) == (1, 2, 64)
    assert config.max_steps is None  # the caller's config is left as it was
    with pytest.raises(TunesmithError, match="unknown option"):
        finetune(book, config, out=tmp_path / "other", epoch=3)
    with pytest.raises(TunesmithError, match="between 16 and 8192"):
        finetune(book, config, out=tmp_path / "other", block_size=8193)
    assert not (tmp_path / "other").exists()


def test_same_seed_same_run(book, tmp_path, tiny_model_dir):
    a = finetune(book, out=tmp_path / "a", progress=False, samples=False, **TINY)
    b = finetune(book, out=tmp_path / "b", progress=False, samples=False, **TINY)
    losses = lambda run: [r["training_loss"] for r in run.metrics() if "training_loss" in r]  # noqa: E731
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)


def test_loss_goes_down_on_a_repeated_batch(tiny_model_dir):
    cfg = TrainConfig(base="tiny-llama", block_size=32, batch_size=2, lr=3e-3, dtype="fp32")
    model, tok, device, compute = build_model(cfg)
    ids = np.random.default_rng(0).integers(0, 500, size=(2, 33))
    blocks = Blocks(ids=ids, mask=np.ones_like(ids, dtype=bool))
    opt, sched = make_optimizer(model, cfg, 30)
    losses = [train_step(model, opt, sched, blocks, np.arange(2), cfg, device, compute)["loss"] for _ in range(15)]
    assert losses[-1] < losses[0] - 0.05


def test_bf16_and_fp32_losses_agree(tiny_model_dir):
    ids = np.random.default_rng(1).integers(0, 500, size=(2, 33))
    blocks = Blocks(ids=ids, mask=np.ones_like(ids, dtype=bool))
    out = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = TrainConfig(base="tiny-llama", block_size=32, batch_size=2, dtype=dtype)
        model, tok, device, compute = build_model(cfg)
        opt, sched = make_optimizer(model, cfg, 10)
        out[dtype] = [train_step(model, opt, sched, blocks, np.arange(2), cfg, device, compute)["loss"] for _ in range(3)]
    assert out["bf16"] == pytest.approx(out["fp32"], rel=0.02)


def test_micro_batches_do_not_change_the_step(tiny_model_dir):
    ids = np.random.default_rng(2).integers(0, 500, size=(4, 17))
    blocks = Blocks(ids=ids, mask=np.ones_like(ids, dtype=bool))
    result = {}
    for micro in (1, 4):
        torch.manual_seed(0)
        cfg = TrainConfig(base="tiny-llama", block_size=16, batch_size=4, micro_batch_size=micro, dtype="fp32")
        model, tok, device, compute = build_model(cfg)
        opt, sched = make_optimizer(model, cfg, 10)
        result[micro] = [train_step(model, opt, sched, blocks, np.arange(4), cfg, device, compute)["loss"] for _ in range(2)]
    assert result[1] == pytest.approx(result[4], rel=1e-4)


def test_should_stop_cancels_cleanly_with_usable_weights(book, tmp_path, tiny_model_dir):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    run = finetune(book, out=tmp_path / "run", progress=False, should_stop=stop, **TINY)
    assert run.status == "cancelled"
    assert max(r["step"] for r in run.metrics()) == 3
    assert run.has_weights()
    # The run's weights are those of its last step, and they write text.
    last = run.checkpoints()[-1]
    assert last["step"] == 3
    published = run.path / "adapter" / "adapter_model.safetensors"
    assert published.read_bytes() == (Path(last["path"]) / "adapter" / "adapter_model.safetensors").read_bytes()
    completion = load(run.path).generate("The lamp", max_tokens=5, seed=0)[0]
    assert completion.completion_tokens == 5 or completion.finish_reason == "stop"
    assert completion.text.strip() or completion.finish_reason == "stop"


def test_keyboard_interrupt_keeps_last_checkpoint(book, tmp_path, tiny_model_dir):
    def boom(event):
        if event["type"] == "metrics" and event["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(book, out=tmp_path / "run", progress=False, on_event=boom, **TINY)
    run = Run(tmp_path / "run")
    assert run.status == "interrupted"
    assert run.has_weights() and [c["step"] for c in run.checkpoints()] == [2]
    checkpoint = run.checkpoints()[-1]["path"]
    state = torch.load(checkpoint + "/trainer_state.pt", weights_only=False)
    # step 2 had finished: its batch is done, and the next one to train is the third of epoch 0
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)
    assert state["metrics_rows"] == len(run.metrics()) == 3  # the base model's validation and 2 steps
    saved = load_file(checkpoint + "/adapter/adapter_model.safetensors")
    published = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], published[k]) for k in saved)
    assert load(run.path).generate("The lamp", max_tokens=3, seed=0)


def test_merged_lora_reproduces_the_recorded_validation_loss(book, tmp_path, tiny_model_dir):
    """load(run) merges the adapter into the base; the merged model scores the validation set as
    the run recorded it at its last step."""
    import torch.nn.functional as F

    from tunesmith.tokens import book_joiner, pack, tokenize_rows

    run = finetune(book, out=tmp_path / "run", progress=False, samples=False, dtype="fp32", lr=0.01,
                   **{**TINY, "epochs": 1})
    validations = [r["validation_loss"] for r in run.metrics() if "validation_loss" in r]
    base_loss, recorded = validations[0], validations[-1]
    model = load(run.path, dtype="fp32")
    tok = model.tokenizer
    rows = [json.loads(line) for line in (run.path / "data" / "valid.jsonl").read_text().splitlines()]
    blocks = pack(*tokenize_rows(rows, tok, book_joiner(tok)), TINY["block_size"], tok.pad_token_id)
    ids, mask = torch.from_numpy(blocks.ids), torch.from_numpy(blocks.mask)
    with torch.no_grad():
        logits = model.model(input_ids=ids[:, :-1]).logits.float()
    targets = torch.where(mask[:, 1:], ids[:, 1:], -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    assert abs(recorded - base_loss) > 1e-3  # training moved the loss, so the adapter matters
    assert loss == pytest.approx(recorded, rel=1e-5)


def test_existing_run_dir_is_refused(book, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="already exists"):
        finetune(book, out=out, progress=False, **TINY)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "options, field",
    [({"base": "no-such-model"}, None), ({"epochs": 0}, "epochs"), ({"method": "qlora"}, "method"), ({"lr": 5.0}, "lr")],
)
def test_bad_options_write_nothing(book, tmp_path, tiny_model_dir, options, field):
    with pytest.raises(TunesmithError) as info:
        finetune(book, out=tmp_path / "run", progress=False, **{**TINY, **options})
    if field:
        assert info.value.field == field
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def _weights(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def test_full_fine_tune_writes_full_weights(book, tmp_path, tiny_model_dir):
    run = finetune(book, out=tmp_path / "run", progress=False, samples=False, method="full", **{**TINY, "epochs": 1})
    assert (run.path / "model" / "config.json").exists()
    base, tuned = _weights(tiny_model_dir), _weights(run.path / "model")
    assert set(tuned) == set(base)
    for name, weight in base.items():  # every tensor is trained, in fp32 master weights
        assert tuned[name].dtype == torch.float32 and tuned[name].shape == weight.shape
        assert not torch.equal(tuned[name], weight.float()), name
    assert load(run.path).generate("The", max_tokens=3, seed=0)


def test_lora_changes_only_the_adapted_layers(book, tmp_path, tiny_model_dir):
    run = finetune(book, out=tmp_path / "run", progress=False, samples=False, **{**TINY, "epochs": 1, "dtype": "fp32"})
    base = _weights(tiny_model_dir)
    merged = {k: v for k, v in load(run.path, dtype="fp32").model.state_dict().items() if k in base}
    assert set(merged) == set(base)
    adapted = {k for k in base if k.endswith("_proj.weight")}  # "all-linear": attention and MLP projections
    assert adapted and all(not torch.equal(merged[k], base[k]) for k in adapted)
    frozen = set(base) - adapted  # embeddings (tied to the output layer) and norms
    assert frozen and all(torch.equal(merged[k], base[k]) for k in frozen)


def test_compiled_layers_train_like_eager_ones(book, tmp_path, tiny_model_dir):
    """torch.compile'd decoder layers give the same losses; validation and samples run eagerly."""
    eager = finetune(book, out=tmp_path / "eager", progress=False, compile="off", **{**TINY, "epochs": 1})
    events = []
    compiled = finetune(book, out=tmp_path / "compiled", progress=False, compile="on", on_event=events.append,
                        **{**TINY, "epochs": 1})
    assert any("compiling" in e.get("message", "") for e in events)
    assert not any("compile failed" in e.get("message", "") for e in events)
    losses = lambda run: [r["training_loss"] for r in run.metrics() if "training_loss" in r]  # noqa: E731
    assert losses(compiled) == pytest.approx(losses(eager), rel=2e-2)
    assert compiled.status == "succeeded" and "Epoch 1" in (compiled.path / "samples.md").read_text()


def test_separate_validation_file_replaces_the_held_out_share(book, tmp_path, tiny_model_dir):
    other = tmp_path / "other.txt"
    other.write_text("".join(f"A different story, chapter {i}. The ship sailed at dawn.\n\n" for i in range(6)))
    run = finetune(book, validation=other, out=tmp_path / "run", progress=False, samples=False, **{**TINY, "epochs": 1})
    rows = lambda name: [json.loads(line) for line in (run.path / "data" / name).read_text().splitlines()]  # noqa: E731
    valid_text = " ".join(r["text"] for r in rows("valid.jsonl"))
    train_text = " ".join(r["text"] for r in rows("train.jsonl"))
    assert "ship sailed at dawn" in valid_text and "ship sailed" not in train_text
    assert all(f"study number {i}." in train_text for i in range(24))  # nothing of the book held out
    assert [r for r in run.metrics() if "validation_loss" in r]
    assert not (run.path / "data" / "validation").exists()
