"""The copy finder: planted passages are found with their source lines, figures match brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunesmith.copies import CopyIndex, find_copies, novelty_from_lengths, suffix_array
from tunesmith.errors import TunesmithError

# Sentences written for these tests; none shares 12 tokens with the book.
OWN = [
    "My neighbour repaired her bicycle on a wet Tuesday while the radio played jazz.",
    "Nobody in our office could explain why the printer only jammed on Fridays.",
    "We ordered noodles, argued about football, and walked home under orange streetlights.",
    "The spreadsheet had three hundred rows and not one of them added up.",
]
# Passages of sherlock.txt as a reader would copy them (hard-wrapped), with the line each starts
# on, the line it ends on and the heading above it, read off the file by hand.
RED_HEADED = (
    "very stay-at-home man, and as my business came to me instead of\n"
    "my having to go to it, I was often weeks on end without putting\n"
    "my foot over the door-mat."
)
SWANDAM = (
    "Upper Swandam Lane is a vile alley lurking behind the\n"
    "high wharves which line the north side of the river to the east\n"
    "of London Bridge. Between a slop-shop and a gin-shop, approached\n"
    "by a steep flight of steps leading down to a black gap like the\n"
    "mouth of a cave, I found the den of which I was in search."
)
THE_WOMAN = "To Sherlock Holmes she is always THE woman. I have seldom heard\nhim mention her under any other name."
PLANTED = [
    (RED_HEADED, 1410, 1412, "ADVENTURE II. THE RED-HEADED LEAGUE"),
    (SWANDAM, 5205, 5209, "ADVENTURE VI. THE MAN WITH THE TWISTED LIP"),
    (THE_WOMAN, 62, 63, "ADVENTURE I. A SCANDAL IN BOHEMIA"),
]


@pytest.fixture(scope="module")
def sherlock(corpora, real_base_dir, tmp_path_factory) -> Path:
    """The book prepared with nothing held out, so every passage is training text."""
    from tunesmith.prepare import prepare

    out = tmp_path_factory.mktemp("copies") / "sherlock.prepared"
    prepare(corpora / "sherlock.txt", out=out, valid_fraction=0.0, estimate=False)
    return out


@pytest.fixture(scope="module")
def index(sherlock) -> CopyIndex:
    return CopyIndex.open(sherlock)


def test_three_planted_passages_are_found_with_their_lines_and_nothing_else(index):
    parts = [OWN[0], RED_HEADED, OWN[1], OWN[2], SWANDAM, OWN[3], THE_WOMAN, OWN[0]]
    text = "\n\n".join(parts)
    report = index.check(text)
    assert len(report.spans) == 3, [s.text for s in report.spans]
    by_start = sorted(report.spans, key=lambda s: s.start)
    for span, (passage, line, end_line, heading) in zip(by_start, PLANTED):
        assert span.text == passage
        assert span.start == text.index(passage) and span.end == span.start + len(passage)
        assert span.count == 1
        assert span.n_words == len(passage.split())
        (where,) = span.locations
        assert (where.file, where.line, where.end_line, where.heading) == ("sherlock.txt", line, end_line, heading)
    assert report.longest.text == SWANDAM
    # the copied tokens are the passages' tokens (each follows a space in the checked text)
    def encode(t):
        return index.tokenizer.encode(" ".join(t.split()), add_special_tokens=False).ids

    copied = sum(len(encode(" " + passage)) for passage, *_ in PLANTED)
    assert report.n_tokens == len(encode(text))
    assert report.copy_rate == pytest.approx(copied / report.n_tokens)


def test_text_without_copies_has_no_spans_and_full_novelty(index):
    report = index.check(" ".join(OWN))
    assert report.spans == [] and report.longest is None and report.copy_rate == 0.0
    assert report.novelty[32] == 1.0 and report.novelty[16] == 1.0


def test_a_passage_across_a_paragraph_break_is_one_span(index):
    # lines 9005-9009; the book has a blank line between "fellow-countryman." and "Colonel"
    passage = (
        "but I could see from the little that he said that he was at least a fellow-countryman. "
        '"Colonel Lysander Stark stopped at last before a low door, which he unlocked.'
    )
    report = index.check(f"{OWN[1]} {passage} {OWN[2]}")
    (span,) = report.spans
    assert span.text == passage
    (where,) = span.locations
    assert (where.line, where.end_line) == (9005, 9009)
    assert where.heading == "IX. THE ADVENTURE OF THE ENGINEER'S THUMB"


def test_a_passage_with_a_capital_added_at_its_start_keeps_its_first_word(index):
    # line 5211 starts "the centre by the ceaseless tread"; the copy starts a sentence
    passage = (
        "The centre by the ceaseless tread of drunken feet; and by the light of a flickering "
        "oil-lamp above the door I found the latch"
    )
    text = f"{OWN[3]} {passage} but laughed."
    (span,) = index.check(text).spans
    assert span.text == passage
    assert span.locations[0].line == 5211


def test_a_copy_at_the_very_start_of_the_text_keeps_its_first_word(index):
    (span,) = index.check(RED_HEADED + " " + OWN[0]).spans
    assert span.text == RED_HEADED and span.start == 0


def test_text_in_another_script_is_all_novel(index):
    report = index.check("東京の古い書店で、彼女は一冊の地図を見つけた。誰もその道を知らなかった。")
    assert report.spans == [] and report.copy_rate == 0.0
    assert all(value == 1.0 for n, value in report.novelty.items() if n >= 8)


def test_min_tokens_decides_what_counts(index):
    short = "I have seldom heard him mention her"  # 7 words of line 62
    text = f"{OWN[0]} {short} {OWN[1]}"
    assert index.check(text).spans == []
    (span,) = index.check(text, min_tokens=5).spans
    assert span.text == short and span.locations[0].line == 62
    # a threshold above the 64 tokens searched at once
    long_text = f"{OWN[0]} {SWANDAM} {OWN[1]}"
    n = len(index.tokenizer.encode(" " + " ".join(SWANDAM.split()), add_special_tokens=False).ids)
    assert n > 64
    assert [s.text for s in index.check(long_text, min_tokens=n).spans] == [SWANDAM]
    assert index.check(long_text, min_tokens=n + 1).spans == []


def test_a_repeated_phrase_is_counted(index):
    for phrase in ("I have no doubt that", "said Holmes", "Sherlock Holmes"):
        key = np.asarray(index.tokenizer.encode(" " + phrase, add_special_tokens=False).ids)
        lo, hi = index.occurrences(key)
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(index.tokens), len(key))
        assert hi[0] - lo[0] == int((windows == key).all(axis=1).sum()) > 1


# --- against brute force ------------------------------------------------------------------


def _brute_lengths(corpus: list[list[int]], query: list[int]) -> list[int]:
    def occurs(piece):
        k = len(piece)
        return any(doc[j : j + k] == piece for doc in corpus for j in range(len(doc) - k + 1))

    out = []
    for i in range(len(query)):
        n = 0
        while i + n < len(query) and occurs(query[i : i + n + 1]):
            n += 1
        out.append(n)
    return out


def _brute_novelty(corpus: list[list[int]], query: list[int], n: int) -> float:
    grams = {tuple(doc[j : j + n]) for doc in corpus for j in range(len(doc) - n + 1)}
    mine = [tuple(query[i : i + n]) for i in range(len(query) - n + 1)]
    return sum(g not in grams for g in mine) / len(mine)


def _brute_copy_rate(corpus: list[list[int]], query: list[int], min_tokens: int) -> float:
    grams = {tuple(doc[j : j + min_tokens]) for doc in corpus for j in range(len(doc) - min_tokens + 1)}
    covered = set()
    for i in range(len(query) - min_tokens + 1):
        if tuple(query[i : i + min_tokens]) in grams:
            covered.update(range(i, i + min_tokens))
    return len(covered) / len(query)


@settings(max_examples=150, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=3),
    query=st.lists(st.integers(0, 4), min_size=1, max_size=40),
)
def test_match_lengths_and_novelty_match_brute_force(docs, query):
    sep = 65535
    tokens = np.asarray([t for doc in docs for t in doc + [sep]], dtype=np.uint16)
    index = CopyIndex(tokens, suffix_array(tokens), np.asarray([0]), None, sep)
    lengths = index.match_lengths(np.asarray(query))
    brute = _brute_lengths(docs, query)
    assert lengths.tolist() == brute
    maximal = [(i, n) for i, n in enumerate(brute) if n >= 1 and (i == 0 or brute[i - 1] != n + 1)]
    for cap in (1, 2, 3, 5, 64):  # long matches are searched at the cap, then followed one by one
        capped = index.match_lengths(np.asarray(query), cap=cap)
        assert capped.tolist() == [min(n, cap) for n in brute]
        assert index.maximal_matches(np.asarray(query), capped, cap) == maximal
        assert index.maximal_matches(np.asarray(query), capped, cap, floor=4) == [m for m in maximal if m[1] >= 4]
    novelty = novelty_from_lengths(lengths, (1, 2, 4, 8))
    for n in (1, 2, 4, 8):
        if len(query) >= n:
            assert novelty[n] == pytest.approx(_brute_novelty(docs, query, n))
        else:
            assert n not in novelty


def test_suffix_array_sorts_token_suffixes():
    rng = np.random.default_rng(1)
    for _ in range(50):
        tokens = rng.integers(0, 300, rng.integers(1, 80)).astype(np.uint16)
        expected = sorted(range(len(tokens)), key=lambda i: tokens[i:].tolist())
        assert suffix_array(tokens).tolist() == expected


# Words that are one token each, with their leading space, so words and tokens line up.
WORDS = ["the", "cat", "sat", "on", "mat", "dog"]


@pytest.fixture(scope="module")
def word_tokenizer(real_base_dir):
    from tunesmith.copies import _load_tokenizer

    tok = _load_tokenizer(real_base_dir / "tokenizer.json")
    assert all(len(tok.encode(" " + w, add_special_tokens=False).ids) == 1 for w in WORDS)
    return tok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    corpus=st.lists(st.sampled_from(WORDS), min_size=5, max_size=60),
    query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=40),
    min_tokens=st.integers(2, 6),
)
def test_copy_rate_and_novelty_of_texts_match_brute_force(word_tokenizer, corpus, query, min_tokens):
    # "Yk" and "Zq" start the texts: tokens found nowhere else, so every word is one " word" token
    book = "Yk " + " ".join(corpus)
    index = CopyIndex.from_texts([book], word_tokenizer)
    text = "Zq " + " ".join(query)
    ids = word_tokenizer.encode(text, add_special_tokens=False).ids
    docs = [word_tokenizer.encode(book, add_special_tokens=False).ids]
    report = index.check(text, min_tokens=min_tokens)
    assert report.n_tokens == len(ids)
    assert report.copy_rate == pytest.approx(_brute_copy_rate(docs, ids, min_tokens))
    for n, value in report.novelty.items():
        assert value == pytest.approx(_brute_novelty(docs, ids, n))
    for span in report.spans:  # whole words, and really in the corpus
        assert f" {span.text} " in f" {book} "
        assert text[span.start : span.end] == span.text


# The corpus is tokenized piece by piece (each distinct pre-token encoded once); the result
# must be exactly the tokenizer's own encoding of every row, for any text.
PIECE_ALPHABET = list("abcXYZ '’“”—-.,;:!?0123456789éàüßΩж²½Ⅻ\t\n\u00a0") + [
    "<|im_start|>", "<|endoftext|>", "'s", "'ll", "'S", "漢字", "🙂", "ｆ", "\u200b", "\x1c", "\x85", "  ",
]


def _tokenizer_reference(tok, rows: list[str], joined: bool, sep: int) -> tuple[list[int], list[int]]:
    from tunesmith.copies import _normalise

    tokens, starts, first = [], [], True
    for row in rows:
        text = _normalise(row)
        starts.append(len(tokens))
        if not text:
            continue
        ids = tok.encode(text if (first or not joined) else " " + text, add_special_tokens=False).ids
        first = False
        tokens += ids if joined else ids + [sep]
    return tokens + ([sep] if joined and tokens else []), starts


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.lists(st.sampled_from(PIECE_ALPHABET), max_size=30).map("".join), max_size=12),
    joined=st.booleans(),
)
def test_corpus_tokens_are_the_tokenizers_own(word_tokenizer, rows, joined):
    from tunesmith.copies import tokenize_corpus

    tokens, starts = tokenize_corpus(rows, word_tokenizer, joined=joined, sep=65535)
    expected, expected_starts = _tokenizer_reference(word_tokenizer, rows, joined, 65535)
    assert tokens.tolist() == expected
    assert starts.tolist() == expected_starts


def test_a_book_is_tokenized_as_the_tokenizer_does(word_tokenizer, corpora):
    from tunesmith.copies import _PieceTokenizer, tokenize_corpus

    assert _PieceTokenizer.create(word_tokenizer, np.uint16) is not None  # the fast path is the one tested
    rows = (corpora / "sherlock.txt").read_text(encoding="utf-8-sig").split("\n\n")
    for joined in (True, False):
        tokens, starts = tokenize_corpus(rows, word_tokenizer, joined=joined, sep=65535)
        expected, expected_starts = _tokenizer_reference(word_tokenizer, rows, joined, 65535)
        assert tokens.tolist() == expected
        assert starts.tolist() == expected_starts


# --- the stored index -----------------------------------------------------------------------


def test_index_is_reused_when_reloaded_and_rebuilt_when_the_data_changes(sherlock, tmp_path):
    data = tmp_path / "book.prepared"
    shutil.copytree(sherlock, data, ignore=shutil.ignore_patterns("copies"))
    first = CopyIndex.open(data)
    stored = data / "copies" / "sa.npy"
    stamp = stored.stat().st_mtime_ns
    again = CopyIndex.open(data)
    assert stored.stat().st_mtime_ns == stamp  # not rebuilt
    assert isinstance(again.sa.base, np.memmap)  # read from the file, not loaded
    assert again.check(THE_WOMAN).spans[0].locations[0].line == 62
    new = "Quentin the lighthouse keeper counted forty seven gulls on the rusty railing before breakfast."
    rows = (data / "train.jsonl").read_text(encoding="utf-8")
    (data / "train.jsonl").write_text(rows + json.dumps({"text": new}) + "\n", encoding="utf-8")
    assert first.check(new).spans == []
    said = []
    rebuilt = CopyIndex.open(data, say=said.append)
    assert stored.stat().st_mtime_ns != stamp
    assert len(said) == 1 and "again (the training data has changed)" in said[0]
    (span,) = rebuilt.check(new).spans
    assert span.text == new
    assert json.loads((data / "copies" / "meta.json").read_text())["tokens"] == len(rebuilt.tokens)


def test_a_damaged_index_is_rebuilt(sherlock, tmp_path):
    data = tmp_path / "book.prepared"
    shutil.copytree(sherlock, data)
    (data / "copies" / "sa.npy").write_bytes(b"not an array")
    assert CopyIndex.open(data).check(THE_WOMAN).spans[0].locations[0].line == 62


def test_an_index_that_cannot_be_stored_is_kept_in_memory(sherlock, tmp_path, monkeypatch):
    data = tmp_path / "book.prepared"
    shutil.copytree(sherlock, data, ignore=shutil.ignore_patterns("copies"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tunesmith.copies.atomic_dir", refuse)
    index = CopyIndex.open(data)
    assert not (data / "copies").exists()
    assert index.check(THE_WOMAN).spans[0].locations[0].line == 62


def test_a_run_dir_reads_its_data(sherlock, tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1}))
    for name in ("train.jsonl", "valid.jsonl", "report.json"):
        shutil.copy(sherlock / name, run / "data" / name)
    report = find_copies(run, f"{OWN[0]} {SWANDAM}")
    assert report.spans[0].text == SWANDAM and report.spans[0].locations[0].line == 5205
    assert (run / "copies" / "tokens.npy").is_file()


def test_without_the_original_file_the_training_row_is_named(sherlock, tmp_path):
    data = tmp_path / "book.prepared"
    shutil.copytree(sherlock, data, ignore=shutil.ignore_patterns("copies"))
    report = json.loads((data / "report.json").read_text())
    report["source"] = str(tmp_path / "gone.txt")
    (data / "report.json").write_text(json.dumps(report))
    (span,) = CopyIndex.open(data).check(THE_WOMAN).spans
    (where,) = span.locations
    rows = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert where.file.endswith("train.jsonl")
    assert "To Sherlock Holmes she is always THE woman." in json.loads(rows[where.line - 1])["text"]


def test_a_raw_text_file_is_a_source(tmp_path, real_base_dir, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(real_base_dir.parent, target_is_directory=True)
    book = tmp_path / "story.txt"
    book.write_text(
        "CHAPTER I\n\nThe harbour was quiet when the ferry came in at dawn,\n"
        "and the gulls had not yet begun their shouting over the fish market.\n\n"
        "CHAPTER II\n\nMarta folded the letter twice, put it in her coat pocket, and\n"
        "walked the long way round the old cemetery to the station.\n",
        encoding="utf-8",
    )
    text = "Then Marta folded the letter twice, put it in her coat pocket, and walked the long way home."
    (span,) = find_copies(book, text).spans
    assert span.text == "Marta folded the letter twice, put it in her coat pocket, and walked the long way"
    (where,) = span.locations
    assert (where.file, where.line, where.end_line, where.heading) == ("story.txt", 8, 9, "CHAPTER II")


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(index, tmp_path):
    with pytest.raises(TunesmithError, match="empty"):
        index.check("  \n ")
    with pytest.raises(TunesmithError, match="min tokens"):
        index.check("some text", min_tokens=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1}))
    with pytest.raises(TunesmithError, match="no data/train.jsonl") as err:
        CopyIndex.open(run)
    assert str(run) in str(err.value)
    with pytest.raises(TunesmithError, match="not a run directory"):
        CopyIndex.open(tmp_path)
    with pytest.raises(TunesmithError, match="no such file"):
        CopyIndex.open(tmp_path / "missing")


# --- the command line -----------------------------------------------------------------------

runner = CliRunner()


def _invoke(*args):
    from tunesmith.cli import app

    return runner.invoke(app, [str(a) for a in args])


def test_copies_command_prints_spans_and_summary(sherlock, tmp_path):
    text = f"{OWN[0]} {THE_WOMAN} {OWN[1]}"
    result = _invoke("copies", sherlock, text)
    assert result.exit_code == 0, result.output
    assert "1 span of 12+ tokens" in result.output
    assert "sherlock.txt lines 62-63 (ADVENTURE I. A SCANDAL IN BOHEMIA)" in result.output
    assert " ".join(THE_WOMAN.split()) in result.output
    assert "novel (not in the training text): 4-grams" in result.output

    sample = tmp_path / "sample.txt"
    sample.write_text(text, encoding="utf-8")
    as_json = _invoke("copies", sherlock, "--file", sample, "--json", "--min-tokens", "20")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["min_tokens"] == 20
    (span,) = report["spans"]
    assert span["text"] == THE_WOMAN and span["locations"][0]["line"] == 62
    assert text[span["start"] : span["end"]] == THE_WOMAN
    assert set(report["novelty"]) == {"4", "8", "16", "32"}
    novel, total = report["ngrams"]["8"]
    assert report["novelty"]["8"] == pytest.approx(novel / total) and total == report["n_tokens"] - 7


@pytest.mark.parametrize(
    "args, expect",
    [
        (["copies", "{data}"], "no text to check"),
        (["copies", "{data}", "   "], "empty"),
        (["copies", "{data}", "text", "--file", "x.txt"], "not both"),
        (["copies", "{data}", "--file", "{tmp}/missing.txt"], "missing.txt"),
        (["copies", "{tmp}/nowhere", "some text"], "no such file"),
        (["copies", "{run}", "some text"], "no data/train.jsonl"),
        (["copies", "{data}", "some text", "--min-tokens", "0"], "min tokens"),
    ],
)
def test_copies_command_bad_input_exits_nonzero_without_traceback(sherlock, tmp_path, args, expect):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1}))
    args = [a.format(data=sherlock, tmp=tmp_path, run=run) for a in args]
    result = _invoke(*args)
    assert result.exit_code != 0
    assert expect in result.output
    assert "Traceback" not in result.output


class _Chunk:
    def __init__(self, text):
        self.text = text


class _FakeModel:
    """Stands in for a loaded model: its 'generation' is fixed text."""

    name, base = "run", None

    def __init__(self, text):
        self.text = text

    def stream(self, prompt, **sampling):
        for word in self.text.split(" "):
            yield _Chunk(word + " ")

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_generate_check_copying_marks_copied_spans(sherlock, index, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1}))
    for name in ("train.jsonl", "report.json"):
        shutil.copy(sherlock / name, run / "data" / name)
    flat = " ".join(SWANDAM.split())
    monkeypatch.setattr("tunesmith.generate.load", lambda model, **options: _FakeModel(f"{OWN[0]} {flat} {OWN[1]}"))
    result = _invoke("generate", run, "Once", "--check-copying")
    assert result.exit_code == 0, result.output
    assert f"{OWN[0]} [[{flat}]] {OWN[1]}" in result.output  # piped: marked with brackets
    n_tokens = len(index.tokenizer.encode(" " + flat, add_special_tokens=False).ids)
    assert f"longest {n_tokens} tokens ({len(flat.split())} words)" in result.output
    assert "sherlock.txt lines 5205-5209" in result.output
    plain = _invoke("generate", tmp_path / "not-a-run", "Once", "--check-copying")
    assert plain.exit_code != 0 and "needs a run directory" in plain.output


def test_records_are_located_by_their_line_in_the_file(tmp_path, real_base_dir, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(real_base_dir.parent, target_is_directory=True)
    rows = [
        {"prompt": "Describe the weather.", "completion": " Grey clouds rolled over the hills all morning."},
        {"prompt": "Describe the market.",
         "completion": " Stalls of apples, pears and plums stood in long rows beside the church wall."},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    text = "In the square, stalls of apples, pears and plums stood in long rows beside the church wall."
    (span,) = find_copies(data, text).spans
    assert span.text == "stalls of apples, pears and plums stood in long rows beside the church wall."
    assert (span.locations[0].file, span.locations[0].line, span.locations[0].heading) == ("pairs.jsonl", 2, None)


def test_headings_are_chapter_lines_not_prose():
    from tunesmith.copies import _headings

    lines = ["CHAPTER I", "", "It began.", "", "Part of the reason he came was money.", "", "Chapter Twenty-Two", "",
             "Book I had lent him lay open on the table.", "", "Act civil, he said.", "", "IX. THE ENGINEER'S THUMB",
             "", "I. A Scandal in Bohemia", "", "II."]
    assert _headings(lines) == [(1, "CHAPTER I"), (7, "Chapter Twenty-Two"), (13, "IX. THE ENGINEER'S THUMB")]
    # bare numerals are sections, taken only when there are no chapter headings
    assert _headings(["I.", "", "Text.", "", "II.", "More text."]) == [(1, "I."), (5, "II.")]
