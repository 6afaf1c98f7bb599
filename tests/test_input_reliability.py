"""Input from anywhere: every case of docs/RELIABILITY.md's "Input" table, on every reader and on
the HTTP upload, plus property tests (hypothesis) over arbitrary bytes, encodings and line endings.

The table in docs/RELIABILITY.md is generated from ``CASES`` (``input_table()``); a test checks
that the document holds exactly that table, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith import inputs
from tunesmith.corpus import SUFFIXES, Reader, read_records
from tunesmith.errors import TunesmithError
from tunesmith.inputs import TextFile

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
BOOK = "The first paragraph ends here.\n\nA second paragraph follows it.\n"


def _xlsx(rows: list[list]) -> bytes:
    import io

    from openpyxl import Workbook

    book = Workbook()
    for row in rows:
        book.active.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


@dataclass
class Case:
    name: str  # the row's first column
    file: str  # file name to write
    make: Callable[[Path], None] | bytes  # bytes to write, or a function that makes the path
    outcome: str  # the documented outcome (the table's second column)
    error: str | None = None  # a regular expression the TunesmithError message matches, or None: read
    check: Callable | None = None  # for a file that reads: a check on the Corpus
    line: int | None = None  # the line the error names
    upload: bool = True  # also sent to POST /v1/files
    big: bool = False  # a 50 MB input: marked big_input


def _fixes(*parts: str) -> Callable:
    return lambda c: all(any(p in f for f in c.fixes) for p in parts)


def _loop(path: Path) -> None:
    path.symlink_to(path)


def _csv_quotes(c) -> bool:
    return [r["text"] for r in c.records] == ['one "quoted"\nacross lines', "two, with a comma"] and \
        [r["line"] for r in c.records] == [2, 4]


CASES = [
    Case("random bytes (with NUL)", "r.txt", bytes(range(256)) * 4, "error: binary file, with byte offset and line",
         error=r"binary file \(NUL byte at byte offset 0\)", line=1),
    Case("random bytes, no NUL, not Windows-1252", "r.jsonl", b'{"text": "a\x81\x9d\xfe"}\n',
         "error: neither UTF-8 nor Windows-1252/Latin-1, looks binary", error=r"not valid UTF-8 .*nor Windows-1252",
         line=1),
    Case("Latin-1 text", "l.txt", "Caf\u00e9 na\u00efve.\n".encode("latin-1"),
         "decoded as Latin-1; the report's fixes say so, with the first non-UTF-8 byte",
         check=_fixes("decoded Latin-1", "byte offset 3")),
    Case("Windows-1252 text", "w.txt", "\u201cQuotes\u201d \u2014 and \u20ac5.\n".encode("cp1252"),
         "decoded as Windows-1252; the report says so", check=_fixes("decoded Windows-1252")),
    Case("UTF-16 with BOM", "u.txt", "\ufeffCaf\u00e9 society.\n".encode("utf-16-le"),
         "decoded; the report says UTF-16 (little- or big-endian)", check=_fixes("decoded UTF-16 (little-endian)")),
    Case("UTF-16 without BOM", "u.txt", "Plain words here.\nAnd more.\n".encode("utf-16-le"),
         "error: names UTF-16 and the iconv command to convert it", error=r"UTF-16 \(little-endian\) text without"),
    Case("UTF-8 with BOM", "b.txt", b"\xef\xbb\xbf" + BOOK.encode(), "BOM dropped; the report says so",
         check=_fixes("removed UTF-8 BOM")),
    Case("mixed line endings (LF, CRLF, CR)", "m.txt", b"One.\r\n\r\nTwo.\r\rThree.\n",
         "all become LF; lines are numbered as an editor numbers them; the report counts each kind",
         check=lambda c: [(r["text"], r["line"]) for r in c.records] == [("One.", 1), ("Two.", 3), ("Three.", 5)]
         and _fixes("normalised 2 CRLF", "converted 2 CR")(c)),
    Case("NUL bytes inside text", "n.txt", b"line one\nline two\nabc\x00def\n",
         "error: binary file, NUL byte's offset and line", error=r"NUL byte at byte offset 21", line=3),
    Case("JSONL with a truncated last line", "t.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c',
         "error: malformed JSON at the last line, with the text at fault", error=r"malformed JSON at line 3", line=3),
    Case("JSON nested wrongly (array of arrays)", "n.json", b'[[{"text": "a"}]]',
         "error: expected a JSON object, found an array", error=r"expected a JSON object, found an array", line=1),
    Case("JSON nested wrongly (records under a key)", "k.json", b'{"records": [{"text": "a"}]}',
         "error: names the fields found", error=r"none of the expected fields \(found: records\)", line=1),
    Case("chat messages not an array", "c.jsonl", b'{"messages": {"role": "user", "content": "hi"}}\n',
         "error: names the field", error=r"expected a non-empty array of messages", line=1),
    Case("CSV row with too many fields", "r.csv", b"prompt,completion\nq,a\nq,a,extra\n",
         "error: names the row and the field counts", error=r"this row has 3 fields but the header has 2", line=3),
    Case("CSV row with too few fields", "f.csv", b"prompt,completion\nq,a\nq\n",
         "error: names the row and the missing field", error=r"missing field 'completion'", line=3),
    Case("CSV with embedded newlines and quotes", "q.csv",
         b'text\n"one ""quoted""\nacross lines"\n"two, with a comma"\n',
         "read as CSV quoting says; each record names the line it starts on", check=_csv_quotes),
    Case(".xlsx sheet", "s.xlsx", _xlsx([["prompt", "completion"], ["Q1", " yes"], ["Q2", 3.0]]),
         "the first sheet is read like a CSV file (header row, then records; 3.0 reads as 3)",
         check=lambda c: [(r["prompt"], r["completion"]) for r in c.records] == [("Q1", " yes"), ("Q2", "3")]),
    Case(".xlsx that is not a workbook", "x.xlsx", b"PK\x03\x04 not really a zip",
         "error: not a readable .xlsx workbook", error=r"not a readable \.xlsx workbook"),
    Case("0-byte file", "e.txt", b"", "error: the file is empty", error=r"the file is empty"),
    Case("only blank lines", "e.jsonl", b"\n \r\n\t\n", "error: the file is empty", error=r"the file is empty"),
    Case("a directory given as a file", "d.txt", lambda p: p.mkdir(),
         "error: this is a directory (prepare takes a folder as a folder of inputs)", error=r"is a directory",
         upload=False),
    Case("a symlink loop", "loop.txt", _loop, "error: names the symlink loop", error=r"symlink loop", upload=False),
    Case("a line of 50 MB", "long.txt", lambda p: p.write_bytes(b"word " * 10_000_000),
         "read in blocks, broken at spaces into pieces of at most 1 MiB (the report says so); prepare cuts "
         "them into examples; memory stays within the bound of any other file",
         check=_fixes("broke 1 line over 1,048,576 characters"), upload=False, big=True),
    Case("a JSONL line over 64 MiB", "huge.jsonl", lambda p: p.write_bytes(b'{"text": "' + b"x" * (65 << 20) + b'"}\n'),
         "error: one record cannot be that large; split it", error=r"over 67,108,864 characters", line=1,
         upload=False, big=True),
    Case("unsupported type", "book.pdf", b"%PDF-1.4", "error: names the types supported",
         error=r"unsupported file type '\.pdf'"),
]


def _write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / case.file
    if callable(case.make):
        case.make(path)
    else:
        path.write_bytes(case.make)
    return path


def input_table() -> str:
    rows = ["| input | outcome |", "|---|---|"]
    rows += [f"| {case.name} | {case.outcome} |" for case in CASES]
    rows.append("| a file that changes while it is read | error: the file changed while it was being read "
                "(size, time or inode differ after reading) |")
    rows.append("| any bytes at all, under any supported name (hypothesis) | a Corpus or a TunesmithError, "
                "never another exception |")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.big_input] if c.big else [])
                                  for c in CASES])
def test_input_case(tmp_path: Path, case: Case) -> None:
    path = _write(tmp_path, case)
    if case.error is None:
        corpus = read_records(path)
        assert case.check(corpus), corpus.fixes
        return
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert re.search(case.error, err.value.message), err.value.message
    assert err.value.file == str(path)
    if case.line is not None:
        assert err.value.line == case.line


@pytest.mark.parametrize("case", [c for c in CASES if c.upload], ids=[c.name for c in CASES if c.upload])
def test_upload_case(tmp_path: Path, case: Case, tunesmith_home) -> None:
    from fastapi.testclient import TestClient

    from tunesmith.server.app import create_app
    from tunesmith.server.config import ServerConfig

    path = _write(tmp_path, case)
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False))
    with TestClient(app) as client:
        resp = client.post("/v1/files", files={"file": (f"my-{case.file}", path.read_bytes())},
                           data={"purpose": "fine-tune"})
    files = tunesmith_home / "files"
    if case.error is None:
        assert resp.status_code == 200, resp.text
        assert len(list(files.glob("file-*"))) == 1
        return
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert f"my-{case.file}" in message and str(files) not in message
    assert not files.exists() or not list(files.iterdir())  # nothing half-written is kept


def test_file_that_changes_while_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "grow.txt"
    path.write_text(BOOK * 50)
    monkeypatch.setattr(inputs, "BLOCK", 64)
    real = TextFile._blocks

    def growing(self):
        for i, block in enumerate(real(self)):
            if i == 3:
                with open(self.path, "a") as fh:
                    fh.write("More text written while tunesmith reads.\n")
            yield block

    monkeypatch.setattr(TextFile, "_blocks", growing)
    with pytest.raises(TunesmithError) as err:
        read_records(path)
    assert "changed while it was being read" in err.value.message and err.value.file == str(path)


def test_prepare_of_a_changing_file_leaves_no_output(tmp_path: Path, monkeypatch) -> None:
    from test_prepare import CharTokenizer

    from tunesmith.prepare import prepare

    path = tmp_path / "grow.txt"
    path.write_text(BOOK * 50)
    calls = {"n": 0}
    real = TextFile._stat

    def stat(self):
        calls["n"] += 1
        value = real(self)
        return value if calls["n"] == 1 else (value[0] + 1, *value[1:])

    monkeypatch.setattr(TextFile, "_stat", stat)
    with pytest.raises(TunesmithError, match="changed while"):
        prepare(path, out=tmp_path / "out", tokenizer=CharTokenizer(), estimate=False)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["grow.txt"]


def test_the_reliability_document_holds_the_generated_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Input", 1)[1].split("\n## ", 1)[0]
    assert input_table() in section, "regenerate the table: python tests/test_input_reliability.py"


@pytest.mark.big_input
def test_a_50_mb_line_prepares_in_bounded_memory(tmp_path: Path, real_base_dir: Path) -> None:
    """``prepare`` in a child process, so its peak RSS is prepare's alone (a 20 MB line used to
    peak at 7.9 GB and take 105 s)."""
    path = tmp_path / "long.txt"
    # 50 MB of varied words on one line (a repeated word would make every example the same, and
    # dedupe would keep one of them)
    vocabulary = np.array([f"w{i}" for i in range(50_000)])
    words = vocabulary[np.random.default_rng(0).integers(0, len(vocabulary), 8_500_000)]
    path.write_bytes(" ".join(words.tolist()).encode()[:50_000_000])
    code = ("import resource, sys; from tunesmith.prepare import prepare\n"
            "from transformers import AutoTokenizer\n"
            "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
            "p = prepare(sys.argv[1], out=sys.argv[3], tokenizer=tok, estimate=None)\n"
            # VmHWM, this process's own peak (ru_maxrss would carry pytest's peak across exec)
            "peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print(p.report['examples']['train'], peak // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(real_base_dir), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout.split()
    examples, peak_mb = int(out[0]), int(out[1])
    assert examples > 1000  # 10M words of one token or two, in blocks of at most 1,023 tokens
    assert peak_mb < 1024, f"peak RSS {peak_mb} MB preparing a 50 MB line"


def test_a_long_line_is_prepared_in_pieces(tmp_path: Path) -> None:
    """The 50 MB case in small (1.5 MB), fast enough for every run."""
    from test_prepare import CharTokenizer

    from tunesmith.prepare import prepare

    path = tmp_path / "long.txt"
    words = [f"w{i}" for i in range(200_000)]
    path.write_text(" ".join(words))
    corpus = read_records(path)
    assert any("broke 1 line over 1,048,576 characters" in fix for fix in corpus.fixes)
    prepared = prepare(path, out=tmp_path / "out", tokenizer=CharTokenizer(), block_size=1024, estimate=False)
    rows = list(prepared.train) + list(prepared.valid)
    assert all(len(r["text"]) <= 1023 for r in rows)  # one token per character: every example fits
    assert sorted(w for r in rows for w in r["text"].split()) == sorted(words)  # no word lost or cut


# --- properties ---------------------------------------------------------------------------------

_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(data=st.binary(max_size=2000), suffix=st.sampled_from(sorted(SUFFIXES)))
def test_any_bytes_read_or_fail_cleanly(tmp_path_factory, data: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("any") / f"f{suffix}"
    path.write_bytes(data)
    try:
        corpus = read_records(path)
    except TunesmithError as err:
        assert err.file == str(path) and err.message
    else:
        assert corpus.records and corpus.format


@_settings
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_any_bytes_as_labelled_data_read_or_fail_cleanly(tmp_path_factory, data: bytes, suffix: str) -> None:
    from tunesmith.labelled import read_table

    path = tmp_path_factory.mktemp("lab") / f"f{suffix}"
    path.write_bytes(data)
    try:
        read_table(path)
    except TunesmithError as err:
        assert err.file == str(path) and err.message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), suffix=st.sampled_from(sorted(SUFFIXES)))
def test_any_bytes_uploaded_are_kept_or_refused_cleanly(tunesmith_home, data: bytes, suffix: str) -> None:
    from fastapi.testclient import TestClient

    from tunesmith.server.app import create_app
    from tunesmith.server.config import ServerConfig

    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False))
    files = tunesmith_home / "files"
    before = set(files.glob("*")) if files.exists() else set()
    with TestClient(app) as client:
        resp = client.post("/v1/files", files={"file": (f"up{suffix}", data)}, data={"purpose": "fine-tune"})
    after = set(files.glob("*")) if files.exists() else set()
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]["message"].startswith(f"up{suffix}") and after == before
    else:
        assert len(after - before) == 1


_LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)


@_settings
@given(lines=st.lists(_LINE, max_size=20), ends=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=20,
                                                          max_size=20),
       codec=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]), block=st.integers(1, 9))
def test_lines_match_a_reference_split(tmp_path_factory, lines, ends, codec, block) -> None:
    text = "".join(line + end for line, end in zip(lines, ends))
    path = tmp_path_factory.mktemp("lines") / "t.txt"
    data = text.encode(codec)
    if not data.strip(b"\x00") or b"\x00" in text.encode("utf-8"):
        return
    path.write_bytes(data)
    inputs.BLOCK = block  # block edges fall everywhere, even inside a CRLF
    try:
        got = [t for _, t in TextFile(path).lines()]
    except TunesmithError:
        assert codec != "utf-16"  # only a file without a BOM may be refused (e.g. NULs in the text)
        return
    finally:
        inputs.BLOCK = 1 << 20
    assert got == text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@_settings
@given(text=st.text(st.sampled_from("ab \u00e9\u00fc\u20ac\u201c\u201d\u2014\n"), max_size=200))
def test_windows_1252_text_decodes_to_itself(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("cp") / "w.txt"
    path.write_bytes(text.encode("cp1252"))
    assert TextFile(path).read() == text


@_settings
@given(words=st.lists(st.text("abc", min_size=1, max_size=12), min_size=1, max_size=200), limit=st.integers(8, 40))
def test_long_lines_break_at_spaces_into_bounded_pieces(tmp_path_factory, words, limit) -> None:
    line = " ".join(words)
    path = tmp_path_factory.mktemp("long") / "l.txt"
    path.write_text(line)
    pieces = [(n, t) for n, t in TextFile(path).lines(max_line=limit)]
    assert all(len(t) <= limit for _, t in pieces) and {n for n, _ in pieces} == {1}
    assert "".join(t for _, t in pieces).replace(" ", "") == line.replace(" ", "")


def test_reader_parts_of_a_long_book_keep_line_numbers(tmp_path: Path, monkeypatch) -> None:
    from tunesmith import corpus

    paragraphs = [f"Paragraph number {i} ends here." for i in range(200)]
    path = tmp_path / "b.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    monkeypatch.setattr(corpus, "SECTION_CHARS", 300)  # many sections
    reader = Reader(path)
    parts = list(reader.parts())
    assert len(parts) > 10
    records = [r for p in parts for r in p.records]
    assert [r["text"] for r in records] == paragraphs
    assert [r["line"] for r in records] == [1 + 2 * i for i in range(200)]


if __name__ == "__main__":  # print the table for docs/RELIABILITY.md
    print(input_table(), end="")
