"""From a training file to training examples: ``NAME.prepared/{train,valid}.jsonl`` and a report.

This is tunesmith's ``prepare_data`` step. It reads and cleans the file (``corpus``), cuts books
into token-budgeted examples that end on sentence boundaries, renders chat rows with the base
model's chat template, removes duplicates and empty completions, splits off a validation set,
and runs the checks OpenAI's legacy ``openai tools fine_tunes.prepare_data`` ran, reporting
what it fixed and what it recommends instead of asking questions.

Every example's tokens plus one EOS token fit in ``block_size`` (the trainer may append EOS).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import unicodedata
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .atomic import atomic_dir, write_json
from .config import TrainConfig, in_bounds, spec
from .corpus import FIELDS, SUFFIXES, SUPPORTED, Corpus, Reader
from .errors import TunesmithError
from .inputs import MAX_LINE, input_files
from .wording import counted

MIN_BLOCK_SIZE = spec(TrainConfig, "block_size")["min"]
RECOMMENDED_EXAMPLES = 100
RECOMMENDED_BOOK_TOKENS = 20_000
# The fields of the rows written to train.jsonl / valid.jsonl, per source format.
ROW_FIELDS = {
    "book": ("text",),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("prompt", "completion"),
}


@dataclass
class Prepared:
    """A prepared data set: its directory, its report and its rows (``Rows``: read from the
    directory's JSONL files when used, so a large data set is never held in memory)."""

    dir: Path
    report: dict
    train: Sequence[dict]
    valid: Sequence[dict]


class Rows(Sequence):
    """The rows of a ``train.jsonl`` or ``valid.jsonl``, read from the file each time they are
    used; it compares equal to a list of the same rows."""

    def __init__(self, path: Path, fields: tuple[str, ...], count: int | None = None) -> None:
        self.path, self.fields, self._count = Path(path), fields, count

    def __iter__(self) -> Iterator[dict]:
        return _iter_rows(self.path, self.fields)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            if index.step is None and (index.start or 0) >= 0 and (index.stop is not None and index.stop >= 0):
                return list(islice(self, index.start, index.stop))
            return list(self)[index]
        if index < 0:
            index += len(self)
        for row in islice(self, index, None):
            return row
        raise IndexError(index)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, Rows)) and list(self) == list(other)

    def __add__(self, other) -> list[dict]:
        return list(self) + list(other)

    def __repr__(self) -> str:
        return f"Rows({str(self.path)!r})"


def default_output(path: str | Path) -> Path:
    """``NAME.prepared`` beside the input file."""
    path = Path(path)
    return path.parent / f"{path.stem}.prepared"


def prepare(
    path: str | Path,
    *,
    out: str | Path | None = None,
    base: str | os.PathLike = TrainConfig.base,
    tokenizer: Any = None,
    block_size: int = TrainConfig.block_size,
    fraction: float = 1.0,
    max_tokens: int | None = None,
    valid_fraction: float = TrainConfig.valid_fraction,
    dedupe: bool = True,
    seed: int = TrainConfig.seed,
    overwrite: bool = False,
    estimate: Callable[[Prepared], dict] | None = None,
    progress: bool = False,
) -> Prepared:
    """Read ``path``, build train/valid examples and write them with ``report.json`` and the
    token shards (tokens.py), atomically.

    ``path`` is a file, a folder (its files of the supported types, recursively, in path order)
    or a glob; it is read in parts and the examples are spooled to disk, so memory stays bounded
    whatever its size. ``progress`` shows a progress bar (bytes read, MB/s) on stderr.
    ``out`` defaults to ``NAME.prepared`` beside the input; an existing one is replaced only with
    ``overwrite``. ``tokenizer`` (a Hugging Face tokenizer) defaults to ``base``'s. ``fraction``
    keeps the first part of the examples (of a book: its first part), then ``max_tokens`` keeps
    examples while their total fits (always at least one). The validation set is a seeded random
    choice of ``valid_fraction`` of the examples (at least one when there are two or more).
    ``estimate``, given, computes the training-time estimate of the report from the prepared
    examples (the CLI passes ``tunesmith.estimate.report_estimate``); a TunesmithError from it
    becomes a warning.
    """
    _check_settings(block_size, fraction, max_tokens, valid_fraction)
    source, files = input_files(path, SUFFIXES, SUPPORTED)
    out_dir = Path(out) if out is not None else default_output(_named(source))

    def get_tokenizer() -> Any:  # loaded once, when first needed
        nonlocal tokenizer
        if tokenizer is None:
            from .models import load_tokenizer

            tokenizer = load_tokenizer(base)
        return tokenizer

    _check_output(out_dir, overwrite)
    settings = {
        "fraction": fraction, "max_tokens": max_tokens, "valid_fraction": valid_fraction,
        "dedupe": dedupe, "seed": seed,
    }
    try:
        replace_if = lambda p: (p / "report.json").exists() or not any(p.iterdir())  # noqa: E731
        with atomic_dir(out_dir, overwrite=overwrite, replace_if=replace_if) as tmp:
            report = _prepare_into(tmp, source, files, out_dir, base, get_tokenizer, block_size, settings, estimate,
                                   progress)
    except FileExistsError:
        raise TunesmithError(
            "the output directory already exists", file=out_dir, hint="pass --overwrite to replace it"
        ) from None
    except OSError as exc:
        raise TunesmithError(
            f"cannot write the prepared data: {exc.strerror or exc}", file=out_dir,
            hint="pass --out with a directory you can write to",
        ) from None
    return _open(out_dir, report)


def _open(directory: Path, report: dict) -> Prepared:
    fields = ROW_FIELDS[report["format"]]
    ex = report["examples"]
    return Prepared(dir=directory, report=report, train=Rows(directory / "train.jsonl", fields, ex["train"]),
                    valid=Rows(directory / "valid.jsonl", fields, ex["valid"]))


