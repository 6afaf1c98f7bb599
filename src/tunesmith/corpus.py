"""Reading the user's training file: books and the legacy JSONL/CSV formats, cleaned and checked.

Nothing here needs a tokenizer or prints anything; every problem is a ``TunesmithError`` that
names the file, the line and the field, so the CLI and the HTTP server can show it as it is.

Formats (decided from the first valid record; a record of another shape is an error):

- ``book``: a ``.txt``/``.md`` file; records are paragraphs ``{"text", "line"}``.
- ``prompt_completion``: ``{"prompt", "completion"}`` rows (OpenAI's legacy fine-tune format).
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rows.
- ``text``: ``{"text"}`` rows, each its own document.

JSON records come from ``.jsonl`` or ``.json`` (an array, one object, or JSONL under that name);
table records from ``.csv``/``.tsv`` with a header row.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import TunesmithError
from .inputs import TextFile, require_file
from .wording import counted

BOOK_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TABLE_SUFFIXES = {".csv", ".tsv"}
SHEET_SUFFIXES = {".xlsx"}
SUFFIXES = BOOK_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES | SHEET_SUFFIXES
SUPPORTED = ".txt, .md, .jsonl, .json, .csv, .tsv, .xlsx"
# A book is cleaned in sections of about this many characters, cut at blank lines (at most twice
# as many where a paragraph runs on), so memory stays bounded whatever the size of the file.
SECTION_CHARS = 8 << 20
# The longest JSON line or table record read (characters); a longer one is an error.
MAX_RECORD = 64 << 20
PART_RECORDS = 10_000  # records per part when a record file is read in parts

# Fields each record format needs; anything else in a record is counted as an extra field.
FIELDS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Corpus:
    """A cleaned input file: its format, its records (each with its source ``line``) and the fixes made."""

    format: str
    records: list[dict] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    source: str = ""
    extra_fields: dict[str, int] = field(default_factory=dict)  # field name -> records carrying it


def read_records(path: str | Path, known_word: Callable[[str], bool] | None = None) -> Corpus:
    """Read, clean and check a training file; raise ``TunesmithError`` on anything unusable.

    ``known_word`` (optional) says whether a lower-case word is a word of the language; it is
    asked only about a word hyphenated across a line break that the book itself does not settle.
    All records are returned at once; ``Reader`` gives them in parts, in bounded memory.
    """
    reader = Reader(path, known_word)
    records = [record for part in reader.parts() for record in part.records]
    return Corpus(format=reader.format, records=records, fixes=reader.fixes, source=str(reader.path),
                  extra_fields=reader.extra_fields)


class Reader:
    """One training file read in parts: a book in sections of about ``SECTION_CHARS``, a record
    file in parts of ``PART_RECORDS`` records. ``format``, ``fixes`` and ``extra_fields`` are
    complete once ``parts()`` is exhausted."""

    def __init__(self, path: str | Path, known_word: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        require_file(self.path)
        if suffix not in SUFFIXES:
            raise TunesmithError(
                f"unsupported file type '{suffix or '(none)'}'",
                file=self.path,
                hint=f"supported: {SUPPORTED}; convert other documents (PDF, Word, EPUB) to plain text first",
            )
        self.suffix = suffix
        self.known_word = known_word
        self.format = "book" if suffix in BOOK_SUFFIXES else ""
        self.fixes: list[str] = []
        self.extra_fields: dict[str, int] = {}
        self.records = 0
        self.size = 0
        self.file: TextFile | None = None

    @property
    def done_bytes(self) -> int:
        """Bytes of the file read so far."""
        return self.file.done_bytes if self.file is not None else 0

    def parts(self) -> Iterator[Corpus]:
        if self.suffix in SHEET_SUFFIXES:
            from .sheets import read_sheet

            corpus = read_sheet(self.path)
            self._take(corpus)
            self.size = self.path.stat().st_size
            yield corpus
            return
        file = self.file = TextFile(self.path)
        self.size = file.size
        if self.suffix in BOOK_SUFFIXES:
            yield from self._book_parts(file)
        else:
            if self.suffix in TABLE_SUFFIXES:
                text = _whole(file)
                corpus = _read_table(text, self.path, delimiter="\t" if self.suffix == ".tsv" else ",")
                parts: Iterator[Corpus] = iter([corpus])
            elif self.suffix == ".json":
                corpus = _read_json(_whole(file), self.path, self.suffix)
                parts = iter([corpus])
            else:
                parts = _jsonl_parts(file, self.path, self.suffix)
            for corpus in parts:
                self._take(corpus)
                yield corpus
            self.fixes = file.fixes + self.fixes
        if not self.records:
            raise TunesmithError("the file has no records", file=self.path, hint="it needs at least one example")

    def _take(self, corpus: Corpus) -> None:
        if self.format and corpus.format != self.format:
            raise TunesmithError(
                f"this part of the file is in {corpus.format} format, but it began in {self.format} format",
                file=self.path, line=corpus.records[0]["line"] if corpus.records else None,
                hint="use one format for every record of a file",
            )
        self.format = corpus.format
        corpus.source = str(self.path)
        self.records += len(corpus.records)
        for key, n in corpus.extra_fields.items():
            self.extra_fields[key] = self.extra_fields.get(key, 0) + n
        self.fixes += corpus.fixes

    def _book_parts(self, file: TextFile) -> Iterator[Corpus]:
        book = _Book(self.path, self.known_word)
        section: list[tuple[int, str]] = []
        chars = 0
        total = 0
        for number, line in file.lines():
            total = number
            if book.ended:
                continue  # after the Project Gutenberg licence marker: read only to the end
            section.append((number, line))
            chars += len(line) + 1
            if chars >= SECTION_CHARS and (not line.strip() or chars >= 2 * SECTION_CHARS):
                corpus = book.section(section)
                section, chars = [], 0
                if corpus.records:
                    self.records += len(corpus.records)
                    corpus.source = str(self.path)
                    yield corpus
        if not file.size or all(not line.strip() for _, line in section) and not self.records and not book.seen_text:
            raise TunesmithError("the file is empty", file=self.path, hint="it needs some text to learn from")
        corpus = book.section(section)
        if corpus.records:
            self.records += len(corpus.records)
            corpus.source = str(self.path)
            yield corpus
        if not self.records:
            raise TunesmithError(
                "no text is left after cleaning (only blank lines or Project Gutenberg boilerplate)",
                file=self.path,
                hint="is this the right file?",
            )
        self.fixes = file.fixes + book.fixes(total)


def _whole(file: TextFile) -> str:
    text = file.read()
    if not text.strip():
        raise TunesmithError("the file is empty", file=file.path)
    return text


def _json_line(line: str, number: int, path: Path, suffix: str) -> Any:
    """One JSON line's value, or a TunesmithError naming its line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise _json_error(exc, path, number - 1, suffix) from None
    except (ValueError, RecursionError) as exc:
        raise TunesmithError(f"malformed JSON at line {number}: {exc}", file=path, line=number) from None


