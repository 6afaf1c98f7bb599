"""Prompt/completion and chat records: packed apart, so no example sees the one before it;
and a separate validation file that shares examples with the training data is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunesmith import finetune
from tunesmith.tokens import make_blocks, pack_examples
from tunesmith.train import lm_loss, segment_mask

# --- packing whole examples --------------------------------------------------------------------


def test_examples_are_packed_whole_each_in_its_own_segment() -> None:
    examples = [([1, 2, 3], [False, True, True]), ([4, 5], [True, True]), ([6, 7, 8, 9], [True] * 4)]
    blocks = pack_examples(examples, block_size=4, pad_id=0)  # rows of 5 tokens
    assert blocks.ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert blocks.segments.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert blocks.positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # an example's first token is never a target (4 would be predicted from 3, across examples)
    assert blocks.mask.tolist() == [[False, True, True, False, True], [False, True, True, True, False]]


def test_an_example_longer_than_a_row_is_cut_with_every_token_a_target_once() -> None:
    ids = list(range(10, 22))  # 12 tokens, rows of 5
    blocks = pack_examples([(ids, [True] * 12)], block_size=4, pad_id=0)
    assert blocks.ids.tolist() == [[10, 11, 12, 13, 14], [14, 15, 16, 17, 18], [18, 19, 20, 21, 0]]
    targets = blocks.ids[:, 1:][blocks.mask[:, 1:]]
    assert targets.tolist() == list(range(11, 22))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_books_pack_across_paragraphs_and_records_apart(tokenizer) -> None:
    texts = [{"text": "One paragraph of the book."}, {"text": "And the next one."}]
    book = make_blocks(texts, tokenizer, 64, "book")
    assert book.segments is None and book.ids.shape == (1, 65)  # one causal stream
    pairs = [{"prompt": "Q: one\nA:", "completion": " yes."}, {"prompt": "Q: two\nA:", "completion": " no."}]
    records = make_blocks(pairs, tokenizer, 64, "prompt_completion")
    assert records.segments is not None and set(records.segments[0].tolist()) == {0, 1, 2}  # two + padding


# --- the tiny model: example 2 is the same with or without example 1 before it --------------------


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, attn_implementation=request.param
    )
    return model.eval()


def _logits(model, blocks) -> torch.Tensor:
    ids, seg, pos = (torch.from_numpy(a[:, :-1]) for a in (blocks.ids, blocks.segments, blocks.positions))
    hidden = model.model(input_ids=ids, attention_mask=segment_mask(seg, model), position_ids=pos).last_hidden_state
    return model.lm_head(hidden)


def test_example_two_does_not_see_example_one(model, tokenizer) -> None:
    from tunesmith.tokens import encode_example

    first = encode_example({"prompt": "The first question is long and about ships:", "completion": " sails."}, tokenizer)
    second = encode_example({"prompt": "Second:", "completion": " a dog barked twice."}, tokenizer)
    n = len(second[0])
    both = pack_examples([first, second], block_size=64, pad_id=0)
    assert both.ids.shape[0] == 1 and both.segments[0, len(first[0])] == 1  # one row, example 2 after example 1

    with torch.no_grad():
        # the reference: example 2 run alone through the plain causal model, no mask, no positions
        alone_ids = torch.tensor([second[0]])
        alone = model(input_ids=alone_ids).logits[0]
        packed = _logits(model, both)[0, len(first[0]) : len(first[0]) + n]
        assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()

        # the loss of example 2's targets alone, against cross-entropy of the reference logits
        targets = torch.tensor(second[0][1:])
        keep = torch.tensor(second[1][1:])
        want = F.cross_entropy(alone[:-1][keep], targets[keep], reduction="sum")
        only_two = both.mask.copy()
        only_two[0, : len(first[0])] = False
        args = [torch.from_numpy(a) for a in (both.ids, only_two, both.segments, both.positions)]
        got, _, count = lm_loss(model, args[0], args[1], torch.float32, args[2], args[3])
        assert count == int(keep.sum()) and torch.allclose(got, want, rtol=1e-5)

        # and without segments (one causal stream, as before) example 2 does see example 1
        stream = torch.tensor([first[0] + second[0]])
        mixed = model(input_ids=stream).logits[0, len(first[0]) :]
        assert not torch.allclose(mixed, alone, atol=1e-3)


# --- a separate validation file that shares examples with the training data ----------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_validation_file_sharing_examples_is_reported(tmp_path: Path, tiny_model_dir: Path) -> None:
    train_rows = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(12)]
    valid_rows = [
        {"prompt": "Question 3:", "completion": " answer 3."},
        {"prompt": "Question  5: ", "completion": " answer 5. "},  # the same up to whitespace
        {"prompt": "Question 99:", "completion": " answer 99."},
    ]
    events: list[dict] = []
    run = finetune(
        _jsonl(tmp_path / "train.jsonl", train_rows), validation=_jsonl(tmp_path / "valid.jsonl", valid_rows),
        out=tmp_path / "run", progress=False, samples=False, on_event=events.append,
        base="tiny-llama", block_size=64, batch_size=2, epochs=1, max_steps=1,
    )
    expected = (
        "2 examples of 3 in the validation file are also in the training data, so validation loss will look "
        "better than it is; remove them from one of the two files"
    )
    assert f"warning: {expected}" in [e.get("message") for e in events]
    check = {c["name"]: c for c in run.config["data"]["report"]["checks"]}["validation"]
    assert check == {"name": "validation", "status": "warning", "message": expected}
    saved = json.loads((run.path / "data" / "report.json").read_text())
    assert {c["name"]: c for c in saved["checks"]}["validation"] == check


def test_validation_file_without_shared_examples_is_ok(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from tunesmith.train import TrainConfig, load_data

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    train = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"Q{i}:", "completion": f" {i}."} for i in range(5)])
    valid = _jsonl(tmp_path / "v.jsonl", [{"prompt": "Q9:", "completion": " 9."}])
    data = load_data(train, TrainConfig(base="tiny-llama"), tok, tmp_path / "data", valid)
    assert data["warnings"] == []
    check = {c["name"]: c for c in data["report"]["checks"]}["validation"]
    assert check["status"] == "ok" and check["message"] == "1 example from the validation file, none in the training data"
    assert len(data["train"]) == 5