def _prepare_into(tmp: Path, source: Path, files: list[Path], out_dir: Path, base: Any, get_tokenizer, block_size: int,
                  settings: dict, estimate, progress: bool) -> dict:
    """Build the prepared data set in ``tmp``: examples are cut part by part and spooled to disk
    with a 64-bit hash and token count each; dedupe, subset and split are decided on those
    arrays; a second pass writes train.jsonl, valid.jsonl and the token shards."""
    from .tokens import ShardWriter

    stats: dict[str, int] = {"split": 0, "word_split": 0, "truncated": 0, "empty": 0}
    hashes, counts = array("Q"), array("q")
    spool = tmp / ".examples.jsonl"
    fmt: str | None = None
    fixes: list[str] = []
    extra: dict[str, int] = {}
    sources = []
    total_bytes = sum(_size(f) for f in files)
    ids_spool = tmp / ".ids.bin"  # the token ids of text examples, so they are not tokenized twice
    spooled_ids = True
    with _Progress(total_bytes, progress, source.name) as bar, open(spool, "w", encoding="utf-8") as out, \
            open(ids_spool, "wb") as ids_out:
        done_bytes = 0
        for file in files:
            reader = Reader(file, known_word=_Lexicon(get_tokenizer))
            first = len(hashes)
            for part in reader.parts():
                if fmt is None:
                    fmt = part.format
                elif part.format != fmt:
                    raise TunesmithError(
                        f"this file is in {part.format} format, but {files[0].name} is in {fmt} format",
                        file=file, hint="prepare files of one format together",
                    )
                counter = _TokenCounter(get_tokenizer(), block_size - 1, keep_ids=part.format in ("book", "text"))
                rows, tokens = _examples(part, get_tokenizer(), block_size, stats, counter)
                for row, n in zip(rows, tokens):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    hashes.append(_hash(row))
                    counts.append(n)
                if counter.kept is not None and len(counter.kept) == len(rows):
                    for ids in counter.kept:
                        ids.tofile(ids_out)
                else:
                    spooled_ids = False
                bar.update(done_bytes + reader.done_bytes)
            done_bytes += _size(file)
            bar.update(done_bytes)
            prefix = f"{file.name}: " if len(files) > 1 else ""
            fixes += [prefix + fix for fix in reader.fixes]
            for key, n in reader.extra_fields.items():
                extra[key] = extra.get(key, 0) + n
            sources.append({"file": str(file.resolve()), "examples": [first, len(hashes)]})
    if not hashes:
        raise TunesmithError(
            "no usable examples: every record is empty", file=source, hint="every example needs some text"
        )
    tokenizer = get_tokenizer()
    corpus = Corpus(format=fmt, fixes=fixes, source=str(source), extra_fields=extra)
    keys = np.frombuffer(hashes, dtype=np.uint64)
    tokens_all = np.frombuffer(counts, dtype=np.int64)
    _, first_seen = np.unique(keys, return_index=True)
    if settings["dedupe"]:
        kept = np.sort(first_seen)
        duplicates = len(keys) - len(kept)
    else:
        kept = np.arange(len(keys))
        duplicates = len(keys) - len(first_seen)
    built, built_tokens = len(kept), int(tokens_all[kept].sum())
    selected = kept[: _first_part_count(tokens_all[kept], settings["fraction"], settings["max_tokens"])]
    valid_mask = _valid_mask(keys[selected], settings["valid_fraction"], settings["seed"])
    tokens = tokens_all[selected]
    train_tokens, valid_tokens = int(tokens[~valid_mask].sum()), int(tokens[valid_mask].sum())
    n_valid = int(valid_mask.sum())
    side = np.zeros(len(keys), dtype=np.int8)  # 0: left out, 1: train, 2: valid
    side[selected] = np.where(valid_mask, 2, 1)

    pair_rows: list[dict] = []
    writer = ShardWriter(tmp, tokenizer, fmt)
    spooled_ids = spooled_ids and fmt in ("book", "text") and ids_spool.stat().st_size == 4 * int(tokens_all.sum())
    # The spooled ids are read in order with plain reads, not mapped: the pages of a map stay in
    # the process's resident set as it is read, which took a 1 GB corpus to 1.6 GB.
    with open(spool, encoding="utf-8") as rows_in, open(tmp / "train.jsonl", "w", encoding="utf-8") as train_out, \
            open(tmp / "valid.jsonl", "w", encoding="utf-8") as valid_out, open(ids_spool, "rb") as ids_in:
        for i, line in enumerate(rows_in):
            if not side[i]:
                if spooled_ids:
                    ids_in.seek(4 * int(tokens_all[i]), os.SEEK_CUR)
                continue
            (train_out if side[i] == 1 else valid_out).write(line)
            split = "train" if side[i] == 1 else "valid"
            if spooled_ids:
                writer.add_ids(split, np.frombuffer(ids_in.read(4 * int(tokens_all[i])), dtype=np.uint32))
                continue
            row = json.loads(line)
            writer.add(split, row)
            if fmt not in ("book", "text"):
                pair_rows.append(row)
    writer.close()
    spool.unlink()
    ids_spool.unlink()
    rows_seen = pair_rows if fmt not in ("book", "text") else range(len(selected))
    checks = _checks(
        corpus, rows_seen, tokens.tolist(), stats, duplicates, settings["dedupe"], built, built_tokens, settings,
        tokenizer, block_size, n_valid,
    )
    report = _report(source, out_dir, corpus, base, block_size, settings, len(selected) - n_valid, n_valid, tokens,
                     rows_seen, checks, (train_tokens, valid_tokens))
    report["files"] = sources
    if estimate:
        try:
            report["estimate"] = estimate(_open(tmp, report))
        except TunesmithError as exc:  # e.g. the base model is not installed: prepare anyway
            checks.append(_check("estimate", "warning", f"no training-time estimate: {exc.message}"))
    write_json(tmp / "report.json", report)
    return report