def _jsonl_parts(file: TextFile, path: Path, suffix: str) -> Iterator[Corpus]:
    """JSON lines in parts of ``PART_RECORDS`` records; the format is decided by the first record."""
    items: list[tuple[int, Any]] = []
    fmt: tuple[str, int] | None = None
    seen_text = False
    for number, line in file.lines(max_line=MAX_RECORD, refuse_over=MAX_RECORD):
        if not line.strip():
            continue
        seen_text = True
        items.append((number, _json_line(line, number, path, suffix)))
        if len(items) >= PART_RECORDS:
            corpus = _records_from(items, path, fmt)
            fmt = fmt or (corpus.format, items[0][0])
            items = []
            yield corpus
    if not seen_text:
        raise TunesmithError("the file is empty", file=path, hint="it needs some text to learn from")
    if items:
        yield _records_from(items, path, fmt)


def validate_file(path: str | Path) -> Corpus:
    """Check an uploaded file; the same as ``read_records`` (never prints, only raises ``TunesmithError``)."""
    return read_records(path)


# --- bytes to text ------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """A whole text file's contents, decoded by the rule of ``inputs.TextFile`` (UTF-8, UTF-16
    with a byte-order mark, Windows-1252/Latin-1), line endings normalised to LF."""
    return TextFile(Path(path)).read()


# --- books ----------------------------------------------------------------------------------

_PG_START = re.compile(
    r"^\s*(?:\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.IGNORECASE
)
_PG_END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the |this )?Project Gutenberg)",
    re.IGNORECASE,
)
_PG_PRODUCER = re.compile(
    r"^\s*(?:produced by|this e-?(?:book|text) (?:was|is) produced|e-?text prepared by|transcribed by"
    r"|transcriber'?s? note)",
    re.IGNORECASE,
)
_SPACES = re.compile(r"[ \t\u00a0]{2,}|[\t\u00a0]")  # what needs changing: runs, tabs, no-break spaces
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A line ending in a word and one hyphen (not a "--" dash): the head of a word split at the line break.
_HYPHEN_END = re.compile(r"(?<![-\w])([^\W\d_]+)-$")
# A line ending in a dash written without spaces ("fire--", "fire\u2014"): the next line follows with no space.
_DASH_END = re.compile(r"[^\W_](?:--|\u2014|\u2013)$")
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


class _Book:
    """A book cleaned section by section (see ``Reader``): Project Gutenberg's header is looked
    for in the first section, its licence marker in every section (nothing after it is read);
    each section's wrap width and hyphenation vocabulary are its own. The counts of what was
    fixed add up over the sections, and ``fixes`` says them once."""

    def __init__(self, path: Path, known_word: Callable[[str], bool] | None) -> None:
        self.path = path
        self.known_word = known_word
        self.first = True
        self.ended = False
        self.seen_text = False
        self.counts: Counter = Counter()
        self.header: int | None = None
        self.end_line: int | None = None

    def section(self, numbered: list[tuple[int, str]]) -> Corpus:
        if not numbered:
            return Corpus(format="book")
        lines = [line for _, line in numbered]
        start, end = _gutenberg_markers(lines, find_start=self.first)
        first, last = 0, len(lines)
        if start is not None:
            first = _after_header(lines, start)
            self.header = first + numbered[0][0] - 1
        if end is not None and end >= first:
            last = end
            self.end_line = numbered[end][0]
            self.ended = True
        self.first = False
        body = _tidy_lines(numbered[first:last], self.counts)
        self.seen_text = self.seen_text or any(line for _, line in body)
        blocks: list[list[tuple[int, str]]] = []
        current: list[tuple[int, str]] = []
        for number, line in body:
            if line:
                current.append((number, line))
            elif current:
                blocks.append(current)
                current = []
        if current:
            blocks.append(current)
        if not blocks:
            return Corpus(format="book")
        width = _wrap_width([line for block in blocks for _, line in block])
        vocabulary = _vocabulary(blocks)
        verse_like = _capital_ratio(blocks, width) >= 0.5
        records = []
        for block in blocks:
            text = _flow(block, width, verse_like, vocabulary, self.known_word, self.counts)
            records.append({"text": text, "line": block[0][0]})
        return Corpus(format="book", records=records)

    def fixes(self, total_lines: int) -> list[str]:
        fixes = []
        header, c = self.header, self.counts
        footer = total_lines - self.end_line + 1 if self.end_line is not None else None
        if header is not None and footer is not None:
            fixes.append(
                f"removed Project Gutenberg header ({counted(header, 'line')}) and licence footer ({counted(footer, 'line')})"
            )
        elif header is not None:
            fixes.append(f"removed Project Gutenberg header ({counted(header, 'line')})")
        elif footer is not None:
            fixes.append(f"removed Project Gutenberg licence footer ({counted(footer, 'line')})")
        if c["trailing"]:
            fixes.append(f"removed trailing whitespace from {counted(c['trailing'], 'line')}")
        if c["runs"]:
            fixes.append(f"collapsed runs of spaces in {counted(c['runs'], 'line')}")
        if c["controls"]:
            fixes.append(f"removed control characters from {counted(c['controls'], 'line')}")
        if c["lines"]:
            fixes.append(
                f"re-flowed {counted(c['lines'], 'hard-wrapped line')} into {counted(c['paragraphs'], 'paragraph')}"
            )
        if c["hyphens"]:
            fixes.append(f"joined {counted(c['hyphens'], 'word')} hyphenated across line breaks")
        return fixes


def _gutenberg_markers(lines: list[str], find_start: bool) -> tuple[int | None, int | None]:
    """The index of Project Gutenberg's start marker (when ``find_start``) and of its end marker
    after it (or anywhere, without a start marker)."""
    start = next((i for i, line in enumerate(lines) if _PG_START.match(line)), None) if find_start else None
    first = start + 1 if start is not None else 0
    end = next((i for i in range(first, len(lines)) if _PG_END.match(lines[i])), None)
    return start, end


def _after_header(lines: list[str], start: int) -> int:
    """The first line of the book after the start marker at ``start``: blank lines and a
    "Produced by ..." credit paragraph right after the marker are skipped."""
    first = start + 1
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first < len(lines) and _PG_PRODUCER.match(lines[first]):
        while first < len(lines) and lines[first].strip():
            first += 1
        while first < len(lines) and not lines[first].strip():
            first += 1
    return first


def _tidy_lines(body: list[tuple[int, str]], counts: Counter) -> list[tuple[int, str]]:
    """Strip each line, collapse runs of spaces and tabs, drop control characters (counted in ``counts``)."""
    out = []
    for number, line in body:
        if line != line.rstrip():
            counts["trailing"] += 1
        if _CONTROL.search(line):
            counts["controls"] += 1
            line = _CONTROL.sub("", line)
        stripped = line.strip()
        collapsed = _SPACES.sub(" ", stripped)
        if collapsed != stripped:
            counts["runs"] += 1
        out.append((number, collapsed))
    return out


def _wrap_width(lines: list[str]) -> int:
    """The width the text was hard-wrapped at: the 95th percentile of line lengths."""
    lengths = [len(line) for line in lines]
    if len(lengths) < 2:
        return max(lengths, default=0)
    return int(statistics.quantiles(lengths, n=20)[-1])


def _join_hyphenated(head: str, tail: str, vocabulary: Counter, known_word: Callable[[str], bool] | None) -> bool:
    """Whether ``head-`` + ``tail`` (lower case) at a line break is one word split by the printer.

    The book decides first: whichever spelling it uses more often inside its lines wins
    ("some-thing" -> "something", "well-known" stays). When the book uses neither, a joined
    form that ``known_word`` knows is joined; two halves that the book uses as words on their
    own ("pack-saddle") make a compound; anything else is a split word ("defi-ciency").
    """
    def seen(word: str) -> int:  # a plural counts for its word: "test-tubes" shows "test-tube"
        return vocabulary[word] + vocabulary[word + "s"]

    joined, compound = seen(head + tail), seen(f"{head}-{tail}")
    if joined or compound:
        return joined >= compound
    if known_word is not None and known_word(head + tail):
        return True
    return not (seen(head) and seen(tail))


def _at_end(pattern: re.Pattern, line: str) -> re.Match | None:
    """``pattern.search(line)`` for a pattern anchored at the end: only the line's tail is
    searched (a regex search of a 1 MiB line from every position is slow), unless the match
    reaches the tail's start."""
    if len(line) <= 256:
        return pattern.search(line)
    match = pattern.search(line, len(line) - 256)
    return pattern.search(line) if match and match.start() == len(line) - 256 else match


