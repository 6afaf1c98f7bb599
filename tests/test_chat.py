"""Chat examples are trained the way they are served: the chat template over the whole
conversation, tokenized as generation tokenizes it, with the loss on the assistant's messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.chat import encode_chat
from tunesmith.errors import TunesmithError
from tunesmith.prepare import load_prepared, prepare
from tunesmith.tokens import make_blocks

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye!"},
]

# SmolLM2's template renders CONVERSATION as
#   <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
#   Hello there.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye!<|im_end|>\n
# Learned: each answer's text and its <|im_end|>; not the newline the template writes after it.
EXPECTED = [
    ("<|im_start|>", 0), ("system", 0), ("Ċ", 0), ("Be", 0), ("Ġbrief", 0), (".", 0), ("<|im_end|>", 0), ("Ċ", 0),
    ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("Hi", 0), ("<|im_end|>", 0), ("Ċ", 0),
    ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
    ("Hello", 1), ("Ġthere", 1), (".", 1), ("<|im_end|>", 1),
    ("Ċ", 0),
    ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("By", 0), ("e", 0), ("<|im_end|>", 0), ("Ċ", 0),
    ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
    ("Good", 1), ("bye", 1), ("!", 1), ("<|im_end|>", 1),
    ("Ċ", 0),
]


@pytest.fixture(scope="module")
def tokenizer(real_base_dir: Path):
    """The bundled model's own tokenizer and chat template (loading it does not load the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_base_dir))


def tokens_and_mask(tokenizer, messages, **kwargs):
    ids, mask = encode_chat(messages, tokenizer, **kwargs)
    return ids, list(zip(tokenizer.convert_ids_to_tokens(ids), [int(m) for m in mask]))


def test_the_mask_covers_each_assistant_message_token_by_token(tokenizer) -> None:
    ids, got = tokens_and_mask(tokenizer, CONVERSATION)
    assert got == EXPECTED
    # the same ids generation and the server feed the model for the whole conversation
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)