def _named(source: Path) -> Path:
    """What names the default output: the input itself, or for a glob the folder it starts in."""
    parts = source.parts
    fixed = next((i for i, part in enumerate(parts) if set(part) & set("*?[")), len(parts))
    return Path(*parts[:fixed]) if 0 < fixed < len(parts) else source


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Progress:
    """A rich progress bar over the input's bytes, with MB/s (only when ``enabled``)."""

    def __init__(self, total: int, enabled: bool, name: str) -> None:
        self.total, self.enabled, self.name = total, enabled, name
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("preparing {task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=self.total)
        return self

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done, self.total))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _hash(row: dict) -> int:
    """A 64-bit hash of ``normalised_key(row)``: equal keys, equal hashes (dedupe and the split
    keep only these, not the texts)."""
    return int.from_bytes(hashlib.blake2b(normalised_key(row).encode("utf-8"), digest_size=8).digest(), "little")


def _first_part_count(tokens: np.ndarray, fraction: float, max_tokens: int | None) -> int:
    """How many of the examples to keep: the first ``fraction``, then as many as fit ``max_tokens`` (at least one)."""
    keep = max(1, round(len(tokens) * fraction))
    if max_tokens is not None:
        keep = max(1, int(np.searchsorted(np.cumsum(tokens[:keep]), max_tokens, side="right")))
    return keep


def _valid_mask(keys: np.ndarray, valid_fraction: float, seed: int) -> np.ndarray:
    """``_valid_indices`` on hashes, as a boolean mask: groups of equal keys numbered by first
    appearance, a seeded sample of the groups."""
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    n = len(uniq)
    mask = np.zeros(len(keys), dtype=bool)
    if n < 2 or valid_fraction <= 0:
        return mask
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n)
    count = min(n - 1, max(1, round(n * valid_fraction)))
    chosen = np.zeros(n, dtype=bool)
    chosen[random.Random(seed).sample(range(n), count)] = True
    return chosen[rank[inverse.reshape(-1)]]


def _examples(corpus: Corpus, tokenizer: Any, block_size: int, stats: dict[str, int],
              counter: _TokenCounter | None = None) -> tuple[list[dict], list[int]]:
    """The examples of ``corpus`` and their token counts, each fitting a block."""
    counter = counter or _TokenCounter(tokenizer, block_size - 1)
    if corpus.format == "book":
        return _book_examples(corpus, counter, stats)
    if corpus.format == "text":
        return _text_examples(corpus, counter, stats)
    return _pair_examples(corpus, tokenizer, counter, stats)


def _report(path: Path, out_dir: Path, corpus: Corpus, base: Any, block_size: int, settings: dict,
            n_train: int, n_valid: int, tokens: np.ndarray, rows: Sequence, checks: list[dict],
            split_tokens: tuple[int, int]) -> dict:
    train_tokens, valid_tokens = split_tokens
    return {
        "source": str(path.resolve()),
        "output": str(out_dir.resolve()),
        "format": corpus.format,
        "base": str(base),
        "block_size": block_size,
        "settings": settings,
        "examples": {"train": n_train, "valid": n_valid},
        "tokens": {"train": train_tokens, "valid": valid_tokens},
        "tokens_per_example": {
            "min": int(tokens.min()),
            "mean": round(float(tokens.mean()), 1),
            "max": int(tokens.max()),
        },
        "task": _task(corpus.format, rows),
        "checks": checks,
        "fixes": list(corpus.fixes),
        "estimate": None,
    }