def _vocabulary(blocks: list[list[tuple[int, str]]]) -> Counter:
    """How often each lower-cased word is seen whole in the book, to decide how to mend hyphenations.

    The two halves of a word split at a line break ("suspi-" at a line's end, "cion" at the start
    of the next) are not words of the book, so they are not counted; the parts of a compound seen
    inside a line ("well-known") are.
    """
    words: Counter = Counter()
    for block in blocks:
        split_before = False
        for _, line in block:
            low = line.lower()  # one call per line, not per word
            found = _WORD.findall(low)
            if split_before and found and low.startswith(found[0]):
                found = found[1:]  # the tail of a word split at the previous line's end
            split_before = bool(_at_end(_HYPHEN_END, line))
            if split_before and found:
                found = found[:-1]  # the head of a word split at this line's end
            words.update(found)
            if "-" in low:
                for word in found:
                    if "-" in word:
                        words.update(word.split("-"))
    return words


def _block_lines(block: list[tuple[int, str]], width: int) -> list[str]:
    lines = [line for _, line in block]
    if len(lines) > 2 and _is_label(lines[0], width):
        return lines[1:]  # a speaker or heading line ("HAMLET:") is judged apart from the speech
    return lines


def _capital_ratio(blocks: list[list[tuple[int, str]]], width: int) -> float:
    """How often a line that follows a long line starts with a capital: ~0.2 in prose, ~1 in verse."""
    after_long = capitals = 0
    for block in blocks:
        lines = _block_lines(block, width)
        for prev, line in zip(lines, lines[1:]):
            if len(prev) >= 0.6 * width:
                after_long += 1
                capitals += line[:1].isupper()
    return capitals / after_long if after_long else 1.0


