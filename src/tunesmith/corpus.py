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
import errno
import io
import json
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import TunesmithError
from .wording import counted

BOOK_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TABLE_SUFFIXES = {".csv", ".tsv"}
SUPPORTED = ".txt, .md, .jsonl, .json, .csv, .tsv"

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
    """
    path = Path(path)
    suffix = path.suffix.lower()
    require_file(path)
    if suffix not in BOOK_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES:
        raise TunesmithError(
            f"unsupported file type '{suffix or '(none)'}'",
            file=path,
            hint=f"supported: {SUPPORTED}; convert other documents (PDF, Word, EPUB) to plain text first",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TunesmithError(f"cannot read the file: {exc.strerror or exc}", file=path) from None
    fixes: list[str] = []
    text = decode_text(data, path, fixes)
    if not text.strip():
        raise TunesmithError("the file is empty", file=path, hint="it needs some text to learn from")
    text = _normalise_newlines(text, fixes)
    if suffix in BOOK_SUFFIXES:
        corpus = _read_book(text, path, fixes, known_word)
    elif suffix in TABLE_SUFFIXES:
        corpus = _read_table(text, path, delimiter="\t" if suffix == ".tsv" else ",")
        corpus.fixes = fixes + corpus.fixes
    else:
        corpus = _read_json(text, path, suffix)
        corpus.fixes = fixes + corpus.fixes
    corpus.source = str(path)
    if not corpus.records:
        raise TunesmithError("the file has no records", file=path, hint="it needs at least one example")
    return corpus


def require_file(path: Path) -> None:
    """Raise a ``TunesmithError`` unless ``path`` is an existing file; a broken link says why."""
    if not path.exists():
        if path.is_symlink():
            _raise_broken_link(path)
        raise TunesmithError("no such file", file=path, hint="check the path; it is relative to the current directory")
    if path.is_dir():
        raise TunesmithError("this is a directory, not a file", file=path, hint=f"pass one file ({SUPPORTED})")


def _raise_broken_link(path: Path) -> None:
    """A symbolic link that leads nowhere: say whether it loops or names a missing file."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 reports a loop this way
        looped = True
    except OSError as exc:
        looped = exc.errno == errno.ELOOP
    else:
        looped = False
    if looped:
        raise TunesmithError(
            "this is a symbolic link that leads back to itself (a symlink loop)", file=path,
            hint="point the link at a real file, or pass the file itself",
        )
    raise TunesmithError(
        f"this is a symbolic link to '{os.readlink(path)}', which does not exist", file=path,
        hint="point the link at a real file, or pass the file itself",
    )


def validate_file(path: str | Path) -> Corpus:
    """Check an uploaded file; the same as ``read_records`` (never prints, only raises ``TunesmithError``)."""
    return read_records(path)


# --- bytes to text ------------------------------------------------------------------------


def decode_text(data: bytes, path: str | Path, fixes: list[str]) -> str:
    """Text from a file's bytes: UTF-8 (a BOM is dropped) or UTF-16 with a byte-order mark.

    Anything else is a ``TunesmithError`` that says what the bytes look like and how to convert them.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        order = "little-endian" if data.startswith(b"\xff\xfe") else "big-endian"
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise TunesmithError(
                f"this file starts with a UTF-16 ({order}) byte-order mark but is not valid UTF-16 "
                f"(at byte offset {exc.start})",
                file=path, hint="re-save the file as UTF-8",
            ) from None
        fixes.append(f"decoded UTF-16 ({order}) text; UTF-8 is the usual encoding for training files")
        return text
    nul = data.find(b"\x00")
    if nul >= 0:
        utf16 = _utf16_without_bom(data)
        if utf16:
            codec = "UTF-16LE" if utf16 == "little-endian" else "UTF-16BE"
            raise TunesmithError(
                f"this looks like UTF-16 ({utf16}) text without a byte-order mark, not UTF-8",
                file=path,
                hint=f"convert it to UTF-8, e.g. `iconv -f {codec} -t UTF-8 IN > OUT`, or re-save it as UTF-8",
            )
        line = data.count(b"\n", 0, nul) + 1
        raise TunesmithError(
            f"this looks like a binary file (NUL byte at byte offset {nul})",
            file=path,
            line=line,
            hint="give a UTF-8 text file",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TunesmithError(
            f"not valid UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start})",
            file=path,
            line=line,
            hint="re-save the file as UTF-8 (most editors offer this under 'Save as' / encoding)",
        ) from None
    if text.startswith("\ufeff"):
        fixes.append("removed UTF-8 BOM")
        text = text[1:]
    return text


def _utf16_without_bom(data: bytes) -> str | None:
    """"little-endian" or "big-endian" when the bytes read as mostly-ASCII UTF-16, else None."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) // 2 * 2]
    half = len(sample) // 2
    odd_zero = sample[1::2].count(0) / half
    even_zero = sample[0::2].count(0) / half
    if odd_zero > 0.7 and even_zero < 0.1:
        return "little-endian"
    if even_zero > 0.7 and odd_zero < 0.1:
        return "big-endian"
    return None


