"""Is it copying the book? Verbatim spans of a text that occur in the training data.

An index over the training text's token ids (the base model's tokenizer): the tokens of every
training example in order, with a separator between documents, and their suffix array
(``pydivsufsort``). Both are stored as ``.npy`` files in ``copies/`` inside the run (or
prepared) directory and memory-mapped on load; the index is rebuilt when the data or the
tokenizer changes. With a byte-level BPE tokenizer the training text is tokenized one distinct
pre-token at a time (``_PieceTokenizer``), which gives the tokenizer's own ids at about half the
CPU time; a 100M-token corpus builds in under two minutes of CPU time and 2 GB of memory.

Lookups follow infini-gram and deduplicate-text-datasets: a text's tokens are compared with
suffixes of the corpus by binary search on the suffix array. For every position of the text,
its lower bound among the sorted suffixes and that suffix's neighbour share the longest prefix
with the corpus (the "matching statistics" ``L[i]``). From ``L``:

- a maximal copied span starts at ``i`` when ``L[i] >= min_tokens`` and it is not the tail of
  the span starting at ``i - 1`` (``L[i - 1] != L[i] + 1``); its occurrences are the suffix
  array range of its tokens, found by two more binary searches;
- n-gram novelty is the share of positions ``i`` with ``L[i] < n`` (McCoy et al. 2021; Merrill
  et al. 2024: the share of the text's n-grams that never occur in the training data).

Whitespace is normalised on both sides (any run of spaces and line breaks is one space), so a
passage copied from a hard-wrapped book, or across a paragraph break, still matches. Each span
is then widened over its neighbouring characters while they agree with the corpus ignoring case
(a copied sentence that starts with a capital where the book had none) and cut to whole words
on both sides. Its location is a line of the original file: the training examples are found
in the file by their letters and digits, so line breaks, hyphenation and Project Gutenberg
boilerplate in between do not matter.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .errors import TunesmithError

INDEX_FORMAT = 2
INDEX_DIR = "copies"
NOVELTY_NS = (4, 8, 16, 32)
MAX_LOCATIONS = 3
_OCCURRENCES_CHECKED = 32  # occurrences of a span compared character by character (the rest are counted)
_CONTEXT_TOKENS = 24  # tokens decoded on each side of a match to widen it over case differences
_WINDOW = 8  # tokens compared at first in each binary search step (then 4x as many, and so on)
_CAP = 64  # match lengths are searched up to this many tokens at once (>= the longest n of novelty)
_MAX_CELLS = 1 << 22  # most tokens compared at once (keys x window), to bound memory
_BATCH_ROWS = 2048

_WORD_JOINERS = "'\u2019-"
_OPENING = "\"'([\u201c\u2018"
_CLOSING = ".,;:!?\"')]\u201d\u2019\u2026"
_NOT_ALNUM = re.compile(r"[\W_]+")
_NON_SPACE = re.compile(r"\S+")
# A chapter heading: a keyword and a number ("CHAPTER IV", "ADVENTURE I. A SCANDAL IN BOHEMIA"),
# or a Roman numeral and a title in capitals ("IX. THE ADVENTURE OF THE ENGINEER'S THUMB").
# A bare numeral ("II.") is a section, used only in a book without chapter headings.
_NUMBER_WORD = (
    r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen"
    r"|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|first|second|third|fourth|fifth|sixth|seventh"
    r"|eighth|ninth|tenth|last)"
)
_CHAPTER = re.compile(
    r"^(?:chapter|book|part|adventure|volume|stave|canto|act|letter|section)\s+"
    r"(?:(?-i:[IVXLCDM]+)|\d+|" + _NUMBER_WORD + r"(?:-\w+)?)\b.*$",
    re.IGNORECASE,
)
_NUMBERED_TITLE = re.compile(r"^(?:[IVXLCDM]+|\d+)\.\s+[^a-z]*[A-Z][^a-z]*$")
_SECTION = re.compile(r"^(?:[IVXLCDM]+|\d+)\.?$")


@dataclass
class Location:
    """Where a copied span is in the original source file."""

    line: int  # 1-based line in the original source file where the span starts
    heading: str | None  # nearest chapter heading above it, when the book has headings
    file: str  # source file name
    end_line: int | None = None  # the line where it ends


@dataclass
class Span:
    """One maximal copied span of the checked text."""

    text: str  # the copied words, with the checked text's own casing and spacing
    start: int  # character offsets in the checked text
    end: int
    n_tokens: int
    n_words: int
    count: int  # occurrences in the corpus
    locations: list[Location] = field(default_factory=list)  # where (up to MAX_LOCATIONS)


@dataclass
class CopyReport:
    """Every copied span of a text, and the summary figures."""

    spans: list[Span]
    copy_rate: float  # share of the text's tokens inside spans
    longest: Span | None
    novelty: dict[int, float]  # n -> share of the text's n-grams not in the corpus (n longer than the text: left out)
    n_tokens: int
    min_tokens: int = 12
    # n -> (novel n-grams, all n-grams): to pool novelty over several texts, add these up
    ngrams: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "min_tokens": self.min_tokens,
            "copy_rate": self.copy_rate,
            "longest": asdict(self.longest) if self.longest else None,
            "novelty": {str(n): v for n, v in self.novelty.items()},
            "ngrams": {str(n): list(v) for n, v in self.ngrams.items()},
            "spans": [asdict(s) for s in self.spans],
        }


# --- text normalisation ---------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Every run of whitespace as one space, no space at either end."""
    return " ".join(text.split())