def _is_wrapped(block: list[tuple[int, str]], width: int, verse_like: bool) -> bool:
    """Whether a block's line breaks come from hard wrapping rather than from the author.

    Wrapped prose has long lines (near the wrap width) before every break, and its
    continuation lines mostly start in lower case; verse, plays, lists and addresses have short
    lines or start every line with a capital, so their line breaks are kept. A block of two or
    three lines says little about capitals, so there the document's overall style decides.
    """
    lines = _block_lines(block, width)
    if len(lines) < 2 or width < 30:
        return False
    long = sum(len(line) >= 0.6 * width for line in lines[:-1])
    if long < 0.8 * (len(lines) - 1):
        return False
    if len(lines) < 4 and not verse_like:
        return True
    capitals = sum(line[:1].isupper() for line in lines[1:])
    return capitals < 0.8 * (len(lines) - 1)


def _is_label(line: str, width: int) -> bool:
    return len(line) < 0.6 * width and line.endswith(":")


def _flow(
    block: list[tuple[int, str]], width: int, verse_like: bool, vocabulary: Counter,
    known_word: Callable[[str], bool] | None, stats: dict,
) -> str:
    lines = [line for _, line in block]
    if not _is_wrapped(block, width, verse_like):
        return "\n".join(lines)
    stats["lines"] += len(lines)
    stats["paragraphs"] += 1
    text = lines[0]
    for prev, line in zip(lines, lines[1:]):
        if len(prev) < 0.6 * width:
            text += "\n" + line  # a short line inside wrapped prose is a real break (a signature, a list)
            continue
        hyphen = _at_end(_HYPHEN_END, prev)
        tail = _WORD.match(line)
        if hyphen and tail:
            tail_word = tail.group(0).split("-")[0]
            if tail_word[:1].islower() and _join_hyphenated(
                hyphen.group(1).lower(), tail_word.lower(), vocabulary, known_word
            ):
                text = text[:-1] + line
                stats["hyphens"] += 1
            else:
                text += line  # a compound ("pack-saddle", "Anglo-Saxon"): keep the hyphen, no space
            continue
        if _at_end(_DASH_END, prev):
            text += line  # a dash written without spaces ("fire--burned") stays without spaces
            continue
        text += " " + line
    return text