def _normalise_newlines(text: str, fixes: list[str]) -> str:
    crlf = text.count("\r\n")
    if crlf:
        text = text.replace("\r\n", "\n")
        fixes.append(f"normalised {counted(crlf, 'CRLF line ending')}")
    cr = text.count("\r")
    if cr:
        text = text.replace("\r", "\n")
        fixes.append(f"converted {counted(cr, 'CR line ending')}")
    return text


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
_SPACES = re.compile(r"[ \t\u00a0]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A line ending in a word and one hyphen (not a "--" dash): the head of a word split at the line break.
_HYPHEN_END = re.compile(r"(?<![-\w])([^\W\d_]+)-$")
# A line ending in a dash written without spaces ("fire--", "fire\u2014"): the next line follows with no space.
_DASH_END = re.compile(r"[^\W_](?:--|\u2014|\u2013)$")
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


def _read_book(text: str, path: Path, fixes: list[str], known_word: Callable[[str], bool] | None = None) -> Corpus:
    lines = text.split("\n")
    first, last = _strip_gutenberg(lines, fixes)
    body = [(i + 1, line) for i, line in enumerate(lines[first:last], start=first)]
    body = _tidy_lines(body, fixes)
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
        raise TunesmithError(
            "no text is left after cleaning (only blank lines or Project Gutenberg boilerplate)",
            file=path,
            hint="is this the right file?",
        )
    width = _wrap_width([line for block in blocks for _, line in block])
    vocabulary = _vocabulary(blocks)
    verse_like = _capital_ratio(blocks, width) >= 0.5
    records = []
    stats = {"lines": 0, "paragraphs": 0, "hyphens": 0}
    for block in blocks:
        records.append({"text": _flow(block, width, verse_like, vocabulary, known_word, stats), "line": block[0][0]})
    if stats["lines"]:
        fixes.append(
            f"re-flowed {counted(stats['lines'], 'hard-wrapped line')} into {counted(stats['paragraphs'], 'paragraph')}"
        )
    if stats["hyphens"]:
        fixes.append(f"joined {counted(stats['hyphens'], 'word')} hyphenated across line breaks")
    return Corpus(format="book", records=records, fixes=fixes)


def _strip_gutenberg(lines: list[str], fixes: list[str]) -> tuple[int, int]:
    """Return the ``[first, last)`` line range of the book itself, without Project Gutenberg text."""
    first, last = 0, len(lines)
    start = next((i for i, line in enumerate(lines) if _PG_START.match(line)), None)
    if start is not None:
        first = start + 1
        # The small print of old texts ends with its own "*END*" line; skip to it if it follows.
        # Then skip blank lines and a "Produced by ..." credit paragraph right after the marker.
        while first < len(lines) and not lines[first].strip():
            first += 1
        if first < len(lines) and _PG_PRODUCER.match(lines[first]):
            while first < len(lines) and lines[first].strip():
                first += 1
            while first < len(lines) and not lines[first].strip():
                first += 1
    end = next((i for i in range(first, len(lines)) if _PG_END.match(lines[i])), None)
    if end is not None:
        last = end
    header, footer = first, len(lines) - last
    if start is not None and end is not None:
        fixes.append(
            f"removed Project Gutenberg header ({counted(header, 'line')}) and licence footer ({counted(footer, 'line')})"
        )
    elif start is not None:
        fixes.append(f"removed Project Gutenberg header ({counted(header, 'line')})")
    elif end is not None:
        fixes.append(f"removed Project Gutenberg licence footer ({counted(footer, 'line')})")
    return first, last


def _tidy_lines(body: list[tuple[int, str]], fixes: list[str]) -> list[tuple[int, str]]:
    """Strip each line, collapse runs of spaces and tabs, drop control characters."""
    trailing = runs = controls = 0
    out = []
    for number, line in body:
        if line != line.rstrip():
            trailing += 1
        if _CONTROL.search(line):
            controls += 1
            line = _CONTROL.sub("", line)
        stripped = line.strip()
        collapsed = _SPACES.sub(" ", stripped)
        if collapsed != stripped:
            runs += 1
        out.append((number, collapsed))
    if trailing:
        fixes.append(f"removed trailing whitespace from {counted(trailing, 'line')}")
    if runs:
        fixes.append(f"collapsed runs of spaces in {counted(runs, 'line')}")
    if controls:
        fixes.append(f"removed control characters from {counted(controls, 'line')}")
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
            found = _WORD.findall(line)
            if split_before and found and line.startswith(found[0]):
                found = found[1:]  # the tail of a word split at the previous line's end
            split_before = bool(_HYPHEN_END.search(line))
            if split_before and found:
                found = found[:-1]  # the head of a word split at this line's end
            for word in found:
                word = word.lower()
                words[word] += 1
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
        hyphen = _HYPHEN_END.search(prev)
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
        if _DASH_END.search(prev):
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
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(exc, path, number - 1, suffix) from None
        except (ValueError, RecursionError) as exc:
            raise TunesmithError(f"malformed JSON at line {number}: {exc}", file=path, line=number) from None
        items.append((number, obj))
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


def _records_from(items: list[tuple[int, Any]], path: Path) -> Corpus:
    fmt: str | None = None
    decided_at = 0
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