def test_each_answer_follows_exactly_the_prompt_generation_would_send(tokenizer) -> None:
    ids, _ = encode_chat(CONVERSATION, tokenizer)
    for turn, first_answer_token in ((2, "Hello"), (4, "Good")):
        prompt = tokenizer.apply_chat_template(CONVERSATION[:turn], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert ids[: len(prompt_ids)] == prompt_ids
        assert tokenizer.convert_ids_to_tokens(ids[len(prompt_ids)]) == first_answer_token


def test_an_answer_that_starts_with_newlines_is_still_learned_after_the_exact_prompt(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nYes."}]
    ids, got = tokens_and_mask(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt's last newline is not merged into the answer's
    assert got[len(prompt_ids):] == [("Ċ", 1), ("Ċ", 1), ("Yes", 1), (".", 1), ("<|im_end|>", 1), ("Ċ", 0)]
    assert not any(m for _, m in got[: len(prompt_ids)])


def test_weight_zero_leaves_an_answer_out_and_all_learns_the_rest(tokenizer) -> None:
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    _, got = tokens_and_mask(tokenizer, messages)
    expected = [(t, 1 if t in ("Good", "bye", "!") or (t == "<|im_end|>" and i == 37) else 0)
                for i, (t, _) in enumerate(EXPECTED)]
    assert got == expected
    _, everything = tokens_and_mask(tokenizer, messages, loss="all")
    hello = range(18, 22)  # "Hello there.<|im_end|>", weight 0
    assert everything == [(t, 0 if i in hello else 1) for i, (t, _) in enumerate(EXPECTED)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("weight", [2, 0.5, "1", True, None])
def test_a_weight_other_than_0_or_1_is_an_error_naming_file_line_and_field(tokenizer, tmp_path, weight) -> None:
    good = {"messages": CONVERSATION}
    bad = {"messages": [*CONVERSATION[:4], {**CONVERSATION[4], "weight": weight}]}
    source = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(TunesmithError) as err:
        prepare(source, tokenizer=tokenizer, estimate=False)
    assert (err.value.file, err.value.line, err.value.field) == (str(source), 2, "messages[4].weight")
    assert "0 or 1" in err.value.message
    assert "chat.jsonl, line 2, field 'messages[4].weight'" in str(err.value)
    assert not (tmp_path / "chat.prepared").exists()


def test_a_weight_on_a_user_message_is_an_error(tokenizer, tmp_path) -> None:
    rows = [{"messages": [{**CONVERSATION[1], "weight": 1}, CONVERSATION[2]]}]
    with pytest.raises(TunesmithError) as err:
        prepare(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tokenizer, estimate=False)
    assert err.value.field == "messages[0].weight" and "'user'" in err.value.message


def test_prepared_chat_rows_train_on_the_same_mask(tokenizer, tmp_path) -> None:
    weighted = [dict(m) for m in CONVERSATION]
    weighted[2]["weight"] = 0
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": weighted}])
    prepared = load_prepared(prepare(source, tokenizer=tokenizer, valid_fraction=0, dedupe=False, estimate=False).dir)
    assert prepared.train[1]["messages"][2]["weight"] == 0
    blocks = make_blocks(prepared.train, tokenizer, 128, "chat")
    learned = [tokenizer.convert_ids_to_tokens(blocks.ids[0][blocks.mask[0]].tolist())]
    assert learned == [["Hello", "Ġthere", ".", "<|im_end|>", "Good", "bye", "!", "<|im_end|>",
                        "Good", "bye", "!", "<|im_end|>"]]
    everything = make_blocks(prepared.train, tokenizer, 128, "chat", chat_loss="all")
    # every token but each example's first (nothing of it comes before) and the weight-0 answer
    assert int(everything.mask.sum()) == 2 * (len(EXPECTED) - 1) - 4


def test_a_long_conversation_loses_its_oldest_turns_and_keeps_the_system_message(tokenizer, tmp_path) -> None:
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question number {i}?"},
                  {"role": "assistant", "content": f"Answer number {i}."}]
    source = write_jsonl(tmp_path / "long.jsonl", [{"messages": [CONVERSATION[0], *turns]}])
    prepared = prepare(source, tokenizer=tokenizer, block_size=64, valid_fraction=0, estimate=False)
    kept = prepared.train[0]["messages"]
    assert kept[0] == CONVERSATION[0] and kept[-2:] == turns[-2:]
    assert kept[1:] == turns[len(turns) - len(kept) + 1:]  # a run of the newest turns
    assert len(encode_chat(kept, tokenizer)[0]) <= 63
    assert len(encode_chat([kept[0], *turns[len(turns) - len(kept):]], tokenizer)[0]) > 63  # one more would not fit
    found = {c["name"]: c for c in prepared.report["checks"]}
    assert found["long examples"]["message"].startswith("truncated 1 example longer than 63 tokens (the oldest turns")


def test_training_on_chat_data_records_what_it_learned(tunesmith_home, tmp_path) -> None:
    from tunesmith import finetune

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(6)]
    run = finetune(write_jsonl(tmp_path / "chat.jsonl", rows), out=tmp_path / "run", progress=False, samples=False,
                   base="tiny-llama", block_size=64, batch_size=2, epochs=1, max_steps=1, chat_loss="all")
    assert json.loads((run.path / "config.json").read_text())["chat_loss"] == "all"
    trained = [json.loads(line) for line in (run.path / "data" / "train.jsonl").read_text().splitlines()]
    assert trained and all(r["messages"] in [x["messages"] for x in rows] for r in trained)  # whole conversations
    with pytest.raises(TunesmithError) as err:
        finetune(write_jsonl(tmp_path / "chat.jsonl", rows), out=tmp_path / "other", progress=False, samples=False,
                 base="tiny-llama", block_size=64, max_steps=1, chat_loss="prompts")
    assert err.value.field == "chat_loss" and not (tmp_path / "other").exists()


def test_one_exchange_longer_than_a_block_keeps_the_answers_start_and_the_questions_end(tokenizer, tmp_path) -> None:
    question = " ".join(f"q{i}" for i in range(200))
    answer = " ".join(f"a{i}" for i in range(200))
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}]
    prepared = prepare(write_jsonl(tmp_path / "one.jsonl", rows), tokenizer=tokenizer, block_size=64,
                       valid_fraction=0, estimate=False)
    kept = prepared.train[0]["messages"]
    assert [m["role"] for m in kept] == ["user", "assistant"]
    assert kept[1]["content"] and answer.startswith(kept[1]["content"]) and len(kept[1]["content"]) < len(answer)
    assert kept[0]["content"] and question.endswith(kept[0]["content"]) and len(kept[0]["content"]) < len(question)
    assert len(encode_chat(kept, tokenizer)[0]) <= 63


def test_a_template_that_does_not_render_turn_after_turn_is_a_clear_error(real_base_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_base_dir))
    # newest message first: a conversation's rendering does not start with its beginning's
    tokenizer.chat_template = "{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    rows = [{"messages": CONVERSATION[1:3]}]
    with pytest.raises(TunesmithError) as err:
        prepare(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tokenizer, estimate=False)
    assert (err.value.line, err.value.field) == (1, "messages[1]") and "continuation" in err.value.message
    assert not (tmp_path / "c.prepared").exists()