def load_prepared(path: str | Path) -> Prepared:
    """Read a prepared directory back, checking every row (the rows are read again when used)."""
    path = Path(path)
    report_file = path / "report.json"
    if not path.is_dir():
        raise TunesmithError("no such prepared directory", file=path, hint="run `tunesmith prepare FILE` first")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError("missing report.json: not a prepared directory", file=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TunesmithError(f"malformed report: {exc}", file=report_file) from None
    if not isinstance(report, dict) or report.get("format") not in ROW_FIELDS:
        raise TunesmithError("report.json does not name a known format", file=report_file, field="format")
    fields = ROW_FIELDS[report["format"]]
    counts = [sum(1 for _ in _iter_rows(path / name, fields)) for name in ("train.jsonl", "valid.jsonl")]
    return Prepared(dir=path, report=report, train=Rows(path / "train.jsonl", fields, counts[0]),
                    valid=Rows(path / "valid.jsonl", fields, counts[1]))


def format_report(report: dict) -> str:
    """The human-readable report the CLI prints (plain text: print it with rich markup off)."""
    ex, tok, per = report["examples"], report["tokens"], report["tokens_per_example"]
    lines = [
        f"Prepared {Path(report['source']).name} ({report['format'].replace('_', '/')}) "
        f"for {report['base']}, block size {report['block_size']} tokens",
        f"  examples  {ex['train']:,} train, {ex['valid']:,} valid",
        f"  tokens    {tok['train']:,} train, {tok['valid']:,} valid "
        f"(per example: min {per['min']:,}, mean {per['mean']:,.0f}, max {per['max']:,})",
        f"  task      {report['task']}",
    ]
    if report.get("fixes"):
        lines.append("Fixes made while reading:")
        lines += [f"  - {fix}" for fix in report["fixes"]]
    lines.append("Checks:")
    for check in report["checks"]:
        lines.append(f"  {check['status']:<8} {check['name']}: {check['message']}")
    est = report.get("estimate")
    if est and isinstance(est.get("seconds"), (int, float)):
        line = f"Estimated training time: {_duration(est['seconds'])}"
        if isinstance(est.get("tokens_per_second"), (int, float)):
            line += f" (~{est['tokens_per_second']:,.0f} tokens/s)"
        if est.get("basis"):
            line += f"; {est['basis']}"
        lines.append(line)
    return "\n".join(lines)


# --- settings and output --------------------------------------------------------------------


def _check_settings(block_size: Any, fraction: Any, max_tokens: Any, valid_fraction: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE:
        raise TunesmithError(
            f"block size must be a whole number of at least {MIN_BLOCK_SIZE} tokens, not {block_size!r}",
            field="block_size",
        )
    if not _number(fraction) or not 0 < fraction <= 1:
        raise TunesmithError(
            f"fraction must be more than 0 and at most 1, not {fraction!r}", field="fraction",
            hint="--fraction 0.5 keeps the first half of the examples",
        )
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise TunesmithError(f"max tokens must be a positive whole number, not {max_tokens!r}", field="max_tokens")
    valid = spec(TrainConfig, "valid_fraction")
    if not _number(valid_fraction) or not in_bounds(valid, valid_fraction):
        raise TunesmithError(
            f"validation fraction must be between {valid['min']} and {valid['max']}, not {valid_fraction!r}",
            field="valid_fraction",
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TunesmithError("the output path exists and is not a directory", file=out_dir, hint="choose another --out")
    if any(out_dir.iterdir()) and not (out_dir / "report.json").exists():
        raise TunesmithError(
            "this folder already exists and is not a prepared data set; tunesmith never writes into or "
            "replaces such a folder", file=out_dir, hint="choose another --out",
        )
    if not overwrite:
        raise TunesmithError(
            "the output directory already exists", file=out_dir, hint="pass --overwrite to replace it"
        )


def _iter_rows(path: Path, fields: tuple[str, ...]) -> Iterator[dict]:
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise TunesmithError("missing file in the prepared directory", file=path) from None
    with fh:
        number = 0
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise TunesmithError(f"malformed JSON: {exc}", file=path, line=number) from None
                if not isinstance(row, dict):
                    raise TunesmithError("expected a JSON object", file=path, line=number)
                for name in fields:
                    if not isinstance(row.get(name), str):
                        raise TunesmithError("missing or not a string", file=path, line=number, field=name)
                yield row
        except UnicodeDecodeError:
            raise TunesmithError("not valid UTF-8", file=path, line=number + 1) from None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


# --- token counting and cutting -------------------------------------------------------------


# Texts tokenized in one call: at most this many, and at most this many characters together
# (one longer text goes alone), so a batch's encodings stay small whatever the texts' sizes.
BATCH_TEXTS = 512
BATCH_CHARS = 1 << 18


def _batches(texts: list[str]) -> Iterator[list[str]]:
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and end - start < BATCH_TEXTS and (end == start or chars + len(texts[end]) <= BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        yield texts[start:end]
        start = end


PREFIX_CHARS = 1 << 16  # characters of a long text counted to tell that it cannot fit a block


def _prefix(text: str) -> str:
    """``text``, or for a longer one its first ``PREFIX_CHARS`` characters cut before a single
    space between two words (the whole text if there is none)."""
    if len(text) <= PREFIX_CHARS:
        return text
    cut = PREFIX_CHARS
    while cut > 0:
        cut = text.rfind(" ", 1, cut)
        if cut > 0 and not text[cut - 1].isspace() and cut + 1 < len(text) and not text[cut + 1].isspace():
            return text[:cut]
    return text


class _TokenCounter:
    """Counts tokens with the base model's tokenizer; ``budget`` is the most tokens per example."""

    def __init__(self, tokenizer: Any, budget: int, keep_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.budget = budget
        # With keep_ids, the token ids of each text example, in order (``_budgeted`` fills it):
        # prepare writes them to the token shards without tokenizing the examples again.
        self.kept: list[np.ndarray] | None = [] if keep_ids else None

    def ids_many(self, texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        for batch in _batches(texts):
            ids += self.tokenizer(batch, add_special_tokens=False)["input_ids"]
        return ids

    def many(self, texts: list[str]) -> list[int]:
        counts: list[int] = []
        for batch in _batches(texts):  # in batches: a batch's encodings hold ~100 bytes a token
            counts += [len(ids) for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]]
        return counts

    def one(self, text: str) -> int:
        return self.many([text])[0]

    def fit(self, texts: list[str]) -> list[int]:
        """Token counts, exact for a text that fits the budget; for a long text whose first
        ``PREFIX_CHARS`` characters (up to a space between words) already exceed it, that
        prefix's count, so a text of a megabyte is never tokenized whole just to learn that it
        does not fit. (Pre-tokenization splits at such a space, so the whole has at least as many.)"""
        counts = self.many([_prefix(text) for text in texts])
        redo = [i for i, (text, n) in enumerate(zip(texts, counts)) if n <= self.budget and len(text) > PREFIX_CHARS]
        for i, n in zip(redo, self.many([texts[i] for i in redo])):
            counts[i] = n
        return counts

    def cut(self, text: str, limit: int, keep: str = "start") -> str:
        """The first (or last) ``limit`` tokens' worth of ``text``, at token boundaries."""
        if limit <= 0:
            return ""
        window = limit * 16  # characters; widened while the window holds fewer than ``limit`` tokens
        while len(text) > window:
            part = text[:window] if keep == "start" else text[-window:]
            if self.one(part) > limit + 1:
                text = part
                break
            window *= 4
        while True:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= limit:
                return text
            if keep == "start":
                cut = text[: offsets[limit - 1][1]]
            else:
                cut = text[offsets[len(offsets) - limit][0] :]
            # re-tokenizing a cut can merge differently: loop until it fits, always shrinking
            text = cut if len(cut) < len(text) else (text[:-1] if keep == "start" else text[1:])


# Sentence ends: terminal punctuation, optional closing quotes or brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(\s+)")
_FINAL = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]*_]*$")
_LAST_WORD = re.compile(r"([\w.]+)$")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "prof", "rev", "col", "gen", "capt", "lt", "sgt", "jr", "sr", "vs", "etc",
    "no", "mt", "messrs", "hon", "esq", "fig", "vol", "ch", "p", "pp", "cf", "viz",
}


def ends_sentence(text: str) -> bool:
    """Whether ``text`` ends with sentence-final punctuation (closing quotes or brackets may follow)."""
    return bool(_FINAL.search(text.rstrip()))


def split_sentences(text: str) -> list[tuple[str, str]]:
    """Split a paragraph into ``(whitespace before, sentence)`` pairs.

    A regular expression, because no NLP sentence model may be downloaded: a sentence ends at
    . ! ? or an ellipsis (plus closing quotes) before a capital, digit or opening quote, except
    after a common abbreviation ("Mr.", "p.m.") or an initial ("J.").
    """
    pieces: list[tuple[str, str]] = []
    start, before = 0, ""
    for match in _SENTENCE_END.finditer(text):
        following = text[match.end() : match.end() + 1]
        if following and not (following.isupper() or following.isdigit() or following in "\"'\u201c\u2018([-"):
            continue
        word = _LAST_WORD.search(text, start, match.start())
        if text[match.start()] == "." and word:
            last = word.group(1).lower()
            if last in _ABBREVIATIONS or "." in last or (len(last) == 1 and last.isalpha()):
                continue
        pieces.append((before, text[start : match.start(1)]))
        before = "\n" if "\n" in match.group(1) else " "
        start = match.end()
    if text[start:].strip():
        pieces.append((before, text[start:].rstrip()))
    return pieces


@dataclass
class _Unit:
    """A piece of text packed whole into an example: a paragraph, a sentence or a run of words."""

    text: str
    tokens: int
    joiner: str  # put before this unit when it follows another in the same example


def _units(paragraphs: list[str], counter: _TokenCounter, stats: dict[str, int]) -> list[_Unit]:
    """Paragraphs that fit a block; longer ones split into sentences, and over-long sentences into words.

    A paragraph that does not end a sentence ("It ran in this way:") is also cut into sentences,
    so that only its unfinished tail has to move on to the next example.
    """
    budget = counter.budget
    units = []
    paragraphs = _bounded(paragraphs, stats)
    for text, count in zip(paragraphs, counter.fit(paragraphs)):
        if count <= budget:
            unit = _Unit(text, count, "\n\n")
            units.extend([unit] if ends_sentence(text) else _sentence_units(unit, counter, stats))
            continue
        stats["split"] += 1
        units.extend(_sentence_units(_Unit(text, count, "\n\n"), counter, stats))
    return units


def _bounded(paragraphs: list[str], stats: dict[str, int]) -> list[str]:
    """Paragraphs of at most ``MAX_LINE`` characters: a longer one (it cannot fit a block anyway)
    is cut at the last line break or space before the limit, so a tokenizer never sees a text
    of unbounded size (counted as split paragraphs)."""
    out = []
    for text in paragraphs:
        if len(text) <= MAX_LINE:
            out.append(text)
            continue
        stats["split"] += 1
        while len(text) > MAX_LINE:
            cut = max(text.rfind("\n", MAX_LINE // 2, MAX_LINE), text.rfind(" ", MAX_LINE // 2, MAX_LINE))
            cut = cut if cut > 0 else MAX_LINE
            out.append(text[:cut].rstrip())
            text = text[cut:].lstrip()
        if text:
            out.append(text)
    return out


def _sentence_units(unit: _Unit, counter: _TokenCounter, stats: dict[str, int]) -> list[_Unit]:
    """A paragraph unit as one unit per sentence (the first keeps the paragraph's joiner)."""
    sentences = split_sentences(unit.text)
    if len(sentences) <= 1 and unit.tokens <= counter.budget:
        return [unit]
    units = []
    for i, ((space, sentence), n) in enumerate(zip(sentences, counter.fit([s for _, s in sentences]))):
        joiner = unit.joiner if i == 0 else space
        if n <= counter.budget:
            units.append(_Unit(sentence, n, joiner))
            continue
        stats["word_split"] += 1
        pieces = _split_words(sentence, counter)
        for j, (piece, m) in enumerate(zip(pieces, counter.many(pieces))):
            units.append(_Unit(piece, m, joiner if j == 0 else " "))
    return units


def _split_words(text: str, counter: _TokenCounter) -> list[str]:
    """Last resort for a sentence longer than a block: cut it at word boundaries (or inside a huge word)."""
    budget = counter.budget
    words = text.split()
    counts = counter.many([" " + w for w in words])
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for word, n in zip(words, counts):
        if n > budget:
            if current:
                pieces.append(" ".join(current))
                current, size = [], 0
            while word:
                head = counter.cut(word, budget)
                if not head:  # a single character that is more than a block of tokens: cannot happen in practice
                    head = word[:1]
                pieces.append(head)
                word = word[len(head) :]
            continue
        if current and size + n > budget:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(word)
        size += n
    if current:
        pieces.append(" ".join(current))
    out = []
    for piece, n in zip(pieces, counter.many(pieces)):  # summed word counts are approximate; make sure each piece fits
        out.append(piece if n <= budget else counter.cut(piece, budget))
    return out


def _join(units: list[_Unit]) -> str:
    text = units[0].text
    for unit in units[1:]:
        text += unit.joiner + unit.text
    return text


def _join_units(units: list[_Unit], counter: _TokenCounter) -> list[str]:
    """Greedily join units into examples of at most ``budget`` tokens that end on sentence ends.

    When an example is full, trailing units that do not end a sentence (a heading, "He wrote:")
    move on to start the next example, where they belong; if the next paragraph is too big to
    share an example with them, it is taken sentence by sentence.
    """
    budget = counter.budget

    def fits(group: list[_Unit]) -> bool:
        approx = sum(u.tokens for u in group) + sum(2 if u.joiner == "\n\n" else 1 for u in group[1:])
        if approx + len(group) < budget:
            return True  # per-unit counts are within a token of the joined count at each seam
        if approx - 2 * len(group) > budget:
            return False
        return counter.one(_join(group)) <= budget

    examples: list[str] = []
    current: list[_Unit] = []
    pending = list(reversed(units))
    ignored: dict[str, int] = {"split": 0, "word_split": 0}  # these splits are not over-long paragraphs
    while pending:
        unit = pending.pop()
        if current and not fits(current + [unit]):
            cut = len(current)
            while cut > 0 and not ends_sentence(current[cut - 1].text):
                cut -= 1
            carry = current[cut:] if 0 < cut < len(current) else []
            if carry and not fits(carry + [unit]):
                pieces = _sentence_units(unit, counter, ignored)
                if len(pieces) > 1:
                    pending.extend(reversed(pieces))
                    continue
            if not carry:
                cut = len(current)
            examples.append(_join(current[:cut]))
            current = carry
            if current and not fits(current + [unit]):
                examples.append(_join(current))
                current = []
        current.append(unit)
    if current:
        examples.append(_join(current))
    return examples


def _budgeted(texts: list[str], counter: _TokenCounter) -> tuple[list[dict], list[int]]:
    """Rows and token counts, re-checking every example against the budget."""
    rows, tokens = [], []
    kept = counter.kept
    # a batch's ids at a time, not a section's: held as Python ints they take ~36 bytes a token
    for text, ids in ((t, i) for batch in _batches(texts) for t, i in zip(batch, counter.ids_many(batch))):
        if len(ids) > counter.budget:  # the fast path in _join_units misjudged a seam: cut it again
            for piece in _split_words(text, counter):
                piece_ids = counter.ids_many([piece])[0]
                rows.append({"text": piece})
                tokens.append(len(piece_ids))
                if kept is not None:
                    kept.append(np.asarray(piece_ids, dtype=np.uint32))
            continue
        rows.append({"text": text})
        tokens.append(len(ids))
        if kept is not None:
            kept.append(np.asarray(ids, dtype=np.uint32))
    return rows, tokens


# --- examples per format --------------------------------------------------------------------


def _book_examples(corpus: Corpus, counter: _TokenCounter, stats: dict[str, int]) -> tuple[list[dict], list[int]]:
    paragraphs = [r["text"] for r in corpus.records if r["text"].strip()]
    return _budgeted(_join_units(_units(paragraphs, counter, stats), counter), counter)


def _text_examples(corpus: Corpus, counter: _TokenCounter, stats: dict[str, int]) -> tuple[list[dict], list[int]]:
    texts: list[str] = []
    for record in corpus.records:
        text = record["text"]
        if not text.strip():
            stats["empty"] += 1
            continue
        if len(text) <= MAX_LINE and counter.one(text) <= counter.budget:
            texts.append(text)  # a document that fits stays exactly as written
            continue
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        texts.extend(_join_units(_units(paragraphs, counter, stats), counter))
    return _budgeted(texts, counter)


def _pair_examples(
    corpus: Corpus, tokenizer: Any, counter: _TokenCounter, stats: dict[str, int]
) -> tuple[list[dict], list[int]]:
    if corpus.format == "chat":
        return _chat_examples(corpus, tokenizer, counter, stats)
    pairs: list[tuple[str, str]] = []
    for record in corpus.records:
        if not record["completion"].strip():
            stats["empty"] += 1
            continue
        pairs.append((record["prompt"], record["completion"]))
    budget = counter.budget
    rows, tokens = [], []
    prompt_counts = counter.many([p for p, _ in pairs])
    completion_counts = counter.many([c for _, c in pairs])
    for (prompt, completion), p, c in zip(pairs, prompt_counts, completion_counts):
        if p + c > budget:
            stats["truncated"] += 1
            # Keep the end of the prompt (nearest the answer) and as much of the answer as fits.
            if c > budget * 3 // 4:
                completion = counter.cut(completion, budget * 3 // 4 if p else budget)
                c = counter.one(completion)
            prompt = counter.cut(prompt, budget - c, keep="end")
            p = counter.one(prompt)
        rows.append({"prompt": prompt, "completion": completion})
        tokens.append(p + c)
    return rows, tokens


def _chat_examples(
    corpus: Corpus, tokenizer: Any, counter: _TokenCounter, stats: dict[str, int]
) -> tuple[list[dict], list[int]]:
    """Chat rows keep their messages: training renders the whole conversation with the chat
    template and learns the assistant's messages (chat.encode_chat). ``prompt`` (the
    conversation before the last answer, with the generation prompt) and ``completion`` (that
    answer and the end-of-sequence token) are kept beside them for the checks, samples and copy finder. A conversation longer
    than the budget loses its oldest turns (a system message stays), then its text is cut."""
    from .chat import encode_chat, render_chat

    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError(
            "this base model's tokenizer has no chat template, so chat rows cannot be rendered",
            file=corpus.source, hint="use prompt/completion rows, or a base model with a chat template",
        )
    rows, tokens = [], []
    for record in corpus.records:
        messages = record["messages"]
        where = {"file": corpus.source, "line": record["line"], "field": "messages"}
        if messages[-1]["role"] != "assistant":
            raise TunesmithError(
                f"the last message is from '{messages[-1]['role']}', not 'assistant'", **where,
                hint="each chat example must end with the assistant's answer to learn",
            )
        if not any(m["content"].strip() for m in messages if m["role"] == "assistant" and m.get("weight", 1)):
            stats["empty"] += 1
            continue
        try:
            n = len(encode_chat(messages, tokenizer)[0])
            if n > counter.budget:
                stats["truncated"] += 1
                messages, n = _fit_chat(messages, tokenizer, counter)
            prompt = render_chat(messages[:-1], tokenizer, add_generation_prompt=True)
        except TunesmithError as exc:
            raise TunesmithError(exc.message, file=corpus.source, line=record["line"], field=exc.field or "messages",
                                 hint=exc.hint) from None
        except Exception as exc:  # templates are Jinja code and raise their own errors
            raise TunesmithError(f"the chat template rejected this conversation: {exc}", **where) from None
        completion = messages[-1]["content"] + (tokenizer.eos_token or "")
        rows.append({"messages": messages, "prompt": prompt, "completion": completion})
        tokens.append(n)
    return rows, tokens


def _fit_chat(messages: list[dict], tokenizer: Any, counter: _TokenCounter) -> tuple[list[dict], int]:
    """``messages`` cut to fit the budget: the oldest turns go first (a leading system message
    stays while it can); if the last question and answer alone are too long, the answer keeps
    its start (at most three quarters of the budget) and the question its end."""
    from .chat import encode_chat

    def size(msgs: list[dict]) -> int:
        return len(encode_chat(msgs, tokenizer)[0])

    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 2:
        turns = turns[1:]
        if size(system + turns) <= counter.budget:
            return system + turns, size(system + turns)
    turns = [dict(m) for m in turns]
    overhead = size([{**m, "content": ""} for m in turns])
    room = counter.budget - overhead
    answer = turns[-1]
    if counter.one(answer["content"]) > room * 3 // 4 and len(turns) > 1:
        answer["content"] = counter.cut(answer["content"], room * 3 // 4)
    elif len(turns) == 1:
        answer["content"] = counter.cut(answer["content"], room)
    if len(turns) > 1:
        turns[0]["content"] = counter.cut(turns[0]["content"], room - counter.one(answer["content"]), keep="end")
    while size(turns) > counter.budget and answer["content"]:  # pieces can merge differently when joined
        answer["content"] = counter.cut(answer["content"], counter.one(answer["content"]) - 1)
    return turns, size(turns)


def normalised_key(row: dict) -> str:
    """What makes two examples the same: their text fields, NFKC-normalised with runs of
    whitespace collapsed and the ends stripped (so "a  b\n" and "a b" are one example)."""
    norm = {
        name: " ".join(unicodedata.normalize("NFKC", value).split())
        for name, value in row.items() if isinstance(value, str)
    }
    return json.dumps(norm, sort_keys=True, ensure_ascii=False)


def _dedupe(rows: list[dict], tokens: list[int]) -> tuple[list[dict], list[int], int]:
    seen: set[str] = set()
    kept_rows, kept_tokens = [], []
    for row, n in zip(rows, tokens):
        key = normalised_key(row)
        if key in seen:
            continue
        seen.add(key)
        kept_rows.append(row)
        kept_tokens.append(n)
    return kept_rows, kept_tokens, len(rows) - len(kept_rows)


def _valid_indices(keys: list[str], valid_fraction: float, seed: int) -> set[int]:
    """A seeded random choice of examples (for a book: passages drawn from all through it).

    Copies of one example (same ``keys``) are drawn together, so none is on both sides of the split.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    n = len(members)
    if n < 2 or valid_fraction <= 0:
        return set()
    count = min(n - 1, max(1, round(n * valid_fraction)))
    return {i for g in random.Random(seed).sample(range(n), count) for i in members[g]}


class _Lexicon:
    """Whether a lower-case word is a single token of the base model's tokenizer, that is, a
    word common enough in the language to have its own token. A book's hyphenations that the
    book itself does not settle ask this (the tokenizer is loaded on the first question)."""

    def __init__(self, get_tokenizer) -> None:
        self._get = get_tokenizer

    def __call__(self, word: str) -> bool:
        tokenizer = self._get()
        return len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1


# --- checks ---------------------------------------------------------------------------------


def _check(name: str, status: str, message: str) -> dict:
    return {"name": name, "status": status, "message": message}


def _common_suffix(texts: list[str]) -> str:
    return os.path.commonprefix([t[::-1] for t in texts])[::-1] if texts else ""


def _task(fmt: str, rows: list[dict]) -> str:
    if fmt in ("book", "text"):
        return "open-ended generation"
    if fmt == "chat":
        return "conversation (conditional generation)"
    distinct = len({row["completion"].strip() for row in rows})
    if distinct <= 20 and distinct <= len(rows) / 2:
        return "classification"
    return "conditional generation"


def _checks(
    corpus: Corpus, rows: list[dict], tokens: list[int], stats: dict[str, int], duplicates: int, dedupe: bool,
    built: int, built_tokens: int, settings: dict, tokenizer: Any, block_size: int, n_valid: int,
) -> list[dict]:
    fmt = corpus.format
    n, total = len(rows), sum(tokens)
    checks = []
    if fmt in ("book", "text"):
        if total < RECOMMENDED_BOOK_TOKENS:
            checks.append(_check(
                "size", "warning",
                f"only {counted(total, 'token')}; a style is learned better from at least {RECOMMENDED_BOOK_TOKENS:,} "
                "(a short story is ~5,000, a novel ~100,000)",
            ))
        else:
            checks.append(_check("size", "ok", f"{counted(n, 'example')}, {counted(total, 'token')}"))
    elif n < RECOMMENDED_EXAMPLES:
        checks.append(_check(
            "size", "warning",
            f"only {counted(n, 'example')}; at least {RECOMMENDED_EXAMPLES} are recommended, and quality improves "
            "as the number of examples doubles",
        ))
    else:
        checks.append(_check("size", "ok", f"{counted(n, 'example')}, {counted(total, 'token')}"))

    if fmt != "book":
        required = " and ".join(f"'{f}'" for f in FIELDS[fmt])
        if corpus.extra_fields:
            extra = ", ".join(f"'{k}' ({counted(v, 'record')})" for k, v in sorted(corpus.extra_fields.items()))
            checks.append(_check("columns", "warning", f"ignored extra fields: {extra}; only {required} are used"))
        else:
            checks.append(_check("columns", "ok", f"every record has {required} and nothing else"))

    if fmt != "book":
        what = "empty text" if fmt == "text" else "example with an empty completion"
        if stats["empty"]:
            checks.append(_check("empty", "fixed", f"removed {counted(stats['empty'], what)}"))
        else:
            checks.append(_check("empty", "ok", "no empty texts" if fmt == "text" else "no examples with an empty completion"))

    if duplicates and dedupe:
        checks.append(_check(
            "duplicates", "fixed", f"removed {counted(duplicates, 'duplicate example')} (same text up to whitespace)"
        ))
    elif duplicates:
        checks.append(_check(
            "duplicates", "warning",
            f"{counted(duplicates, 'duplicate example')} kept (dedupe is off); copies of one example are all "
            "on the same side of the train/validation split",
        ))
    else:
        checks.append(_check("duplicates", "ok", "no duplicate examples"))

    budget = block_size - 1
    if fmt in ("book", "text"):
        if stats["split"]:
            msg = f"split {counted(stats['split'], 'paragraph')} longer than {budget:,} tokens at sentence ends"
            if stats["word_split"]:
                msg += f" ({counted(stats['word_split'], 'over-long sentence')} at word breaks)"
            checks.append(_check("long examples", "fixed", msg))
        else:
            checks.append(_check("long examples", "ok", f"every paragraph fits in {budget:,} tokens"))
    elif stats["truncated"]:
        checks.append(_check(
            "long examples", "fixed",
            f"truncated {counted(stats['truncated'], 'example')} longer than {budget:,} tokens "
            f"({'the oldest turns go' if fmt == 'chat' else 'the prompt' + chr(39) + 's start is cut'} first); "
            "raise --block-size to keep them whole",
        ))
    else:
        checks.append(_check("long examples", "ok", f"every example fits in {budget:,} tokens"))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < block_size:
        checks.append(_check("block size", "warning", f"block size {block_size} exceeds the model's context {limit}"))

    if fmt == "prompt_completion":
        checks.extend(_pair_checks(rows))
    elif fmt == "chat":
        checks.append(_check("separator", "ok", "the chat template marks where each answer starts"))
        checks.append(_check("stop sequence", "ok", f"each answer ends with the EOS token {tokenizer.eos_token!r}"))

    if settings["fraction"] < 1 or settings["max_tokens"] is not None:
        checks.append(_check(
            "subset", "ok",
            f"kept the first {n:,} of {counted(built, 'example')} ({total:,} of {counted(built_tokens, 'token')})",
        ))
    if n_valid == 0:
        reason = "--valid-fraction is 0" if settings["valid_fraction"] == 0 else "there is only one example"
        checks.append(_check("validation", "warning", f"no validation examples ({reason}); no held-out loss"))
    else:
        checks.append(_check(
            "validation", "ok", f"{counted(n_valid, 'example')} held out at random (seed {settings['seed']})"
        ))
    checks.append(_check("task", "ok", _task(fmt, rows)))
    return checks


def _pair_checks(rows: list[dict]) -> list[dict]:
    checks = []
    prompts = [row["prompt"] for row in rows]
    completions = [row["completion"] for row in rows]
    separator = _common_suffix(prompts)
    if not separator:
        checks.append(_check(
            "separator", "warning",
            "prompts do not end with a common separator; end every prompt with the same string, such as "
            "'\\n\\n###\\n\\n', so the model learns where the completion starts",
        ))
    elif len(prompts) > 1 and any(separator in p[: -len(separator)] for p in prompts):
        inside = sum(separator in p[: -len(separator)] for p in prompts)
        checks.append(_check(
            "separator", "warning",
            f"every prompt ends with {separator!r}, but {counted(inside, 'prompt')} also "
            f"{'contains' if inside == 1 else 'contain'} it earlier; "
            "choose a separator that appears nowhere else",
        ))
    else:
        checks.append(_check("separator", "ok", f"every prompt ends with {separator!r}"))
    ending = _common_suffix(completions)
    if ending:
        checks.append(_check("stop sequence", "ok", f"every completion ends with {ending!r}; stop generation there"))
    else:
        checks.append(_check(
            "stop sequence", "warning",
            "completions do not end with a common stop sequence; end each with the same string, such as "
            "'\\n' or ' END', and stop generation there",
        ))
    no_space = sum(not c[:1].isspace() for c in completions)
    if no_space:
        checks.append(_check(
            "leading space", "warning",
            f"{no_space:,} of {counted(len(completions), 'completion')} {'does' if no_space == 1 else 'do'} "
            "not start with a space; start each with one "
            "(' '), as tokenizers attach the space to the first word",
        ))
    else:
        checks.append(_check("leading space", "ok", "every completion starts with whitespace"))
    return checks