# --- JSON and JSONL -------------------------------------------------------------------------


def _read_json(text: str, path: Path, suffix: str) -> Corpus:
    if suffix == ".json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            return _records_from(_json_array(text, path), path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise _json_error(exc, path, 0, suffix) from None
            # several objects, one per line: JSONL under a .json name
        except (ValueError, RecursionError) as exc:
            raise TunesmithError(f"malformed JSON: {exc}", file=path, line=1) from None
        else:
            if not isinstance(obj, dict):
                raise TunesmithError(
                    f"expected a JSON array of records or one record object, found {_kind(obj)}",
                    file=path, line=1,
                )
            return _records_from([(1, obj)], path)
    items = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        items.append((number, _json_line(line, number, path, suffix)))
    return _records_from(items, path)


def _json_error(exc: json.JSONDecodeError, path: Path, line_offset: int, suffix: str = ".jsonl") -> TunesmithError:
    line = exc.lineno + line_offset
    bad_line = exc.doc.split("\n")[exc.lineno - 1] if exc.doc else ""
    start = max(0, exc.colno - 31)
    excerpt = ("\u2026" if start else "") + bad_line[start : exc.colno + 29] + ("\u2026" if len(bad_line) > exc.colno + 29 else "")
    message = f"malformed JSON at line {line}, column {exc.colno}: {exc.msg[:1].lower()}{exc.msg[1:]}"
    if excerpt.strip():
        message += f", here: {excerpt.strip()}"
    hint = (
        "each line of a .jsonl file must be one complete JSON object"
        if suffix != ".json"
        else "a .json file holds one JSON array of objects, one object, or one object per line"
    )
    return TunesmithError(message, file=path, line=line, hint=hint)


