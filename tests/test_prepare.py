"""Turning a training file into train/valid examples with a report, as `tunesmith prepare` does."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.prepare import (
    Prepared,
    default_output,
    format_report,
    load_prepared,
    prepare,
    split_sentences,
)

SENTENCE_END = re.compile(r"[.!?]['\"\u2019\u201d)\]]*$")
REPORT_KEYS = {
    "source", "output", "format", "base", "block_size", "settings", "examples", "tokens",
    "tokens_per_example", "task", "checks", "fixes", "estimate", "files",
}


@pytest.fixture(scope="session")
def tokenizer(real_base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_base_dir))


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def sherlock(tokenizer, corpora: Path, tmp_path_factory) -> Prepared:
    out = tmp_path_factory.mktemp("sherlock") / "sherlock.prepared"
    return prepare(corpora / "sherlock.txt", out=out, tokenizer=tokenizer, block_size=256, estimate=False)


def texts(prepared: Prepared) -> list[str]:
    return [row["text"] for row in prepared.train + prepared.valid]


def checks(prepared: Prepared) -> dict[str, dict]:
    return {c["name"]: c for c in prepared.report["checks"]}


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- a whole book ----------------------------------------------------------------------------


def test_sherlock_examples_are_clean_text(sherlock: Prepared) -> None:
    all_text = "\n\n".join(texts(sherlock))
    assert "gutenberg" not in all_text.lower() and "literary archive foundation" not in all_text.lower()
    assert "\ufeff" not in all_text and "\r" not in all_text
    assert "To Sherlock Holmes she is always THE woman." in all_text
    for text in texts(sherlock):
        for paragraph in text.split("\n\n"):
            assert not re.search(r"\n[a-z]", paragraph), paragraph  # no mid-sentence line breaks
        assert SENTENCE_END.search(text), text[-80:]  # every example ends a sentence


def test_sherlock_examples_fit_the_block_and_are_packed(sherlock: Prepared, tokenizer) -> None:
    counts = [count(tokenizer, t) for t in texts(sherlock)]
    assert max(counts) <= 255  # block size 256, one token left for EOS
    assert sum(counts) / len(counts) > 180  # paragraphs are packed, not one example per line
    report = sherlock.report
    assert report["tokens"]["train"] + report["tokens"]["valid"] == sum(counts)
    assert report["tokens_per_example"]["max"] == max(counts)
    assert report["tokens_per_example"]["min"] == min(counts)
    assert 120_000 < sum(counts) < 150_000


def test_sherlock_report_and_files(sherlock: Prepared) -> None:
    report = sherlock.report
    assert set(report) == REPORT_KEYS
    assert report["format"] == "book" and report["block_size"] == 256 and report["estimate"] is None
    n = report["examples"]["train"] + report["examples"]["valid"]
    assert 0.04 * n < report["examples"]["valid"] < 0.06 * n  # --valid-fraction 0.05
    assert len(sherlock.train) == report["examples"]["train"]
    assert any("Project Gutenberg header" in fix for fix in report["fixes"])
    assert checks(sherlock)["size"]["status"] == "ok"
    assert checks(sherlock)["task"]["message"] == "open-ended generation"
    files = sorted(p.name for p in sherlock.dir.iterdir())
    assert files == ["examples-train.npy", "examples-valid.npy", "report.json", "tokens-train-00000.bin",
                     "tokens-valid-00000.bin", "tokens.json", "train.jsonl", "valid.jsonl"]
    assert json.loads((sherlock.dir / "report.json").read_text()) == report
    loaded = load_prepared(sherlock.dir)
    assert loaded.train == sherlock.train and loaded.valid == sherlock.valid and loaded.report == report
    text = format_report(report)
    assert f"{report['examples']['train']:,} train" in text and "removed UTF-8 BOM" in text
    assert "ok       task: open-ended generation" in text


def test_fraction_keeps_the_first_half(sherlock: Prepared, tokenizer, corpora: Path, tmp_path: Path) -> None:
    half = prepare(corpora / "sherlock.txt", out=tmp_path / "half", tokenizer=tokenizer, block_size=256,
                   fraction=0.5, estimate=False)
    full_tokens = sum(sherlock.report["tokens"].values())
    half_tokens = sum(half.report["tokens"].values())
    assert 0.45 < half_tokens / full_tokens < 0.55
    assert set(texts(half)) <= set(texts(sherlock))
    joined = "\n".join(texts(half))
    assert "To Sherlock Holmes she is always THE woman." in joined
    assert "considerable success." not in joined  # the last line of the book
    assert checks(half)["subset"]["message"].startswith("kept the first")


def test_max_tokens(tokenizer, corpora: Path, tmp_path: Path) -> None:
    few = prepare(corpora / "sherlock.txt", out=tmp_path / "few", tokenizer=tokenizer, block_size=256,
                  max_tokens=5_000, estimate=False)
    total = sum(few.report["tokens"].values())
    assert 4_000 < total <= 5_000
    assert checks(few)["size"]["status"] == "warning"  # under 20k tokens


def test_split_is_seeded(sherlock: Prepared, tokenizer, corpora: Path, tmp_path: Path) -> None:
    again = prepare(corpora / "sherlock.txt", out=tmp_path / "a", tokenizer=tokenizer, block_size=256, estimate=False)
    other = prepare(corpora / "sherlock.txt", out=tmp_path / "b", tokenizer=tokenizer, block_size=256, seed=1,
                    estimate=False)
    assert again.valid == sherlock.valid and again.train == sherlock.train
    assert other.valid != sherlock.valid
    assert sorted(texts(other)) == sorted(texts(sherlock))  # same examples, split differently


def test_small_blocks_split_paragraphs_at_sentences(tokenizer, corpora: Path, tmp_path: Path) -> None:
    small = prepare(corpora / "sherlock.txt", out=tmp_path / "s", tokenizer=tokenizer, block_size=48,
                    estimate=False)
    all_texts = texts(small)
    assert max(count(tokenizer, t) for t in all_texts) <= 47
    ending = sum(bool(SENTENCE_END.search(t)) for t in all_texts)
    assert ending / len(all_texts) > 0.9  # only over-long sentences are cut at word breaks
    assert checks(small)["long examples"]["status"] == "fixed"


def test_shakespeare_keeps_speakers_on_their_own_lines(tokenizer, corpora: Path, tmp_path: Path) -> None:
    play = prepare(corpora / "tinyshakespeare.txt", out=tmp_path / "p", tokenizer=tokenizer, block_size=512,
                   estimate=False)
    joined = "\n\n".join(texts(play))
    assert "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak." in joined
    assert not re.search(r"[a-z] (First|Second) Citizen: ", joined)
    assert "in an ass's pack-saddle. Yet" in joined


def test_long_book_paragraph_and_sentence(tokenizer, tmp_path: Path) -> None:
    sentence = "The cat sat on the mat and looked at the dog. "
    giant_sentence = " ".join(f"word{i}" for i in range(200)) + "."
    content = "Chapter One\n\n" + sentence * 30 + "\n\n" + giant_sentence + "\n\nThe end.\n"
    prepared = prepare(write(tmp_path, "b.txt", content), out=tmp_path / "o", tokenizer=tokenizer,
                       block_size=64, valid_fraction=0, estimate=False)
    rows = texts(prepared)
    assert all(count(tokenizer, t) <= 63 for t in rows)
    assert rows[0].startswith("Chapter One\n\nThe cat sat on the mat")  # the heading goes with what follows
    assert rows[0].endswith("at the dog.")
    words = [w for r in rows for w in r.split() if w.startswith("word")]
    assert words == [f"word{i}" for i in range(199)] + ["word199."]  # nothing lost when cut at word breaks
    assert rows[-1].endswith("The end.")
    assert "(1 over-long sentence at word breaks)" in checks(prepared)["long examples"]["message"]


def test_split_sentences_keeps_abbreviations_and_whitespace() -> None:
    text = 'Mr. Holmes said "Yes." Then he left! It was 3 p.m. I. Adler came.\nA new line? yes.'
    assert split_sentences(text) == [
        ("", 'Mr. Holmes said "Yes."'),
        (" ", "Then he left!"),
        (" ", "It was 3 p.m. I. Adler came."),
        ("\n", "A new line? yes."),
    ]


# --- legacy formats round-trip ---------------------------------------------------------------

PAIRS = [{"prompt": f"Question {i}?\n\n###\n\n", "completion": f" Answer number {i}.\n"} for i in range(5)]


@pytest.mark.parametrize(
    "name,content",
    [
        ("pc.jsonl", jsonl(PAIRS)),
        ("pc.json", json.dumps(PAIRS, indent=2)),
        ("pc.csv", "prompt,completion\n" + "".join(
            f'"{r["prompt"]}","{r["completion"]}"\n' for r in PAIRS)),
        ("pc.tsv", "prompt\tcompletion\n" + "".join(
            f'"{r["prompt"]}"\t"{r["completion"]}"\n' for r in PAIRS)),
    ],
)
def test_prompt_completion_round_trips(tokenizer, tmp_path: Path, name: str, content: str) -> None:
    prepared = prepare(write(tmp_path, name, content), tokenizer=tokenizer, valid_fraction=0.2, estimate=False)
    assert prepared.dir == tmp_path / f"{name.split('.')[0]}.prepared"
    assert prepared.report["format"] == "prompt_completion"
    assert sorted(prepared.train + prepared.valid, key=lambda r: r["prompt"]) == PAIRS
    assert len(prepared.valid) == 1
    loaded = load_prepared(prepared.dir)
    assert loaded.train == prepared.train and loaded.valid == prepared.valid
    found = checks(prepared)
    assert found["separator"]["status"] == "ok" and "###\\n\\n'" in found["separator"]["message"]
    assert found["stop sequence"]["status"] == "ok" and "'.\\n'" in found["stop sequence"]["message"]
    assert found["leading space"]["status"] == "ok"
    assert found["size"]["status"] == "warning" and "100" in found["size"]["message"]
    assert prepared.report["task"] == "conditional generation"


def test_text_rows_round_trip_and_long_ones_split(tokenizer, tmp_path: Path) -> None:
    long_text = "".join(f"Sentence {i} of part one. " for i in range(40)) + "\n\n" + "".join(
        f"Sentence {i} of part two. " for i in range(40))
    rows = [{"text": "A short one."}, {"text": long_text.strip()}, {"text": "   "}, {"text": "A short one."}]
    prepared = prepare(write(tmp_path, "t.jsonl", jsonl(rows)), tokenizer=tokenizer, block_size=128,
                       valid_fraction=0, estimate=False)
    out = [r["text"] for r in prepared.train]
    assert out[0] == "A short one."
    assert len(out) > 3 and all(count(tokenizer, t) <= 127 for t in out)
    assert " ".join(" ".join(out[1:]).split()) == " ".join(long_text.split())
    found = checks(prepared)
    assert found["duplicates"]["message"] == "removed 1 duplicate example (same text up to whitespace)"
    assert found["empty"]["message"] == "removed 1 empty text"
    assert found["validation"]["status"] == "warning"


def test_chat_rows_use_the_chat_template(tokenizer, tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Hi {i}"},
                      {"role": "assistant", "content": f"Hello {i}."}]}
        for i in range(3)
    ]
    prepared = prepare(write(tmp_path, "c.jsonl", jsonl(rows)), tokenizer=tokenizer, valid_fraction=0,
                       estimate=False)
    assert prepared.report["format"] == "chat"
    first = prepared.train[0]
    expected = tokenizer.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert first["prompt"] == expected and first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["completion"] == "Hello 0." + tokenizer.eos_token
    assert load_prepared(prepared.dir).train == prepared.train


def test_chat_must_end_with_the_assistant(tokenizer, tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
    ]
    with pytest.raises(TunesmithError) as err:
        prepare(write(tmp_path, "c.jsonl", jsonl(rows)), tokenizer=tokenizer, estimate=False)
    assert err.value.line == 2 and err.value.field == "messages" and "'user'" in err.value.message
    assert not (tmp_path / "c.prepared").exists()


def test_prompt_completion_checks_recommend(tokenizer, tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Review {i}: it was {'good' if i % 2 else 'bad'}", "completion": "positive" if i % 2 else "negative"}
        for i in range(40)
    ]
    rows += [{"prompt": "Review x: meh", "completion": ""}, rows[0], {"prompt": "long " * 300, "completion": " ok"}]
    prepared = prepare(write(tmp_path, "r.jsonl", jsonl(rows)), tokenizer=tokenizer, block_size=64,
                       estimate=False)
    found = checks(prepared)
    assert found["separator"]["status"] == "warning" and "###" in found["separator"]["message"]
    assert found["stop sequence"]["status"] == "warning"
    assert found["leading space"]["status"] == "warning" and found["leading space"]["message"].startswith("40 of 41")
    assert found["empty"]["message"] == "removed 1 example with an empty completion"
    assert found["duplicates"]["message"] == "removed 1 duplicate example (same text up to whitespace)"
    assert found["long examples"]["status"] == "fixed" and "truncated 1 " in found["long examples"]["message"]
    assert prepared.report["task"] == "classification"
    long_row = next(r for r in prepared.train + prepared.valid if r["completion"] == " ok")
    assert count(tokenizer, long_row["prompt"]) + count(tokenizer, long_row["completion"]) <= 63
    assert long_row["prompt"].endswith("long ")  # the end of the prompt is kept


def test_extra_columns_are_reported(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "text,author\nOne sentence.,me\nTwo sentences.,you\n")
    prepared = prepare(path, tokenizer=tokenizer, estimate=False)
    column = checks(prepared)["columns"]
    assert column["status"] == "warning" and "'author' (2 records)" in column["message"]


# --- settings, errors and atomic output ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": float("nan")}, "fraction"),
        ({"valid_fraction": 0.6}, "valid_fraction"),
        ({"block_size": 8}, "block_size"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_settings_name_their_field(tokenizer, tmp_path: Path, kwargs: dict, field: str) -> None:
    path = write(tmp_path, "t.jsonl", jsonl([{"text": "Hello."}]))
    with pytest.raises(TunesmithError) as err:
        prepare(path, tokenizer=tokenizer, estimate=False, **kwargs)
    assert err.value.field == field
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_existing_output_needs_overwrite(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", jsonl([{"text": "Hello there."}, {"text": "General Kenobi."}]))
    first = prepare(path, tokenizer=tokenizer, estimate=False)
    assert first.dir == default_output(path)
    write(tmp_path, "t.jsonl", jsonl([{"text": "Something else."}]))
    with pytest.raises(TunesmithError) as err:
        prepare(path, tokenizer=tokenizer, estimate=False)
    assert "--overwrite" in err.value.hint
    assert load_prepared(first.dir).train == first.train  # untouched
    second = prepare(path, tokenizer=tokenizer, estimate=False, overwrite=True)
    assert load_prepared(second.dir).train == [{"text": "Something else."}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.prepared"]


def test_overwrite_refuses_a_directory_that_is_not_prepared(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", jsonl([{"text": "Hello."}]))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(TunesmithError, match="not a prepared data set"):
        prepare(path, out=precious, tokenizer=tokenizer, estimate=False, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    "name,content,line",
    [
        ("m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n', 3),
        ("m.txt", "", None),
        ("m.csv", "question\nq\n", 1),
    ],
)
def test_errors_leave_nothing_behind(tokenizer, tmp_path: Path, name: str, content: str, line) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(TunesmithError) as err:
        prepare(path, tokenizer=tokenizer, estimate=False)
    assert err.value.line == line
    if line:
        assert f"line {line}" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_and_binary_files(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match="no such file"):
        prepare(tmp_path / "missing.txt", tokenizer=tokenizer, estimate=False)
    (tmp_path / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(TunesmithError, match="binary"):
        prepare(tmp_path / "b.txt", tokenizer=tokenizer, estimate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]


def test_failure_while_writing_leaves_no_temp_dir(tokenizer, tmp_path: Path, monkeypatch) -> None:
    prep = sys.modules["tunesmith.prepare"]  # (the package re-exports the function under the same name)

    def broken(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "write_json", broken)
    path = write(tmp_path, "t.jsonl", jsonl([{"text": "Hello."}]))
    with pytest.raises(TunesmithError, match="the disk is full"):
        prepare(path, tokenizer=tokenizer, estimate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_load_prepared_names_bad_rows(tokenizer, tmp_path: Path) -> None:
    prepared = prepare(write(tmp_path, "t.jsonl", jsonl([{"text": "One."}, {"text": "Two."}])), tokenizer=tokenizer,
                       valid_fraction=0, estimate=False)
    train = prepared.dir / "train.jsonl"
    train.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(TunesmithError) as err:
        load_prepared(prepared.dir)
    assert err.value.file == str(train) and err.value.line == 2 and err.value.field == "text"
    train.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(TunesmithError) as err:
        load_prepared(prepared.dir)
    assert err.value.line == 2
    with pytest.raises(TunesmithError, match="no such prepared directory"):
        load_prepared(tmp_path / "nothing")


# --- the training-time estimate --------------------------------------------------------------


def test_estimate_is_called_with_the_prepared_data(tokenizer, tmp_path: Path) -> None:
    calls = []

    def estimate(prepared):
        calls.append((prepared.report["base"], prepared.report["block_size"], len(prepared.train)))
        return {"seconds": 750.0, "tokens_per_second": 1234.0, "basis": "measured on this machine"}

    prepared = prepare(write(tmp_path, "t.jsonl", jsonl([{"text": "Hello there."}])), tokenizer=tokenizer,
                       block_size=128, base="my-base", estimate=estimate)
    assert calls == [("my-base", 128, 1)]
    assert prepared.report["estimate"]["seconds"] == 750.0
    assert load_prepared(prepared.dir).report["estimate"]["seconds"] == 750.0
    assert "about 12 min" in format_report(prepared.report) and "1,234 tokens/s" in format_report(prepared.report)


def test_estimate_failure_is_a_warning_not_an_error(tokenizer, tmp_path: Path) -> None:
    def estimate(prepared):
        raise TunesmithError("base model 'nope' is not installed")

    prepared = prepare(write(tmp_path, "t.jsonl", jsonl([{"text": "Hello there."}])), tokenizer=tokenizer, base="nope",
                       estimate=estimate)
    assert prepared.report["estimate"] is None
    assert checks(prepared)["estimate"]["message"] == "no training-time estimate: base model 'nope' is not installed"
    assert load_prepared(prepared.dir).report == prepared.report


def test_no_estimate_unless_asked(tokenizer, tmp_path: Path) -> None:
    prepared = prepare(write(tmp_path, "t.jsonl", jsonl([{"text": "Hello there."}])), tokenizer=tokenizer)
    assert prepared.report["estimate"] is None
    assert "Estimated" not in format_report(prepared.report)


# --- hyphenation on a real book ----------------------------------------------------------------

WORD_AT_START = re.compile(r"^([a-z]{8,})\b")
COMPOUND_AT_START = re.compile(r"^([A-Za-z]+-)([A-Za-z]+)\b")
DASH_AT_START = re.compile(r"^([A-Za-z]+--)([A-Za-z])")


def test_sherlock_hyphenated_at_line_ends_reads_back_as_written(
    sherlock: Prepared, tokenizer, corpora: Path, tmp_path: Path
) -> None:
    """Sherlock with words split across line breaks, as a printer would, gives back the same text.

    The split words: long words cut in the middle ("suspi-/cion"), compounds the book also spells
    with a hyphen inside a line ("to-/morrow") and "--" dashes, each moved to the end of the line
    before.
    """
    lines = (corpora / "sherlock.txt").read_text(encoding="utf-8-sig").replace("\r\n", "\n").split("\n")
    source = "\n".join(lines)
    moved = {"word": [], "compound": [], "dash": []}
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    for i in range(start + 1, end - 1):  # the book, not the Project Gutenberg licence
        prev, line = lines[i], lines[i + 1]
        if len(prev) < 60 or not line or prev.endswith(("-", "--")) or len(line.split()) < 2:
            continue
        word, compound, dash = WORD_AT_START.match(line), COMPOUND_AT_START.match(line), DASH_AT_START.match(line)
        if compound and re.search(r"[^\n]" + re.escape(compound.group(0)), source):  # also inside a line
            head = rest = compound.group(1)  # "to-" | "day ..."
            moved["compound"].append(compound.group(0))
        elif dash:
            head = rest = dash.group(1)  # "fire--" | "burned ..."
            moved["dash"].append(line.split()[0])
        elif word:
            rest = word.group(1)[: len(word.group(1)) // 2]  # "suspi-" | "cion ..."
            head = rest + "-"
            moved["word"].append(word.group(1))
        else:
            continue
        lines[i], lines[i + 1] = prev + " " + head, line[len(rest):]
    assert len(moved["word"]) > 300 and len(moved["compound"]) > 20 and len(moved["dash"]) > 5, moved
    assert "suspicion" in moved["word"] and "to-morrow" in moved["compound"]
    hyphenated = tmp_path / "sherlock-hyphenated.txt"
    hyphenated.write_text("\n".join(lines), encoding="utf-8")

    again = prepare(hyphenated, out=tmp_path / "h", tokenizer=tokenizer, block_size=256, estimate=False)
    assert texts(again) == texts(sherlock)
    assert f"joined {len(moved['word'])} words hyphenated across line breaks" in again.report["fixes"]


# --- counts worked out by hand, with one token per character ------------------------------------


class CharTokenizer:
    """One token per character, so every count below can be worked out by hand."""

    eos_token, eos_token_id, chat_template, model_max_length = "\x03", 3, None, 100_000

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_report_counts_match_hand_computed_values(tmp_path: Path) -> None:
    # Ten distinct pairs: "Q0:" .. "Q9:" (3 characters) with " yes." (5) for even i, " no." (4) for odd i,
    # so five examples of 8 tokens and five of 7 (75 tokens); then a copy of pair 0 that differs only in
    # whitespace, an empty completion, and one pair of 3 + 40 = 43 tokens cut to fit block size 32.
    rows = [{"prompt": f"Q{i}:", "completion": " yes." if i % 2 == 0 else " no."} for i in range(10)]
    rows += [{"prompt": "Q0: ", "completion": "  yes. "}, {"prompt": "Q10:", "completion": " "}]
    rows += [{"prompt": "Q11", "completion": " " + "z" * 39}]
    prepared = prepare(write(tmp_path, "p.jsonl", jsonl(rows)), tokenizer=CharTokenizer(), block_size=32,
                       valid_fraction=0.2, estimate=False)
    report = prepared.report
    # 11 examples after dedupe; 20% of 11 is 2.2, so 2 are held out and 9 trained on
    assert report["examples"] == {"train": 9, "valid": 2}
    # the long pair keeps 23 of its 40 completion characters (3/4 of the 31-token budget) and the
    # last 8 characters of the prompt that fit: the whole 3-character prompt, 26 tokens in all
    long_row = next(r for r in prepared.train + prepared.valid if r["prompt"] == "Q11")
    assert long_row["completion"] == " " + "z" * 22
    assert sum(report["tokens"].values()) == 75 + 26
    assert report["tokens_per_example"] == {"min": 7, "mean": 9.2, "max": 26}
    found = checks(prepared)
    assert found["duplicates"]["message"] == "removed 1 duplicate example (same text up to whitespace)"
    assert found["empty"]["message"] == "removed 1 example with an empty completion"
    assert found["long examples"]["message"].startswith("truncated 1 example longer than 31 tokens")
    assert found["validation"]["message"] == "2 examples held out at random (seed 0)"
    assert found["size"]["message"].startswith("only 11 examples;")


def test_split_never_puts_copies_of_one_example_on_both_sides(tmp_path: Path) -> None:
    # With dedupe off, each of 20 examples appears three times (once with extra spaces); whatever
    # the seed, every copy of an example lands on the same side of the split.
    rows = []
    for i in range(20):
        rows += [{"text": f"Example number {i}."}, {"text": f"Example number {i}."}, {"text": f"Example  number {i}. "}]
    for seed in range(5):
        prepared = prepare(write(tmp_path, "d.jsonl", jsonl(rows)), out=tmp_path / f"o{seed}",
                           tokenizer=CharTokenizer(), valid_fraction=0.2, dedupe=False, seed=seed, estimate=False)
        norm = lambda rs: {" ".join(r["text"].split()) for r in rs}  # noqa: E731
        assert not norm(prepared.train) & norm(prepared.valid)
        assert len(norm(prepared.valid)) == 4 and len(prepared.valid) == 12  # 20% of 20 examples, 3 copies each
        assert checks(prepared)["duplicates"]["status"] == "warning"
        assert checks(prepared)["duplicates"]["message"].startswith("40 duplicate examples kept")


def test_a_long_text_is_counted_by_its_prefix_only_when_that_settles_it(tokenizer) -> None:
    """``fit`` agrees with counting each text whole: the same count for a text that fits the
    budget, more than the budget for one that does not (a 300 KB text is not tokenized whole)."""
    from tunesmith.prepare import _TokenCounter

    counter = _TokenCounter(tokenizer, 1023)
    words = " ".join(f"w{i}" for i in range(60_000))  # ~400 KB, far over a block
    spaces = "a" + " " * 70_000 + "b"  # long, but a handful of tokens: counted whole
    texts = ["A short paragraph.", words, words[: 3000], spaces, "x" * 80_000]
    whole = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    fitted = counter.fit(texts)
    for text, n, m in zip(texts, whole, fitted):
        assert m == n if n <= 1023 else m > 1023, (len(text), n, m)
    assert fitted[1] < whole[1]  # the long text of words was counted by a prefix