class _Query:
    """A checked text: normalised, tokenized, with maps back to the original characters."""

    def __init__(self, text: str, tokenizer: Any) -> None:
        self.original = text
        words = list(_NON_SPACE.finditer(text))
        self.orig_starts = [m.start() for m in words]
        self.norm_starts = []
        pos = 0
        for m in words:
            self.norm_starts.append(pos)
            pos += m.end() - m.start() + 1
        self.text = " ".join(m.group(0) for m in words)
        encoding = tokenizer.encode(self.text, add_special_tokens=False)
        self.ids = np.asarray(encoding.ids, dtype=np.int64)
        # token t covers text[bounds[t]:bounds[t + 1]] (its leading space included)
        ends = [end for _, end in encoding.offsets]
        self.bounds = np.asarray([0] + ends, dtype=np.int64)
        if len(ends):
            self.bounds[-1] = len(self.text)
        self.bounds = np.maximum.accumulate(self.bounds)

    def original_offset(self, pos: int, end: bool = False) -> int:
        """The original offset of normalised position ``pos`` (``end``: of the character before it, plus one)."""
        if end:
            return self.original_offset(pos - 1) + 1
        k = bisect.bisect_right(self.norm_starts, pos) - 1
        return self.orig_starts[k] + (pos - self.norm_starts[k])

    def token_at(self, pos: int) -> int:
        """The token covering normalised character ``pos``."""
        return int(np.searchsorted(self.bounds, pos, side="right") - 1)


def _wordish(s: str, j: int) -> bool:
    c = s[j]
    if c.isalnum():
        return True
    return c in _WORD_JOINERS and 0 < j < len(s) - 1 and s[j - 1].isalnum() and s[j + 1].isalnum()


def _cuts_word(s: str, i: int) -> bool:
    """Whether a cut between ``s[i - 1]`` and ``s[i]`` falls inside a word."""
    return 0 < i < len(s) and _wordish(s, i - 1) and _wordish(s, i)


def _alnum(text: str) -> str:
    """Letters and digits only, lower case: how a passage is found in the original file."""
    return _NOT_ALNUM.sub("", text).lower()


# --- the source file: lines and headings ----------------------------------------------------


class _SourceMap:
    """The original file as one string of letters and digits, with the line of each character."""

    def __init__(self, path: Path, kind: str, files: list[Path] | None = None) -> None:
        self.path = path
        self.name = path.name
        self.files = files or [path]  # a prepared folder or glob: each of its files, in order
        self.headings: list[tuple[int, str]] = []
        self.file_headings: list[list[tuple[int, str]]] = []
        pieces: list[str] = []
        self.mark_pos: list[int] = []
        self.mark_line: list[int] = []
        self.mark_file: list[int] = []
        pos = 0
        for index, file in enumerate(self.files):
            if kind == "book":
                raw = file.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
                lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                self.file_headings.append(_headings(lines))
                segments: Iterable[tuple[int, str]] = enumerate(lines, start=1)
            else:
                from .corpus import read_records

                self.file_headings.append([])
                segments = ((r["line"], _record_text(r)) for r in read_records(file).records)
            for line, text in segments:
                piece = _alnum(text)
                self.mark_pos.append(pos)
                self.mark_line.append(line)
                self.mark_file.append(index)
                pieces.append(piece)
                pos += len(piece)
        self.headings = self.file_headings[0] if len(self.files) == 1 else []
        self.stream = "".join(pieces)

    def line_at(self, pos: int) -> int:
        return self.mark_line[max(0, bisect.bisect_right(self.mark_pos, pos) - 1)]

    def file_at(self, pos: int) -> str:
        """The name of the file at ``pos`` (relative to a prepared folder where there is one)."""
        file = self.files[self.mark_file[max(0, bisect.bisect_right(self.mark_pos, pos) - 1)]]
        if len(self.files) > 1 and self.path.is_dir() and file.is_relative_to(self.path):
            return str(file.relative_to(self.path))
        return file.name

    def heading_at(self, line: int, pos: int | None = None) -> str | None:
        headings = self.headings
        if pos is not None:
            headings = self.file_headings[self.mark_file[max(0, bisect.bisect_right(self.mark_pos, pos) - 1)]]
        k = bisect.bisect_right(headings, (line, "\uffff")) - 1
        return headings[k][1] if k >= 0 else None


def _headings(lines: list[str]) -> list[tuple[int, str]]:
    """Chapter headings: short stand-alone lines like "CHAPTER I"; bare numerals only if nothing else."""
    chapters, sections = [], []
    previous = ""
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not previous and len(text) <= 70:
            if (_NUMBERED_TITLE.match(text) or (_CHAPTER.match(text) and (text.isupper() or len(text.split()) <= 6))) \
                    and not text.endswith((",", ";", ":")):
                chapters.append((number, text))
            elif _SECTION.match(text):
                sections.append((number, text))
        previous = text
    return chapters or sections


def _record_text(record: dict) -> str:
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"])
    return "".join(record.get(name, "") for name in ("text", "prompt", "completion"))


# --- reading the training text --------------------------------------------------------------


@dataclass
class _Source:
    """What an index is built from: rows of text, their tokenizer, where to store the index."""

    data: Path  # the file whose hash decides whether the index is fresh
    index_dir: Path
    tokenizer_file: Path
    kind: str  # the data format: book, text, prompt_completion, chat
    original: Path | None  # the user's original file, for line numbers
    rows_file: Path | None  # train.jsonl, or None for a raw file
    display: str  # how a location names the rows when the original file is gone
    files: list[Path] | None = None  # the files of a prepared folder or glob (report.json "files")


def _resolve(source: str | Path) -> _Source:
    path = Path(source)
    if not path.exists():
        raise TunesmithError(
            "no such file or directory", file=path, hint="give a run dir, a prepared dir or a text file"
        )
    if path.is_dir():
        if (path / "data").is_dir() or _is_run(path):
            data = path / "data"
            if not (data / "train.jsonl").is_file():
                raise TunesmithError(
                    "this run has no data/train.jsonl, so there is nothing to compare with", file=path,
                    hint="check against the prepared data or the original text file instead",
                )
            return _prepared_source(data, path / INDEX_DIR, path / "tokenizer")
        if (path / "train.jsonl").is_file() and (path / "report.json").is_file():
            return _prepared_source(path, path / INDEX_DIR, None)
        raise TunesmithError(
            "not a run directory or a prepared directory", file=path,
            hint="give a run dir (with data/), a NAME.prepared dir, or the text file itself",
        )
    from .corpus import read_records
    from .home import home

    corpus = read_records(path)  # checks the file, with the same messages as prepare
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return _Source(
        data=path, index_dir=home() / INDEX_DIR / f"{path.stem}-{key}", tokenizer_file=_base_tokenizer(None),
        kind=corpus.format, original=path, rows_file=None, display=path.name,
    )


