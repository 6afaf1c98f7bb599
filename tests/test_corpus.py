"""Reading and cleaning training files: books, legacy JSONL/JSON/CSV formats, and bad input."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.corpus import Corpus, read_records, validate_file
from tunesmith.errors import TunesmithError

LABEL = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}:$")  # a speaker: 'First Citizen:'


@pytest.fixture(scope="module")
def sherlock(corpora: Path) -> Corpus:
    return read_records(corpora / "sherlock.txt")


@pytest.fixture(scope="module")
def shakespeare(corpora: Path) -> Corpus:
    return read_records(corpora / "tinyshakespeare.txt")


# --- books: the real corpora -----------------------------------------------------------------


def test_sherlock_boilerplate_bom_and_crlf_are_gone(sherlock: Corpus) -> None:
    assert sherlock.format == "book"
    text = "\n\n".join(r["text"] for r in sherlock.records)
    assert "gutenberg" not in text.lower()
    for phrase in ("electronic works", "literary archive foundation", "trademark", "full license", "ebook"):
        assert phrase not in text.lower()  # ("license" alone is in the book: a marriage license)
    assert "\ufeff" not in text and "\r" not in text
    assert sherlock.records[0]["text"] == "THE ADVENTURES OF SHERLOCK HOLMES"
    assert sherlock.records[-1]["text"].endswith("where I believe that she has met with considerable success.")
    fixes = " | ".join(sherlock.fixes)
    assert "removed UTF-8 BOM" in fixes
    assert "normalised 13,052 CRLF line endings" in fixes
    assert "removed Project Gutenberg header (33 lines) and licence footer (363 lines)" in fixes


def test_sherlock_is_reflowed_into_paragraphs(sherlock: Corpus, corpora: Path) -> None:
    for record in sherlock.records:
        assert not re.search(r"\n[a-z]", record["text"]), record
        assert "  " not in record["text"] and not record["text"].endswith(" ")
    opening = next(r for r in sherlock.records if r["text"].startswith("To Sherlock Holmes she is always"))
    assert "\n" not in opening["text"]
    assert "I have seldom heard him mention her under any other name. In his eyes she eclipses" in opening["text"]
    assert any(f.startswith("re-flowed ") and "hard-wrapped lines into" in f for f in sherlock.fixes)
    # every record points at the source line it starts on
    source = (corpora / "sherlock.txt").read_text(encoding="utf-8-sig").splitlines()
    for record in sherlock.records:
        first_line = re.sub(r"\s+", " ", source[record["line"] - 1].strip())
        assert record["text"].startswith(first_line), record["line"]


def test_sherlock_keeps_short_lines_like_the_contents(sherlock: Corpus) -> None:
    contents = next(r for r in sherlock.records if r["text"].startswith("I. A Scandal in Bohemia"))
    assert contents["text"].split("\n")[:2] == ["I. A Scandal in Bohemia", "II. The Red-headed League"]


def _words(text: str) -> str:
    return re.sub(r"([a-z]-|--)\s+", r"\1", " ".join(text.split()))


def test_shakespeare_speakers_are_not_merged(shakespeare: Corpus, corpora: Path) -> None:
    source = (corpora / "tinyshakespeare.txt").read_text(encoding="utf-8")
    blocks = [b for b in re.split(r"\n\s*\n", source) if b.strip()]
    assert len(shakespeare.records) == len(blocks)  # no paragraph swallowed its neighbour
    texts = [r["text"] for r in shakespeare.records]
    assert texts[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert "First Citizen:\nLet us kill him, and we'll have corn at our own price.\nIs't a verdict?" in texts
    labelled = 0
    for text, block in zip(texts, blocks):
        block_lines = [" ".join(line.split()) for line in block.strip("\n").split("\n")]
        # only line breaks may change, never the words (a hyphen or dash at a line's end joins with no space)
        assert _words(text) == _words(" ".join(block_lines))
        if LABEL.match(block_lines[0]):
            labelled += 1
            # the speaker's name stays alone on the first line, never run into the speech
            assert text.split("\n")[0] == block_lines[0], text
    assert labelled > 7000
    # verse keeps its lines
    verse = next(t for t in texts if t.startswith("MARCIUS:\nThey fear us not, but issue forth their city."))
    assert "city.\nNow put your shields before your hearts, and fight\nWith hearts" in verse
    assert max(len(t) for t in texts) < 4000


def test_shakespeare_prose_speech_is_reflowed(shakespeare: Corpus) -> None:
    speech = next(r["text"] for r in shakespeare.records if "We are accounted poor citizens" in r["text"])
    lines = speech.split("\n")
    assert lines[0] == "First Citizen:"
    assert len(lines) == 2
    assert "relieve us: if they would yield us but the superfluity" in lines[1]


def test_real_compound_hyphen_across_lines_is_kept(shakespeare: Corpus) -> None:
    # tinyshakespeare.txt has "an ass's pack-\nsaddle": both halves are words, so it is a compound
    speech = next(r["text"] for r in shakespeare.records if "entombed in an ass's" in r["text"])
    assert "entombed in an ass's pack-saddle. Yet you must" in speech


# --- books: synthetic cases ------------------------------------------------------------------

WRAPPED = (
    "The deficiency of the evidence was something that he could not ignore, and so\n"
    "he turned the matter over again in his mind while the rain fell on the roof and\n"
    "the fire burned low; it was a well-known trick of his to sit quite still for an\n"
    "hour and to say nothing at all until the whole affair had become clear to him.\n"
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def test_hyphenation_across_line_breaks(tmp_path: Path) -> None:
    hyphenated = (
        "It was a matter of the greatest delicacy, and he showed a remarkable defi-\n"
        "ciency of tact in it, which was, as all who knew him would say, a well-\n"
        "known failing of his; yet there was, all the same, a curious kind of some-\n"
        "thing in the way he spoke of his dear old mule and of its battered pack-\n"
        "saddle, and of the long road, that made the whole village laugh at him.\n"
    )
    book = write(tmp_path, "book.txt", WRAPPED + "\n" + hyphenated + "\nA pack and a saddle.\n")
    corpus = read_records(book)
    text = corpus.records[1]["text"]
    assert "a remarkable deficiency of tact" in text  # printer's hyphenation: joined
    assert "a well-known failing" in text  # the book spells it with a hyphen elsewhere: kept
    assert "a curious kind of something in the way" in text  # the book spells "something" elsewhere: joined
    assert "its battered pack-saddle, and" in text  # both halves are words: a compound, kept
    assert "joined 2 words hyphenated across line breaks" in corpus.fixes


def test_gutenberg_variants_crlf_cr_and_spaces(tmp_path: Path) -> None:
    body = WRAPPED.replace("could not ignore,", "could   not\tignore,  ")
    content = (
        "\ufeffThe Project Gutenberg EBook of Nothing\r\n\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK NOTHING ***\r\n\r\n"
        "Produced by Somebody and the Online Distributed\r\nProofreading Team\r\n\r\n"
        + body.replace("\n", "\r\n")
        + "\r\nEnd of the Project Gutenberg EBook of Nothing\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK NOTHING ***\r\nLicence text here.\r"
    )
    corpus = read_records(write(tmp_path, "book.md", content))
    assert len(corpus.records) == 1
    text = corpus.records[0]["text"]
    assert text.startswith("The deficiency of the evidence was something that he could not ignore, and so he turned")
    assert "\n" not in text and "  " not in text and "\t" not in text
    assert corpus.records[0]["line"] == 8
    fixes = " | ".join(corpus.fixes)
    assert "removed UTF-8 BOM" in fixes
    assert "CRLF" in fixes and "converted 1 CR line ending" in fixes
    assert "removed Project Gutenberg header (7 lines) and licence footer (4 lines)" in fixes
    assert "collapsed runs of spaces in 1 line" in fixes


def test_verse_is_kept(tmp_path: Path) -> None:
    verse = (
        "Shall I compare thee to a summer's day?\n"
        "Thou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\n"
        "And summer's lease hath all too short a date;\n"
    )
    corpus = read_records(write(tmp_path, "poem.txt", verse + "\n" + WRAPPED))
    assert corpus.records[0]["text"] == verse.strip()
    assert "\n" not in corpus.records[1]["text"]


def test_only_boilerplate_is_an_error(tmp_path: Path) -> None:
    markers = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    path = write(tmp_path, "b.txt", markers)
    with pytest.raises(TunesmithError, match="no text is left"):
        read_records(path)


# --- legacy record formats -------------------------------------------------------------------


def test_prompt_completion_jsonl(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}\n\n###\n\n", "completion": f" A{i}\n", "id": i} for i in range(3)]
    lines = [json.dumps(r) for r in rows]
    path = write(tmp_path, "d.jsonl", lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    corpus = read_records(path)
    assert corpus.format == "prompt_completion"
    assert corpus.records == [
        {"prompt": "Q0\n\n###\n\n", "completion": " A0\n", "line": 1},
        {"prompt": "Q1\n\n###\n\n", "completion": " A1\n", "line": 3},
        {"prompt": "Q2\n\n###\n\n", "completion": " A2\n", "line": 4},
    ]
    assert corpus.extra_fields == {"id": 3}


def test_chat_jsonl(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello.", "weight": 1}]}
    corpus = read_records(write(tmp_path, "c.jsonl", json.dumps(row) + "\n"))
    assert corpus.format == "chat"
    assert corpus.records == [{"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello."}], "line": 1}]


def test_json_array_names_element_lines(tmp_path: Path) -> None:
    content = '[\n  {"text": "one"},\n\n  {"text": "two"},\n  {"text": 3}\n]\n'
    path = write(tmp_path, "t.json", content)
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.line == 5 and err.value.field == "text" and "string" in err.value.message
    corpus = read_records(write(tmp_path, "u.json", content.replace("3", '"three"')))
    assert corpus.format == "text"
    assert [(r["text"], r["line"]) for r in corpus.records] == [("one", 2), ("two", 4), ("three", 5)]


def test_json_single_object_and_jsonl_named_json(tmp_path: Path) -> None:
    single = read_records(write(tmp_path, "a.json", '{"prompt": "p", "completion": "c"}'))
    assert single.records == [{"prompt": "p", "completion": "c", "line": 1}]
    lines = read_records(write(tmp_path, "b.json", '{"text": "x"}\n{"text": "y"}\n'))
    assert [r["text"] for r in lines.records] == ["x", "y"]
    with pytest.raises(TunesmithError, match="JSON array of records"):
        read_records(write(tmp_path, "c.json", '"just a string"'))


def test_csv_and_tsv(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "d.csv", 'Prompt,completion,source\n"Hello, you",\" Hi\nthere\",web\nBye, Later,x\n')
    corpus = read_records(csv_path)
    assert corpus.format == "prompt_completion"
    assert corpus.records == [
        {"prompt": "Hello, you", "completion": " Hi\nthere", "line": 2},
        {"prompt": "Bye", "completion": " Later", "line": 4},
    ]
    assert corpus.extra_fields == {"source": 2}
    tsv = read_records(write(tmp_path, "d.tsv", "text\nfirst, with a comma\n\nsecond\n"))
    assert tsv.format == "text"
    assert [(r["text"], r["line"]) for r in tsv.records] == [("first, with a comma", 2), ("second", 4)]


def test_csv_without_needed_columns_names_the_columns_found(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "d.csv", "question,answer\nq,a\n"))
    assert "'question', 'answer'" in err.value.message and err.value.line == 1
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "e.csv", "prompt,answer\nq,a\n"))
    assert err.value.field == "completion" and "'prompt', 'answer'" in err.value.message
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "f.csv", "prompt,completion\nq,a,extra\n"))
    assert err.value.line == 2 and "3 fields" in err.value.message


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError) as err:
        read_records(tmp_path / "nope.txt")
    assert err.value.file == str(tmp_path / "nope.txt") and "no such file" in err.value.message


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n", b"\xef\xbb\xbf\r\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    for name in ("e.txt", "e.jsonl", "e.csv"):
        with pytest.raises(TunesmithError, match="empty"):
            read_records(write(tmp_path, name, content))


def test_binary_file(tmp_path: Path) -> None:
    path = write(tmp_path, "b.txt", b"line one\nline two\nabc\x00\x01\x02")
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.line == 3 and "byte offset 21" in err.value.message and "binary" in err.value.message


def test_latin1_and_windows_1252_are_decoded_and_said(tmp_path: Path) -> None:
    corpus = read_records(write(tmp_path, "l.txt", "first line\nna\u00efve\n".encode("latin-1")))
    assert corpus.records[0]["text"] == "first line\nna\u00efve"
    assert any("Latin-1" in fix and "byte offset 13, line 2" in fix for fix in corpus.fixes)
    corpus = read_records(write(tmp_path, "w.txt", "\u201cQuoted\u201d \u2014 dash.\n".encode("cp1252")))
    assert corpus.records[0]["text"] == "\u201cQuoted\u201d \u2014 dash."
    assert any("Windows-1252" in fix for fix in corpus.fixes)


def test_neither_utf8_nor_windows_1252_is_binary(tmp_path: Path) -> None:
    path = write(tmp_path, "l.txt", b"first line\nab\x81cd\xff\n")
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.line == 2 and "byte offset 13" in err.value.message and "UTF-8" in err.value.hint


def test_unsupported_extension_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "book.pdf", b"%PDF-1.4"))
    assert "'.pdf'" in err.value.message and ".jsonl" in err.value.hint
    with pytest.raises(TunesmithError, match="directory"):
        read_records(tmp_path)


def test_malformed_jsonl_names_line_3(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.line == 3 and "line 3" in str(err.value) and "malformed JSON" in err.value.message


def test_missing_and_wrongly_typed_fields(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "a.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n'))
    assert err.value.line == 2 and err.value.field == "completion" and "missing field 'completion'" in str(err.value)
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "b.jsonl", '{"prompt": "p", "completion": null}\n'))
    assert err.value.field == "completion" and "found null" in err.value.message
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "c.jsonl", '{"messages": [{"role": "user", "content": ["x"]}]}\n'))
    assert err.value.field == "messages[0].content"
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "d.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n'))
    assert err.value.field == "messages[0].role" and "robot" in err.value.message
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "e.jsonl", '{"question": "q"}\n'))
    assert "found: question" in err.value.message
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "f.jsonl", '{"text": "\\ud800"}\n'))
    assert err.value.field == "text" and "surrogate" in err.value.message


def test_mixed_formats_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"text": "a"}\n{"text": "b"}\n{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.line == 3 and "from line 1" in err.value.message


def test_validate_file_is_read_records_and_never_prints(tmp_path: Path, capsys) -> None:
    good = write(tmp_path, "g.jsonl", '{"text": "hello"}\n')
    assert validate_file(good) == read_records(good)
    with pytest.raises(TunesmithError):
        validate_file(write(tmp_path, "bad.jsonl", "{nope\n"))
    assert capsys.readouterr() == ("", "")


# --- property tests: bad input only ever raises TunesmithError -------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]))
def test_arbitrary_bytes_raise_only_tunesmith_errors(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    try:
        corpus = read_records(path)
    except TunesmithError as exc:
        assert exc.file == str(path)
        return
    assert corpus.records and all(isinstance(r["line"], int) and r["line"] >= 1 for r in corpus.records)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


json_lines = st.one_of(
    st.text(alphabet=st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), max_size=30),
    st.sampled_from(['{"text": "ok"}', "", "  ", "{", '{"text": "x"', "[1, 2]", '{"text": 1}', "nul\x00l"]),
    st.builds(lambda t: json.dumps({"text": t}), st.text(alphabet=string.printable, max_size=10)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(json_lines, max_size=8))
def test_arbitrary_jsonl_lines_name_the_malformed_line(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", newline="")
    if lines and lines[0].startswith("\ufeff"):
        lines = [lines[0][1:], *lines[1:]]  # a leading BOM is removed before parsing
    try:
        corpus = read_records(path)
    except TunesmithError as exc:
        assert exc.file == str(path)
        if "malformed JSON" in exc.message:
            assert exc.line is not None and f"line {exc.line}" in str(exc)
            bad = lines[exc.line - 1]
            assert not _parses(bad)
            assert all(_parses(line) or not line.strip() for line in lines[: exc.line - 1])
        return
    assert corpus.format == "text"
    assert [r["line"] for r in corpus.records] == [i + 1 for i, line in enumerate(lines) if line.strip()]


# --- hyphens and dashes at line ends -----------------------------------------------------------

FILLER = (
    "The rain fell on the roof all night while he sat by the window and waited for the\n"
    "morning to come, turning the matter over and over again in his mind until at last\n"
    "the grey light crept into the room and showed him the papers on his desk again.\n"
)


def _paragraph(tmp_path: Path, body: str, known_word=None, extra: str = "") -> str:
    """The re-flowed text of ``body``, a hard-wrapped paragraph placed after some filler prose."""
    corpus = read_records(write(tmp_path, "book.txt", FILLER + "\n" + body + "\n" + extra), known_word=known_word)
    return corpus.records[1]["text"]


def test_split_word_is_joined_when_the_book_never_spells_it_whole(tmp_path: Path) -> None:
    # Neither "suspicion" nor "deficiency" appears anywhere else, and the halves are no words.
    body = (
        "He had not the least shadow of a reason for it, and yet a dark and growing suspi-\n"
        "cion came over him as he looked at the man who stood there at the door of the house,\n"
        "a suspicion that he could not shake off, and which showed a strange kind of defi-\n"
        "ciency in the story that the fellow had told him a little while before that night.\n"
    )
    text = _paragraph(tmp_path, body.replace("a suspicion that", "a doubt that"))
    assert "a dark and growing suspicion came over him" in text
    assert "a strange kind of deficiency in the story" in text
    assert "-" not in text


def test_capital_after_the_hyphen_keeps_it_without_a_space(tmp_path: Path) -> None:
    body = (
        "It was an old house, built long ago in the plain and sturdy manner of the Anglo-\n"
        "Saxon builders who had first settled in that valley, and it stood there yet, grey\n"
        "and square among its trees, as if it meant to outlast every one of us who lived in it.\n"
    )
    assert "manner of the Anglo-Saxon builders" in _paragraph(tmp_path, body)


@pytest.mark.parametrize("dash", ["--", "\u2014"])
def test_dash_at_a_line_end_gains_no_space(tmp_path: Path, dash: str) -> None:
    body = (
        f"He came back into the room and stood for a long while looking down at the fire{dash}\n"
        "burned low by now, and giving hardly any light at all to the table by which she sat\n"
        "with her work in her lap, and her eyes fixed on the dark window and the rain outside.\n"
    )
    assert f"looking down at the fire{dash}burned low by now" in _paragraph(tmp_path, body)


def test_compound_spelled_with_a_hyphen_inside_a_line_is_kept(tmp_path: Path) -> None:
    body = (
        "He took the thing up and turned it over; it was the very same little brass hat-\n"
        "securer that he had seen on the table the night before, and he put it in his pocket\n"
        "without a word to any one of the people who were standing about in the room with him.\n"
    )
    extra = "The hat-securer was gone.\n"
    assert "little brass hat-securer that" in _paragraph(tmp_path, body, extra=extra)
    # the joined spelling inside a line wins the other way
    assert "little brass hatsecurer that" in _paragraph(tmp_path, body, extra="The hatsecurer was gone.\n")


def test_a_word_list_decides_what_the_book_leaves_open(tmp_path: Path) -> None:
    body = (
        "There was nothing to be seen on the long road but an old mule with a battered pack-\n"
        "saddle on its back, and a boy who walked beside it with a stick, singing to himself\n"
        "as he went, and never once looking up at the great house on the hill above the road.\n"
    )
    extra = "A pack and a saddle.\n"  # both halves are words of the book
    asked: list[str] = []

    def knows_packsaddle(word: str) -> bool:
        asked.append(word)
        return word == "packsaddle"

    assert "a battered pack-saddle on its back" in _paragraph(tmp_path, body, extra=extra)  # a compound
    assert "a battered packsaddle on its back" in _paragraph(tmp_path, body, knows_packsaddle, extra=extra)
    assert asked == ["packsaddle"]
    # where the book itself spells the compound, the word list is not asked
    asked.clear()
    text = _paragraph(tmp_path, body, knows_packsaddle, extra="A pack-saddle and a pack.\n")
    assert "a battered pack-saddle on its back" in text and asked == []


# --- encodings, links and JSON messages ----------------------------------------------------------


def test_utf16_with_a_bom_is_decoded_and_said(tmp_path: Path) -> None:
    text = "Caf\u00e9 society.\n\nA second paragraph.\n"
    for codec, order in (("utf-16-le", "little-endian"), ("utf-16-be", "big-endian")):
        bom = "\ufeff".encode(codec)
        corpus = read_records(write(tmp_path, f"u-{order}.txt", bom + text.encode(codec)))
        assert [r["text"] for r in corpus.records] == ["Caf\u00e9 society.", "A second paragraph."]
        assert any(f"decoded UTF-16 ({order})" in fix for fix in corpus.fixes)


def test_utf16_without_a_bom_is_named_not_called_binary(tmp_path: Path) -> None:
    path = write(tmp_path, "u.txt", "Plain words here.\nAnd more.\n".encode("utf-16-le"))
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert "UTF-16 (little-endian)" in err.value.message and "binary" not in err.value.message
    assert "iconv -f UTF-16LE -t UTF-8" in err.value.hint


def test_symlink_loop_and_dangling_link(tmp_path: Path) -> None:
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(TunesmithError) as err:
        read_records(loop)
    assert "symlink loop" in err.value.message and "no such file" not in err.value.message
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(TunesmithError) as err:
        read_records(dangling)
    assert "gone.txt" in err.value.message and "does not exist" in err.value.message


def test_json_error_shows_the_whole_message_and_the_text_at_fault(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert err.value.message == (
        "malformed JSON at line 2, column 16: expecting ',' delimiter, here: {\"prompt\": \"a\" \"completion\": \"b\"}"
    )
    long_line = '{"text": "' + "x" * 500 + '" oops}\n'
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "long.jsonl", long_line))
    assert len(err.value.message) < 160 and err.value.message.endswith('" oops}')
    with pytest.raises(TunesmithError) as err:
        read_records(write(tmp_path, "a.json", '[{"text": "a"},\n {"text": }]'))
    assert err.value.line == 2 and ".jsonl" not in err.value.hint


def test_counts_read_as_english(tmp_path: Path) -> None:
    corpus = read_records(write(tmp_path, "one.txt", "One line.\r\n"))
    assert "normalised 1 CRLF line ending" in corpus.fixes