def _json_array(text: str, path: Path) -> list[tuple[int, Any]]:
    """Decode a JSON array element by element, keeping each element's line number.

    Hand-written because ``json.loads`` returns the array without positions, and an error
    must name the line of the record at fault.
    """
    decoder = json.JSONDecoder()
    try:
        json.loads(text)  # the standard parser names the line and column of a syntax error
    except json.JSONDecodeError as exc:
        raise _json_error(exc, path, 0, ".json") from None
    except (ValueError, RecursionError) as exc:
        raise TunesmithError(f"malformed JSON: {exc}", file=path, line=1) from None
    ws = re.compile(r"\s*")
    index = ws.match(text, text.index("[") + 1).end()
    items = []
    while text[index] != "]":
        obj, end = decoder.raw_decode(text, index)
        items.append((text.count("\n", 0, index) + 1, obj))
        index = ws.match(text, end).end()
        if text[index] == ",":
            index = ws.match(text, index + 1).end()
    return items


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number"
    )


def _shape(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _records_from(items: list[tuple[int, Any]], path: Path, decided: tuple[str, int] | None = None) -> Corpus:
    fmt, decided_at = decided if decided else (None, 0)
    records: list[dict] = []
    extra: dict[str, int] = {}
    for number, obj in items:
        if not isinstance(obj, dict):
            raise TunesmithError(f"expected a JSON object, found {_kind(obj)}", file=path, line=number)
        shape = _shape(obj)
        if shape is None:
            found = ", ".join(sorted(obj)) or "none"
            raise TunesmithError(
                f"this record has none of the expected fields (found: {found})",
                file=path,
                line=number,
                hint='use {"prompt", "completion"}, {"messages": [{"role", "content"}]} or {"text"}',
            )
        if fmt is None:
            fmt, decided_at = shape, number
        elif shape != fmt:
            raise TunesmithError(
                f"this record is in {shape} format, but the file is in {fmt} format (from line {decided_at})",
                file=path,
                line=number,
                hint="use one format for every record of a file",
            )
        records.append(_check_record(obj, fmt, path, number))
        for key in obj:
            if key not in FIELDS[fmt]:
                extra[key] = extra.get(key, 0) + 1
    if fmt is None:
        raise TunesmithError("the file has no records", file=path, hint="it needs at least one example")
    return Corpus(format=fmt, records=records, extra_fields=extra)


def _string(value: Any, path: Path, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise TunesmithError(f"expected a string, found {_kind(value)}", file=path, line=line, field=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TunesmithError(
            "contains an invalid \\u escape (a lone surrogate)", file=path, line=line, field=name
        ) from None
    return value


def _check_record(obj: dict, fmt: str, path: Path, line: int) -> dict:
    for name in FIELDS[fmt]:
        if name not in obj:
            raise TunesmithError(f"missing field '{name}'", file=path, line=line, field=name)
    if fmt == "chat":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise TunesmithError(
                "expected a non-empty array of messages", file=path, line=line, field="messages"
            )
        checked = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise TunesmithError(f"expected an object, found {_kind(message)}", file=path, line=line, field=where)
            for name in ("role", "content"):
                if name not in message:
                    raise TunesmithError(f"missing field '{name}'", file=path, line=line, field=f"{where}.{name}")
            role = _string(message["role"], path, line, f"{where}.role")
            if role not in ROLES:
                raise TunesmithError(
                    f"unknown role '{role}'", file=path, line=line, field=f"{where}.role",
                    hint="roles are: " + ", ".join(ROLES),
                )
            checked.append({"role": role, "content": _string(message["content"], path, line, f"{where}.content")})
            if "weight" in message:  # OpenAI's per-message weight: 0 (not learned) or 1
                if role != "assistant" or message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                    raise TunesmithError(
                        f"weight must be 0 or 1 on an assistant message, found {json.dumps(message['weight'])}"
                        + ("" if role == "assistant" else f" on a '{role}' message"),
                        file=path, line=line, field=f"{where}.weight",
                    )
                if message["weight"] == 0:  # weight 1 is the default, and is not kept
                    checked[-1]["weight"] = 0
        return {"messages": checked, "line": line}
    record = {name: _string(obj[name], path, line, name) for name in FIELDS[fmt]}
    record["line"] = line
    return record


# --- CSV and TSV ----------------------------------------------------------------------------


def _read_table(text: str, path: Path, delimiter: str) -> Corpus:
    # A cell may hold a whole chapter; the csv module's default limit is 128 KiB per field.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # skip blank lines before the header
        if header is None:
            raise TunesmithError("the file is empty", file=path)
        header_line = reader.line_num
        names = [cell.strip().lower() for cell in header]
        if "prompt" in names or "completion" in names:
            fmt = "prompt_completion"
        elif "text" in names:
            fmt = "text"
        else:
            found = ", ".join(repr(cell) for cell in header)
            raise TunesmithError(
                f"the header row has no 'prompt'/'completion' or 'text' column (found: {found})",
                file=path,
                line=header_line,
                hint="name the columns in the first row: prompt,completion or text",
            )
        missing = [name for name in FIELDS[fmt] if name not in names]
        if missing:
            found = ", ".join(repr(cell) for cell in header)
            raise TunesmithError(
                f"missing column '{missing[0]}' (found: {found})", file=path, line=header_line, field=missing[0]
            )
        columns = {name: names.index(name) for name in FIELDS[fmt]}
        extra_names = [header[i] for i, name in enumerate(names) if name not in FIELDS[fmt] and name]
        records = []
        previous = reader.line_num
        for row in reader:
            line = previous + 1
            previous = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise TunesmithError(
                    f"this row has {len(row)} fields but the header has {len(header)}",
                    file=path, line=line, hint="quote fields that contain the delimiter",
                )
            record = {}
            for name, index in columns.items():
                if index >= len(row):
                    raise TunesmithError(f"missing field '{name}'", file=path, line=line, field=name)
                record[name] = row[index]
            record["line"] = line
            records.append(record)
    except csv.Error as exc:
        raise TunesmithError(f"malformed CSV: {exc}", file=path, line=reader.line_num) from None
    extra = {name: len(records) for name in extra_names}
    return Corpus(format=fmt, records=records, extra_fields=extra)