def _is_run(path: Path) -> bool:
    try:
        return "tunesmith_run" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _prepared_source(data: Path, index_dir: Path, tokenizer_dir: Path | None) -> _Source:
    try:
        report = json.loads((data / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = {}
    tokenizer_file = tokenizer_dir / "tokenizer.json" if tokenizer_dir is not None else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        tokenizer_file = _base_tokenizer(report.get("base"))
    original = Path(report["source"]) if isinstance(report.get("source"), str) else None
    listed = [Path(f["file"]) for f in report.get("files") or [] if isinstance(f, dict) and isinstance(f.get("file"), str)]
    files = listed if len(listed) > 1 and all(f.is_file() for f in listed) else None
    return _Source(
        data=data / "train.jsonl", index_dir=index_dir, tokenizer_file=tokenizer_file,
        kind=report.get("format", "text"), original=original, rows_file=data / "train.jsonl",
        display=str(data / "train.jsonl"), files=files,
    )


def _base_tokenizer(base: str | None) -> Path:
    from .models import DEFAULT_BASE, resolve

    path = Path(resolve(base or DEFAULT_BASE)) / "tokenizer.json"
    if not path.is_file():
        raise TunesmithError("the base model has no tokenizer.json", file=path.parent)
    return path


def _rows(source: _Source) -> Iterator[str]:
    """The training text, one example at a time, as the model saw it."""
    if source.rows_file is None:
        from .corpus import read_records

        for record in read_records(source.data).records:
            yield _record_text(record)
        return
    with open(source.rows_file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TunesmithError(f"malformed JSON: {exc}", file=source.rows_file, line=number) from None
            if not isinstance(row, dict):
                raise TunesmithError("expected a JSON object", file=source.rows_file, line=number)
            text = row.get("text") if "text" in row else (row.get("prompt") or "") + (row.get("completion") or "")
            if not isinstance(text, str):
                raise TunesmithError("missing or not a string", file=source.rows_file, line=number, field="text")
            yield text


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise TunesmithError(f"cannot read the tokenizer: {exc}", file=path) from None


# --- building -------------------------------------------------------------------------------


def _encode_rows(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


# The split of tokenizers' ByteLevel pre-tokenizer (the GPT-2 pattern, tokenizers' byte_level.rs).
_BYTE_LEVEL_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Characters up to U+24FF (Latin, Greek, Cyrillic, ..., general punctuation): the ranges where this
# pattern and the tokenizer's own regex engine are tested to agree. A row with any other character,
# or with an added token's text in it, is encoded by the tokenizer itself.
_BEYOND_TESTED = r"[^\x00-\u24ff]"


class _PieceTokenizer:
    """Tokens of many texts, each distinct pre-token ("piece") encoded by the tokenizer once.

    A byte-level BPE tokenizer without a normalizer encodes each piece of its pre-tokenizer's
    split on its own, so a text's tokens are its pieces' tokens in order. Splitting with the same
    pattern (the ``regex`` module) and looking the pieces up in a dict costs about a third of the
    CPU time of ``encode_batch``, whose cost per text dominates the build of a large index.
    """

    def __init__(self, tokenizer: Any, dtype: Any, specials: list[str]) -> None:
        import regex

        self.tokenizer = tokenizer
        self._split = regex.compile(_BYTE_LEVEL_SPLIT).findall
        self._beyond = regex.compile(_BEYOND_TESTED).search
        self._special = regex.compile("|".join(map(regex.escape, specials))).search if specials else None
        self.index: dict[str, int] = {}
        self.flat = np.zeros(0, dtype=dtype)  # every known piece's tokens, one after another
        self.starts = np.zeros(0, dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int64)

    @classmethod
    def create(cls, tokenizer: Any, dtype: Any) -> _PieceTokenizer | None:
        """One for ``tokenizer`` when it is a byte-level BPE of that kind, else None."""
        try:
            from tokenizers import models, pre_tokenizers

            pre, model = tokenizer.pre_tokenizer, tokenizer.model
            suitable = (
                tokenizer.normalizer is None
                and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
                and isinstance(model, models.BPE) and not model.dropout
            )
            specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content]
        except (ImportError, AttributeError):
            return None
        return cls(tokenizer, dtype, specials) if suitable else None

    def split(self, texts: list[str]) -> tuple[list[str], np.ndarray, list[int]]:
        """The pieces of every text this class can take; how many each has; the others' numbers."""
        pieces: list[str] = []
        counts = np.zeros(len(texts), dtype=np.int64)
        others: list[int] = []
        for k, text in enumerate(texts):
            if (not text.isascii() and self._beyond(text)) or (self._special is not None and self._special(text)):
                others.append(k)
                continue
            found = self._split(text, concurrent=True)
            pieces += found
            counts[k] = len(found)
        return pieces, counts, others

    def encode(self, texts: list[str], split: tuple[list[str], np.ndarray, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' tokens in one array, and each text's number of tokens."""
        pieces, counts, others = split
        index = self.index
        fresh = [p for p in dict.fromkeys(pieces) if p not in index]
        if fresh:  # pieces not seen before: encode them and keep their tokens
            ids = _encode_rows(self.tokenizer, fresh)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.flat.dtype, count=int(lengths.sum()))
            index.update(zip(fresh, range(len(index), len(index) + len(fresh))))
            self.starts = np.concatenate([self.starts, len(self.flat) + np.cumsum(lengths) - lengths])
            self.flat = np.concatenate([self.flat, flat])
            self.lengths = np.concatenate([self.lengths, lengths])
        codes = np.fromiter(map(index.__getitem__, pieces), dtype=np.int64, count=len(pieces))
        lengths = self.lengths[codes]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        tokens = self.flat[np.repeat(self.starts[codes] - (ends - lengths), lengths) + np.arange(total)]
        text_ends = np.concatenate([[0], ends])[np.cumsum(counts)]
        text_lengths = np.diff(np.concatenate([[0], text_ends]))
        if not others:
            return tokens, text_lengths
        parts = np.split(tokens, text_ends[:-1])  # then the tokenizer's own tokens for the other texts
        for k, ids in zip(others, _encode_rows(self.tokenizer, [texts[k] for k in others])):
            parts[k] = np.asarray(ids, dtype=tokens.dtype)
            text_lengths[k] = len(ids)
        return np.concatenate(parts), text_lengths


def _encode_batches(batches: Iterable[list[str]], tokenizer: Any, dtype: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, tokens per text)`` of each batch of texts, in order. With a byte-level tokenizer
    a second thread splits the next batches into pieces while this one looks them up."""
    pieces = _PieceTokenizer.create(tokenizer, dtype)
    if pieces is None:
        for texts in batches:
            ids = _encode_rows(tokenizer, texts)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            yield np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())), lengths
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append((texts, pool.submit(pieces.split, texts)))
            if len(pending) > 2:  # at most three batches in memory at once
                texts, split = pending.popleft()
                yield pieces.encode(texts, split.result())
        while pending:
            texts, split = pending.popleft()
            yield pieces.encode(texts, split.result())


def tokenize_corpus(rows: Iterable[str], tokenizer: Any, joined: bool, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows' tokens in one array, and each row's first token index.

    ``joined`` (a book): rows continue one another, separated by a space; otherwise each row is
    its own document, followed by the separator ``sep`` that no match can cross.
    """
    dtype = np.uint16 if sep <= np.iinfo(np.uint16).max else np.uint32

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        first = True
        for text in rows:
            text = _normalise(text)
            batch.append(text if (first or not joined or not text) else " " + text)
            first = first and not text
            if len(batch) >= _BATCH_ROWS:
                yield batch
                batch = []
        if batch:
            yield batch

    chunks: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    total = 0
    for tokens, lengths in _encode_batches(batches(), tokenizer, dtype):
        if not joined:  # the separator after every row that has text (an empty row keeps its number only)
            ends = np.cumsum(lengths)
            tokens = np.insert(tokens, ends[lengths > 0], sep)
            lengths = lengths + (lengths > 0)
        starts.append(total + np.cumsum(lengths) - lengths)
        chunks.append(tokens)
        total += len(tokens)
    if joined and total:
        chunks.append(np.asarray([sep], dtype=dtype))
        total += 1
    tokens = np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype=dtype)
    return tokens, np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The suffix array of a token array (int32 while it fits, else int64).

    libdivsufsort sorts bytes; tokens are written big-endian so that byte order is token order,
    and only suffixes that start on a token boundary are kept (done here in chunks, which uses
    less memory than pydivsufsort's own conversion).
    """
    from pydivsufsort import divsufsort

    if len(tokens) == 0:
        return np.zeros(0, dtype=np.int32)
    width = tokens.dtype.itemsize
    raw = tokens.astype(f">u{width}").view(np.uint8)
    sa_bytes = divsufsort(raw)
    del raw
    out_dtype = np.int32 if len(tokens) <= np.iinfo(np.int32).max else np.int64
    out = np.empty(len(tokens), dtype=out_dtype)
    filled = 0
    step = 1 << 24
    for lo in range(0, len(sa_bytes), step):
        part = sa_bytes[lo : lo + step]
        keep = part[part % width == 0] // width
        out[filled : filled + len(keep)] = keep
        filled += len(keep)
    return out


# --- the index ------------------------------------------------------------------------------


class CopyIndex:
    """A suffix-array index of a training corpus; ``check`` finds copied spans in a text."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, rows: np.ndarray, tokenizer: Any, sep: int,
                 source: _Source | None = None, meta: dict | None = None, buckets: np.ndarray | None = None) -> None:
        # plain ndarray views of the memory maps: indexing a np.memmap costs a Python call each time
        self.tokens = np.asarray(tokens)
        self.sa = np.asarray(sa)
        self.buckets = first_token_buckets(self.tokens, sep) if buckets is None else np.asarray(buckets)
        self.rows = rows
        self.tokenizer = tokenizer
        self.sep = sep
        self.source = source
        self.meta = meta or {}
        self._source_map: _SourceMap | None | bool = None
        self._row_pos: dict[int, int] = {}

    # -- opening and building --

    @classmethod
    def open(cls, source: str | Path, rebuild: bool = False, say: Callable[[str], None] | None = None) -> CopyIndex:
        """The index of a run dir (its ``data/train.jsonl``), a prepared dir or any file ``prepare``
        accepts: built on first use, and again whenever the data or the tokenizer has changed.
        ``say`` (optional) is told when the index is being built, which can take a while."""
        src = _resolve(source)
        tokenizer = _load_tokenizer(src.tokenizer_file)
        want = {
            "format": INDEX_FORMAT,
            "data_hash": _hash_file(src.data),
            "tokenizer_hash": _hash_file(src.tokenizer_file),
        }
        meta = None if rebuild else _read_meta(src.index_dir)
        for _attempt in (1, 2):
            if meta is None or any(meta.get(k) != v for k, v in want.items()):
                if say is not None:
                    stale = "" if meta is None else " again (the training data has changed)"
                    say(f"building the copy index of {src.data}{stale} ...")
                meta, built = cls._build(src, tokenizer, want)
                if built is not None:  # the directory is not writable: keep the index in memory
                    return cls(*built, tokenizer, int(meta["separator"]), src, meta)
            try:
                tokens = np.load(src.index_dir / "tokens.npy", mmap_mode="r")
                sa = np.load(src.index_dir / "sa.npy", mmap_mode="r")
                rows = np.load(src.index_dir / "rows.npy")
                buckets = np.load(src.index_dir / "buckets.npy")
                if len(tokens) == len(sa) == meta.get("tokens"):
                    return cls(tokens, sa, rows, tokenizer, int(meta["separator"]), src, meta, buckets)
            except (OSError, ValueError):
                pass
            meta = None  # damaged files (a disk that filled up, a file edited by hand): build again
        raise TunesmithError("the copy index cannot be read back after building it", file=src.index_dir)

    @staticmethod
    def _build(src: _Source, tokenizer: Any, want: dict) -> tuple[dict, tuple | None]:
        """Build and store the index; returns its meta, and the arrays when they could not be stored."""
        sep = _separator(tokenizer)
        started, cpu_started = time.perf_counter(), time.process_time()
        tokens, rows = tokenize_corpus(_rows(src), tokenizer, joined=src.kind == "book", sep=sep)
        if len(tokens) == 0:
            raise TunesmithError("the training data has no text to compare with", file=src.data)
        tokenized, cpu_tokenized = time.perf_counter(), time.process_time()
        sa = suffix_array(tokens)
        sorted_at, cpu_sorted = time.perf_counter(), time.process_time()
        buckets = first_token_buckets(tokens, sep)
        meta = {**want, "separator": sep, "tokens": len(tokens), "rows": len(rows), "kind": src.kind,
                "source": str(src.original) if src.original else None}
        try:
            with atomic_dir(src.index_dir, overwrite=True) as tmp:
                np.save(tmp / "tokens.npy", tokens)
                np.save(tmp / "sa.npy", sa)
                np.save(tmp / "rows.npy", rows)
                np.save(tmp / "buckets.npy", buckets)
                meta["build_seconds"] = {  # wall clock, and CPU time of all threads
                    "tokenize": round(tokenized - started, 3),
                    "tokenize_cpu": round(cpu_tokenized - cpu_started, 3),
                    "suffix_array": round(sorted_at - tokenized, 3),
                    "suffix_array_cpu": round(cpu_sorted - cpu_tokenized, 3),
                    "write": round(time.perf_counter() - sorted_at, 3),
                }
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except OSError:
            return meta, (tokens, sa, rows)
        return meta, None

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: Any, joined: bool = False) -> CopyIndex:
        """An in-memory index of some texts (no files, no source lines)."""
        sep = _separator(tokenizer)
        tokens, rows = tokenize_corpus(texts, tokenizer, joined=joined, sep=sep)
        return cls(tokens, suffix_array(tokens), rows, tokenizer, sep)

    # -- checking --

    def check(self, text: str, min_tokens: int = 12) -> CopyReport:
        """Every maximal span of ``text`` of at least ``min_tokens`` tokens that occurs in the corpus."""
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise TunesmithError(f"min tokens must be a positive whole number, not {min_tokens!r}", field="min_tokens")
        query = self._query(text)
        m = len(query.ids)
        lengths = self.match_lengths(query.ids, cap=_CAP)
        spans = self._spans(query, lengths, min_tokens)
        covered = np.zeros(m, dtype=bool)
        for _span, (t0, t1) in spans:
            covered[t0:t1] = True
        found = [span for span, _ in spans]
        return CopyReport(
            spans=found,
            copy_rate=float(covered.mean()) if m else 0.0,
            longest=max(found, key=lambda s: (s.n_tokens, -s.start)) if found else None,
            novelty=novelty_from_lengths(lengths, NOVELTY_NS),
            n_tokens=m,
            min_tokens=min_tokens,
            ngrams=ngram_counts(lengths, NOVELTY_NS),
        )

    def novelty(self, text: str, ns: Iterable[int] = NOVELTY_NS) -> dict[int, float]:
        """For each n, the share of the text's n-token n-grams that never occur in the corpus."""
        query = self._query(text)
        ns = list(ns)
        return novelty_from_lengths(self.match_lengths(query.ids, cap=max(ns, default=1)), ns)

    def _query(self, text: str) -> _Query:
        if not isinstance(text, str) or not text.strip():
            raise TunesmithError("the text to check is empty", hint="give some text, or --file with a non-empty file")
        return _Query(text, self.tokenizer)

    # -- suffix array search --

    def _compare(self, q: np.ndarray, qstart: np.ndarray, klen: np.ndarray, pos: np.ndarray,
                 skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compare keys ``q[qstart : qstart + klen]`` with the corpus suffixes at ``pos``, knowing
        that their first ``skip`` tokens agree. Returns the common prefix lengths and the order:
        -1 suffix < key, 0 the suffix starts with the key, +1 suffix > key."""
        n, m = len(self.tokens), len(q)
        lcp = skip.astype(np.int64)
        order = np.zeros(len(pos), dtype=np.int64)
        todo = np.arange(len(pos))
        width = _WINDOW
        while len(todo):
            cols = np.arange(width)[None, :]
            off = lcp[todo, None] + cols
            cidx = pos[todo, None] + off
            corpus = self.tokens[np.minimum(cidx, n - 1)].astype(np.int64)
            corpus[cidx >= n] = -1  # past the end: a shorter suffix sorts first
            inside = off < klen[todo, None]
            key = q[np.minimum(qstart[todo, None] + off, m - 1)]
            differs = (corpus != key) & inside
            stop = differs | ~inside
            done = stop.any(axis=1)
            first = stop.argmax(axis=1)
            rows = np.arange(len(todo))
            ended = done & ~differs[rows, first]
            sign = np.sign(corpus[rows, first] - key[rows, first])
            finished = todo[done]
            lcp[finished] += first[done]
            order[finished] = np.where(ended[done], 0, sign[done])
            lcp[todo[~done]] += width
            todo = todo[~done]
            # a long match: look further ahead at once, within a bounded amount of memory
            width = max(_WINDOW, min(width * 4, _MAX_CELLS // max(1, len(todo))))
        return lcp, order

    def _search(self, q: np.ndarray, qstart: np.ndarray, klen: np.ndarray,
                upper: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Binary search on the suffix array for every key at once (Manber and Myers, with the
        common-prefix shortcut). Returns ``lo``, the first index whose suffix is >= the key
        (``upper``: > the key), and the common prefix lengths of the key with the suffixes at
        ``lo - 1`` and ``lo``."""
        # start inside the range of suffixes that begin with the key's first token
        first = q[qstart]
        lo = self.buckets[first].astype(np.int64)
        hi = self.buckets[first + 1].astype(np.int64)
        lcp_lo = np.where((hi > lo) & (klen > 0), 1, 0).astype(np.int64)
        lcp_hi = lcp_lo.copy()
        while True:
            act = np.nonzero(lo < hi)[0]
            if not len(act):
                return lo, lcp_lo, lcp_hi
            mid = (lo[act] + hi[act]) // 2
            pos = np.asarray(self.sa[mid], dtype=np.int64)
            lcp, order = self._compare(q, qstart[act], klen[act], pos, np.minimum(lcp_lo[act], lcp_hi[act]))
            right = (order < 0) | ((order == 0) & upper)
            lo[act] = np.where(right, mid + 1, lo[act])
            lcp_lo[act] = np.where(right, lcp, lcp_lo[act])
            hi[act] = np.where(right, hi[act], mid)
            lcp_hi[act] = np.where(right, lcp_hi[act], lcp)

    def match_lengths(self, ids: np.ndarray, cap: int | None = None) -> np.ndarray:
        """``L[i]``: the length of the longest prefix of ``ids[i:]`` that occurs in the corpus (the
        longest common prefix with either neighbour of its place in the suffix array), or ``cap``
        when it is at least that long."""
        q = np.asarray(ids, dtype=np.int64)
        m = len(q)
        if m == 0 or len(self.sa) == 0:
            return np.zeros(m, dtype=np.int64)
        starts = np.arange(m, dtype=np.int64)
        klen = m - starts if cap is None else np.minimum(m - starts, cap)
        _, lcp_lo, lcp_hi = self._search(q, starts, klen)
        return np.maximum(lcp_lo, lcp_hi)

    def _longest(self, q: np.ndarray, i: int) -> int:
        """The exact ``L[i]``."""
        _, lcp_lo, lcp_hi = self._search(q, np.asarray([i]), np.asarray([len(q) - i]))
        return int(max(lcp_lo[0], lcp_hi[0]))

    def _occurs(self, q: np.ndarray, i: int, length: int) -> bool:
        """Whether ``q[i : i + length]`` occurs in the corpus."""
        _, _, lcp_hi = self._search(q, np.asarray([i]), np.asarray([length]))
        return bool(lcp_hi[0] >= length)

    def maximal_matches(self, ids: np.ndarray, capped: np.ndarray, cap: int, floor: int = 1) -> list[tuple[int, int]]:
        """``(i, L[i])`` for every maximal match of at least ``floor`` tokens: a match that is not
        the tail of the one before (``L[i - 1] != L[i] + 1``). ``capped`` is ``match_lengths(ids, cap)``.

        Below ``cap`` the capped lengths are exact. A run of positions at the cap is one long match
        at its first position, whose exact length (end ``e``) is searched for; the next maximal
        match inside the run is the first ``j`` where ``ids[j : e + 1]`` occurs, which only gets
        more likely as ``j`` grows, so it is found by bisection, and for ``j`` within ``cap`` of
        ``e`` straight from the capped lengths. This keeps a long copied text from costing a
        search of its full length at every position."""
        q = np.asarray(ids, dtype=np.int64)
        m = len(q)
        lc = np.asarray(capped, dtype=np.int64)
        previous = np.concatenate([[-1], lc[:-1]])
        out = [(int(i), int(lc[i])) for i in np.nonzero((lc >= floor) & (lc < cap) & (previous != lc + 1))[0]]
        at_cap = lc >= cap
        i = 0
        while i < m:
            if not at_cap[i] or (i > 0 and at_cap[i - 1]):
                i += 1
                continue
            last = i  # the run of capped positions is [i, last]
            while last + 1 < m and at_cap[last + 1]:
                last += 1
            start = i
            while True:
                length = self._longest(q, start)
                out.append((start, length))
                end = start + length  # positions start+1 .. end-1 hold the tail of this match
                top = min(last, end)
                if end >= m or top <= start:
                    break

                def extends(j: int, end: int = end) -> bool:  # does q[j : end + 1] occur?
                    need = end + 1 - j
                    return bool(lc[j] >= need) if need <= cap else self._occurs(q, j, need)

                if not extends(top):
                    break
                lo, hi = start + 1, top  # the first j in [lo, hi] that extends; hi does
                while lo < hi:
                    mid = (lo + hi) // 2
                    if extends(mid):
                        hi = mid
                    else:
                        lo = mid + 1
                start = lo
            i = last + 1
        return sorted(match for match in out if match[1] >= floor)

    def occurrences(self, ids: np.ndarray, starts: np.ndarray | None = None,
                    lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Suffix-array ranges ``[lo, hi)`` of the suffixes that start with ``ids[s : s + l]`` for
        each start ``s`` and length ``l`` (default: all of ``ids``)."""
        q = np.asarray(ids, dtype=np.int64)
        starts = np.zeros(1, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
        lengths = np.full(len(starts), len(q)) if lengths is None else np.asarray(lengths, dtype=np.int64)
        lo, _, _ = self._search(q, starts, lengths)
        hi, _, _ = self._search(q, starts, lengths, upper=True)
        return lo, hi

    # -- spans --

    def _spans(self, query: _Query, capped: np.ndarray, min_tokens: int) -> list[tuple[Span, tuple[int, int]]]:
        floor = max(1, min_tokens - 2)  # a few tokens short may still reach min_tokens once widened
        matches = self.maximal_matches(query.ids, capped, _CAP, floor)
        found: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # (a, b, count, [(pos, offset)])
        starts = np.asarray([i for i, _ in matches], dtype=np.int64)
        los, his = self.occurrences(query.ids, starts, np.asarray([n for _, n in matches], dtype=np.int64))
        for (i, length), lo, hi in zip(matches, los.tolist(), his.tolist()):
            if hi <= lo:
                continue
            checked = np.sort(np.asarray(self.sa[lo : min(hi, lo + _OCCURRENCES_CHECKED)], dtype=np.int64))
            best: tuple[int, int] | None = None
            hits: list[tuple[int, int]] = []
            for pos in checked:
                widened = self._widen(query, i, length, int(pos))
                if widened is None:
                    continue
                a, b, offset = widened
                if best is None or (b - a) > (best[1] - best[0]):
                    best, hits = (a, b), [(int(pos), offset)]
                elif (a, b) == best:
                    hits.append((int(pos), offset))
            if best is None:
                continue
            count = len(hits) if hi - lo <= _OCCURRENCES_CHECKED else hi - lo
            found.append((best[0], best[1], count, hits))
        # drop spans inside another (a shorter match the widening has already covered)
        found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
        kept: list[tuple[int, int, int, list[tuple[int, int]]]] = []
        for item in found:
            if any(k[0] <= item[0] and item[1] <= k[1] for k in kept):
                continue
            kept.append(item)
        out = []
        for a, b, count, hits in kept:
            t0, t1 = query.token_at(a), query.token_at(b - 1) + 1
            if t1 - t0 < min_tokens:
                continue
            start, end = query.original_offset(a), query.original_offset(b, end=True)
            span_text = query.original[start:end]
            locations = [self._locate(pos, offset, span_text) for pos, offset in hits[:MAX_LOCATIONS]]
            out.append((
                Span(text=span_text, start=start, end=end, n_tokens=t1 - t0, n_words=len(span_text.split()),
                     count=int(count), locations=locations),
                (t0, t1),
            ))
        return out

    def _decode(self, lo: int, hi: int) -> str:
        """Corpus text of tokens ``[lo, hi)``, stopping at a document separator."""
        lo, hi = max(lo, 0), min(hi, len(self.tokens))
        ids = np.asarray(self.tokens[lo:hi], dtype=np.int64)
        ids = ids[ids != self.sep]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False) if len(ids) else ""

    def _context(self, pos: int, length: int) -> tuple[str, str]:
        before = np.asarray(self.tokens[max(0, pos - _CONTEXT_TOKENS) : pos], dtype=np.int64)
        cut = np.nonzero(before == self.sep)[0]
        if len(cut):
            before = before[cut[-1] + 1 :]
        after = np.asarray(self.tokens[pos + length : pos + length + _CONTEXT_TOKENS], dtype=np.int64)
        cut = np.nonzero(after == self.sep)[0]
        if len(cut):
            after = after[: cut[0]]
        dec = self.tokenizer.decode
        return (dec(before.tolist(), skip_special_tokens=False) if len(before) else "",
                dec(after.tolist(), skip_special_tokens=False) if len(after) else "")

    def _widen(self, query: _Query, i: int, length: int, pos: int) -> tuple[int, int, int] | None:
        """The match of tokens ``[i, i + length)`` at corpus position ``pos`` as a character span
        ``(a, b)`` of the normalised text, widened over neighbouring characters that agree with the
        corpus ignoring case, then cut to whole words on both sides. The third value is the span's
        start minus the match's start in corpus characters (negative when widened to the left)."""
        q = query.text
        a, b = int(query.bounds[i]), int(query.bounds[i + length])
        left, right = self._context(pos, length)
        core = q[a:b]
        k = 0
        while k < len(left) and k < a and _same(q[a - 1 - k], left[-1 - k]):
            k += 1
        r = 0
        while r < len(right) and b + r < len(q) and _same(q[b + r], right[r]):
            r += 1
        corpus = left + core + right
        ca, cb = len(left) - k, len(left) + len(core) + r
        qa, qb = a - k, b + r
        # start at a whole word (with its opening quote), end after a whole word (with its closing punctuation)
        while qa < qb and (not q[qa].isalnum() or _cuts_word(q, qa) or _cuts_word(corpus, ca)):
            qa += 1
            ca += 1
        while qb > qa and (not q[qb - 1].isalnum() or _cuts_word(q, qb) or _cuts_word(corpus, cb)):
            qb -= 1
            cb -= 1
        if qb <= qa:
            return None
        while qa > a - k and q[qa - 1] in _OPENING:
            qa -= 1
            ca -= 1
        while qb < b + r and q[qb] in _CLOSING:
            qb += 1
        return qa, qb, ca - len(left)

    # -- locations --

    def _source(self) -> _SourceMap | None:
        if self._source_map is None:
            self._source_map = False
            original = self.source.original if self.source else None
            files = self.source.files if self.source else None
            if original is not None and (original.is_file() or files):
                try:
                    self._source_map = _SourceMap(original, self.meta.get("kind", "text"), files)
                except (OSError, TunesmithError):
                    self._source_map = False
        return self._source_map or None

    def _row_of(self, pos: int) -> int:
        return int(np.searchsorted(self.rows, pos, side="right") - 1)

    def _row_in_source(self, smap: _SourceMap, row: int) -> int:
        """Where row ``row`` starts in the source's letter stream (-1: not found)."""
        if row not in self._row_pos:
            end = self.rows[row + 1] if row + 1 < len(self.rows) else len(self.tokens)
            needle = _alnum(self._decode(int(self.rows[row]), int(end)).replace(chr(0xFFFD), ""))
            found = -1
            if needle:
                if len(needle) < 64 and row + 1 < len(self.rows):  # a short row ("I.") is found with what follows
                    nxt_end = self.rows[row + 2] if row + 2 < len(self.rows) else len(self.tokens)
                    found = smap.stream.find(needle + _alnum(self._decode(int(end), int(nxt_end)))[:64])
                if found < 0:
                    found = smap.stream.find(needle)
            self._row_pos[row] = found
        return self._row_pos[row]

    def _locate(self, pos: int, offset: int, text: str) -> Location:
        row = self._row_of(pos)
        smap = self._source()
        if smap is not None:
            start = self._row_in_source(smap, row)
            if start >= 0:
                before = self._decode(int(self.rows[row]), pos)
                if offset < 0:
                    before = before[:offset] if -offset <= len(before) else ""
                else:
                    before += self._decode(pos, pos + _CONTEXT_TOKENS)[:offset]
                first = start + len(_alnum(before))
            else:  # the example is not in the file as it is (a chat template around it): find the words
                first = smap.stream.find(_alnum(text))
            if first >= 0:
                line = smap.line_at(first)
                end_line = smap.line_at(first + max(0, len(_alnum(text)) - 1))
                return Location(line=line, heading=smap.heading_at(line, first), file=smap.file_at(first),
                                end_line=end_line)
        name = self.source.display if self.source else "corpus"
        return Location(line=row + 1, heading=None, file=name, end_line=row + 1)


def first_token_buckets(tokens: np.ndarray, sep: int) -> np.ndarray:
    """``b[t]:b[t + 1]`` is the suffix-array range of the suffixes that start with token ``t``."""
    counts = np.bincount(np.asarray(tokens), minlength=sep + 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _separator(tokenizer: Any) -> int:
    """A token id that no text encodes to: the largest uint16 when the vocabulary fits below it."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return int(np.iinfo(np.uint16).max) if vocab < np.iinfo(np.uint16).max else vocab


def _same(x: str, y: str) -> bool:
    return x == y or x.lower() == y.lower()


def _read_meta(index_dir: Path) -> dict | None:
    try:
        meta = json.loads((index_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not all((index_dir / name).is_file() for name in ("tokens.npy", "sa.npy", "rows.npy", "buckets.npy")):
        return None
    return meta if isinstance(meta, dict) else None


def ngram_counts(lengths: np.ndarray, ns: Iterable[int] = NOVELTY_NS) -> dict[int, tuple[int, int]]:
    """For each n: how many of the text's n-grams are not in the corpus (``L[i] < n``), and how many there are."""
    m = len(lengths)
    return {int(n): (int(np.sum(np.asarray(lengths[: m - n + 1]) < n)), m - n + 1) for n in ns if m >= n}


def novelty_from_lengths(lengths: np.ndarray, ns: Iterable[int] = NOVELTY_NS) -> dict[int, float]:
    """Share of the text's n-grams that are not in the corpus; an n longer than the text is left out."""
    return {n: novel / total for n, (novel, total) in ngram_counts(lengths, ns).items()}


def find_copies(source: str | Path, text: str, min_tokens: int = 12) -> CopyReport:
    """``CopyIndex.open(source).check(text, min_tokens)``."""
    return CopyIndex.open(source).check(text, min_tokens=min_tokens)


# --- showing a report -----------------------------------------------------------------------


def marked_pieces(text: str, spans: list[Span]) -> list[tuple[str, bool]]:
    """``text`` cut into ``(piece, copied)`` pieces; overlapping spans are marked as one."""
    regions: list[list[int]] = []
    for span in sorted(spans, key=lambda s: s.start):
        if regions and span.start <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], span.end)
        else:
            regions.append([span.start, span.end])
    pieces, pos = [], 0
    for start, end in regions:
        if start > pos:
            pieces.append((text[pos:start], False))
        pieces.append((text[start:end], True))
        pos = end
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def mark_text(text: str, spans: list[Span], left: str = "[[", right: str = "]]") -> str:
    """``text`` with every copied region between ``left`` and ``right``."""
    return "".join(f"{left}{piece}{right}" if copied else piece for piece, copied in marked_pieces(text, spans))


def describe_location(where: Location) -> str:
    lines = f"line {where.line}" if where.end_line in (None, where.line) else f"lines {where.line}-{where.end_line}"
    text = f"{where.file} {lines}"
    return f"{text} ({where.heading})" if where.heading else text


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_summary(report: CopyReport) -> str:
    """Two lines: copy rate and longest span, then novelty."""
    if report.spans:
        longest = report.longest
        first = (
            f"copied: {_percent(report.copy_rate)} of {report.n_tokens:,} tokens in {len(report.spans)} "
            f"span{'s' if len(report.spans) != 1 else ''} of {report.min_tokens}+ tokens; longest "
            f"{longest.n_tokens} tokens ({longest.n_words} words)"
        )
        if longest.locations:
            first += ", " + describe_location(longest.locations[0])
    else:
        first = (
            f"copied: nothing ({report.n_tokens:,} tokens, "
            f"no span of {report.min_tokens}+ tokens in the training text)"
        )
    if report.novelty:
        novel = "  ".join(f"{n}-grams {_percent(v)}" for n, v in report.novelty.items())
        return f"{first}\nnovel (not in the training text): {novel}"
    return first


def format_report(report: CopyReport) -> str:
    """The summary, then every span with its size, count and locations (plain text)."""
    lines = [format_summary(report)]
    for number, span in enumerate(report.spans, start=1):
        times = "once" if span.count == 1 else f"{span.count:,} times"
        lines.append("")
        lines.append(f"{number}. {span.n_tokens} tokens, {span.n_words} words, {times} in the training text")
        for where in span.locations:
            lines.append(f"   at {describe_location(where)}")
        lines.append("   " + " ".join(span.text.split()))
    return "\n".join(lines)
