"""From prepared examples to packed token blocks, and the `tokenize` lesson.

Books and text documents are tokenized once, joined into one stream and cut into full
blocks, so no compute is spent on padding; a passage may read on from the one before it.
Prompt/completion and chat examples are packed whole, several to a block, each in its own
segment: a token attends only to earlier tokens of its own example, positions restart at 0
for each example, and the rest of a block is padding. A loss mask keeps prompts (and padding)
out of the loss.

A chat example is the model's chat template rendered over the whole conversation; by default
only the assistant's messages are learned (``chat.encode_chat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .chat import encode_chat
from .corpus import read_text


@dataclass
class Blocks:
    """``ids[i]`` holds ``block_size + 1`` tokens: inputs are ``[:-1]``, targets ``[1:]``."""

    ids: np.ndarray  # (n, block_size + 1) int64
    mask: np.ndarray  # (n, block_size + 1) bool: True where the token is a target to learn
    # For examples packed apart: which example each token belongs to (a token attends only to its
    # own example's tokens) and its position within that example. None: one causal stream.
    segments: np.ndarray | None = None  # (n, block_size + 1) int32
    positions: np.ndarray | None = None  # (n, block_size + 1) int64

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def block_size(self) -> int:
        return self.ids.shape[1] - 1


def encode_example(
    row: dict, tokenizer, joiner: list[int] | None = None, chat_loss: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of one example. Records end in EOS; consecutive pieces of one
    book end in ``joiner`` (a paragraph break) instead, so the model learns to go on writing
    rather than to stop after every few hundred tokens. A chat row (``messages``) is the whole
    conversation rendered with the chat template (``chat.encode_chat``)."""
    eos = tokenizer.eos_token_id
    if "messages" in row:
        return encode_chat(row["messages"], tokenizer, chat_loss)
    if "text" in row:
        ids = tokenizer.encode(row["text"], add_special_tokens=False)
        mask = [True] * len(ids)
        if joiner:
            return ids + joiner, mask + [True] * len(joiner)
    else:
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False)
        ids = prompt + completion
        mask = [False] * len(prompt) + [True] * len(completion)
    if not ids or ids[-1] != eos:
        ids.append(eos)
        mask.append(True)
    return ids, mask


def book_joiner(tokenizer) -> list[int]:
    return tokenizer.encode("\n\n", add_special_tokens=False)


def tokenize_rows(rows: list[dict], tokenizer, joiner: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One flat stream of token ids and its loss mask, examples in order (see encode_example)."""
    all_ids: list[int] = []
    all_mask: list[bool] = []
    for row in rows:
        ids, mask = encode_example(row, tokenizer, joiner)
        all_ids.extend(ids)
        all_mask.extend(mask)
    return np.asarray(all_ids, dtype=np.int64), np.asarray(all_mask, dtype=bool)


def pack(ids: np.ndarray, mask: np.ndarray, block_size: int, pad_id: int) -> Blocks:
    """Cut the stream into windows of ``block_size + 1`` with stride ``block_size``, so every
    token after the first is a target exactly once. The last window is padded (and masked)."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to train on")
    n = max(1, -(-(len(ids) - 1) // block_size))
    total = n * block_size + 1
    pad = total - len(ids)
    ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)])
    mask = np.concatenate([mask, np.zeros(pad, dtype=bool)])
    starts = np.arange(n) * block_size
    window = starts[:, None] + np.arange(block_size + 1)[None, :]
    return Blocks(ids=ids[window], mask=mask[window])


RECORD_FORMATS = ("prompt_completion", "chat")


def make_blocks(
    rows: list[dict], tokenizer, block_size: int, fmt: str | None, chat_loss: str = "assistant"
) -> Blocks:
    """Training blocks for rows of a prepared data set of format ``fmt``.

    Books pack across paragraphs (pieces joined by a paragraph break), text documents across
    documents (each ending in EOS); prompt/completion and chat examples are packed apart
    (``pack_examples``), so no example sees the one before it. ``chat_loss`` is what chat
    examples learn (see ``chat.encode_chat``).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if fmt in RECORD_FORMATS:
        return pack_examples([encode_example(row, tokenizer, chat_loss=chat_loss) for row in rows], block_size, pad)
    joiner = book_joiner(tokenizer) if fmt == "book" else None
    return pack(*tokenize_rows(rows, tokenizer, joiner), block_size, pad)


def pack_examples(examples: list[tuple[list[int], list[bool]]], block_size: int, pad_id: int) -> Blocks:
    """Pack whole examples into rows of ``block_size + 1`` tokens, first fit in order, each in its
    own segment; the rest of a row is padding (its own segment, never a target).

    An example's first token is never a target (nothing of the example comes before it). An
    example longer than a row is cut into row-sized pieces that overlap by one token, as ``pack``
    cuts a stream, so each of its tokens after the first is still a target exactly once.
    """
    width = block_size + 1
    pieces: list[tuple[list[int], list[bool]]] = []
    for ids, mask in examples:
        if len(ids) < 2:
            continue
        for start in range(0, max(len(ids) - 1, 1), block_size):
            pieces.append((ids[start : start + width], mask[start : start + width]))
    if not pieces:
        raise ValueError("need at least two tokens to train on")
    rows: list[list[tuple[list[int], list[bool]]]] = []
    used = width
    for piece in pieces:
        if used + len(piece[0]) > width:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    segments = np.zeros((len(rows), width), dtype=np.int32)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for segment, (piece_ids, piece_mask) in enumerate(row):
            end = at + len(piece_ids)
            ids[r, at:end] = piece_ids
            mask[r, at:end] = piece_mask
            mask[r, at] = False
            segments[r, at:end] = segment
            positions[r, at:end] = np.arange(len(piece_ids))
            at = end
        segments[r, at:] = len(row)  # padding
        positions[r, at:] = np.arange(width - at)
    return Blocks(ids=ids, mask=mask, segments=segments, positions=positions)


def tokenize_text(text: str, tokenizer) -> list[dict]:
    """How the tokenizer splits ``text``: one row per token with its id and visible text."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for tid, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        rows.append({"id": int(tid), "token": tokenizer.convert_ids_to_tokens(int(tid)), "text": text[start:end]})
    return rows


def read_text_file(path: str | Path) -> str:
    """A text file's contents: UTF-8, UTF-16 with a byte-order mark, or Windows-1252/Latin-1
    (see corpus.read_text)."""
    return read_text(path)


# --- token shards: a prepared data set's token stream on disk ---------------------------------
#
# ``prepare`` writes, per split (train, valid), the token ids of its examples in order, each
# encoded as ``encode_example`` encodes it (books with the paragraph joiner, records with EOS),
# into ``tokens-SPLIT-NNNNN.bin`` (raw uint16 where the vocabulary fits, else uint32; at most
# ``SHARD_TOKENS`` per file), ``examples-SPLIT.npy`` ((n, 2) int64: each example's first token
# and prompt length) and the index ``tokens.json``. ``open_shards`` maps them (numpy memmap) and
# gives ``ShardBlocks``: the same blocks ``make_blocks`` builds, cut from the files on demand.

SHARD_INDEX = "tokens.json"
SHARD_FORMAT = 1
SHARD_TOKENS = 1 << 28


def tokenizer_fingerprint(tokenizer) -> str:
    """What the shards' ids depend on: the tokenizer's vocabulary and rules, its EOS token."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        spec = repr(sorted(tokenizer.get_vocab().items()))
    else:
        spec = type(tokenizer).__qualname__
    return hashlib.sha256(f"{spec}\0{tokenizer.eos_token_id}".encode()).hexdigest()[:32]


class ShardWriter:
    """Writes the shards of one prepared data set into ``directory`` (call ``add`` per example in
    order, then ``close``)."""

    def __init__(self, directory: Path, tokenizer, fmt: str) -> None:
        self.dir = Path(directory)
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.joiner = book_joiner(tokenizer) if fmt == "book" else None
        try:
            size = len(tokenizer)
        except TypeError:  # a tokenizer that does not say its vocabulary size
            size = None
        self.dtype = np.uint16 if size is not None and size <= np.iinfo(np.uint16).max else np.uint32
        self.splits: dict[str, dict] = {}
        self.pending: dict[str, list[dict]] = {}

    def add(self, split: str, row: dict) -> None:
        self.pending.setdefault(split, []).append(row)
        if len(self.pending[split]) >= 512:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self.pending.pop(split, [])
        if not rows:
            return
        if "text" in rows[0]:  # the same ids as encode_example, tokenized as a batch
            eos = self.tokenizer.eos_token_id
            encoded = []
            for ids in self.tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]:
                ids = list(ids)
                if self.joiner:
                    ids += self.joiner
                elif not ids or ids[-1] != eos:
                    ids.append(eos)
                encoded.append((ids, 0))
        else:
            encoded = []
            for row in rows:
                ids, mask = encode_example(row, self.tokenizer)
                encoded.append((ids, mask.index(True) if True in mask else len(mask)))
        self._write(split, encoded)

    def add_ids(self, split: str, ids) -> None:
        """Add a text example already tokenized (its ids without EOS or joiner), as ``add`` would."""
        self._flush(split)  # rows added before keep their order
        ids = np.asarray(ids, dtype=np.int64)
        if self.joiner:
            ids = np.concatenate([ids, np.asarray(self.joiner, dtype=np.int64)])
        elif not len(ids) or ids[-1] != self.tokenizer.eos_token_id:
            ids = np.append(ids, self.tokenizer.eos_token_id)
        self._write(split, [(ids, 0)])

    def _write(self, split: str, encoded: list) -> None:
        state = self.splits.setdefault(split, {"files": [], "tokens": 0, "examples": [], "fh": None, "in_file": 0})
        for ids, prompt in encoded:
            state["examples"].append((state["tokens"], prompt))
            at = 0
            while at < len(ids):
                if state["fh"] is None or state["in_file"] >= SHARD_TOKENS:
                    if state["fh"] is not None:
                        state["fh"].close()
                    name = f"tokens-{split}-{len(state['files']):05d}.bin"
                    state["files"].append({"file": name, "tokens": 0})
                    (self.dir / name).unlink(missing_ok=True)  # never write through a hard link
                    state["fh"] = open(self.dir / name, "wb")
                    state["in_file"] = 0
                take = ids[at : at + SHARD_TOKENS - state["in_file"]]
                np.asarray(take, dtype=self.dtype).tofile(state["fh"])
                state["in_file"] += len(take)
                state["files"][-1]["tokens"] += len(take)
                state["tokens"] += len(take)
                at += len(take)

    def close(self) -> dict:
        """Write the example tables and the index; return the index."""
        for split in list(self.pending):
            self._flush(split)
        index = {"format": SHARD_FORMAT, "data_format": self.fmt, "dtype": np.dtype(self.dtype).name,
                 "tokenizer": tokenizer_fingerprint(self.tokenizer), "splits": {}}
        for split, state in self.splits.items():
            if state["fh"] is not None:
                state["fh"].close()
            table = np.asarray(state["examples"], dtype=np.int64).reshape(-1, 2)
            (self.dir / f"examples-{split}.npy").unlink(missing_ok=True)
            np.save(self.dir / f"examples-{split}.npy", table)
            index["splits"][split] = {"files": state["files"], "tokens": state["tokens"], "examples": len(table)}
        from .atomic import write_json

        write_json(self.dir / SHARD_INDEX, index)
        return index


def write_shards(directory: Path, splits: dict[str, Iterable[dict]], tokenizer, fmt: str) -> dict:
    """Shards of already prepared rows (``{"train": rows, "valid": rows}``) in ``directory``."""
    writer = ShardWriter(directory, tokenizer, fmt)
    for split, rows in splits.items():
        for row in rows:
            writer.add(split, row)
    return writer.close()


def open_shards(directory: Path, tokenizer, block_size: int, fmt: str | None) -> dict | None:
    """``{"train": ShardBlocks, "valid": ShardBlocks or None}`` from ``directory``'s shards, or
    None when it has none, or none for this tokenizer and format (then tokenize the rows)."""
    import json

    try:
        index = json.loads((Path(directory) / SHARD_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(index, dict) or index.get("format") != SHARD_FORMAT or index.get("data_format") != fmt
            or index.get("tokenizer") != tokenizer_fingerprint(tokenizer)):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict = {"train": None, "valid": None}
    for split, entry in index.get("splits", {}).items():
        if entry.get("examples"):
            out[split] = ShardBlocks(Path(directory), split, entry, np.dtype(index["dtype"]), block_size, pad,
                                     records=fmt in RECORD_FORMATS)
    return out


class _Field:
    """``blocks.ids[index]`` and the like, gathered from the shards on demand."""

    def __init__(self, blocks: ShardBlocks, name: str) -> None:
        self.blocks, self.name = blocks, name

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        rows = np.arange(len(self.blocks))[index]
        single = np.ndim(rows) == 0
        arrays = self.blocks._gather(np.atleast_1d(rows))
        value = arrays[self.name][0] if single else arrays[self.name]
        return value[rest] if rest else value

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.blocks), self.blocks.block_size + 1)


class ShardBlocks:
    """The blocks ``make_blocks`` builds, read from shards on demand: ``ids[index]``,
    ``mask[index]`` (and ``segments``/``positions`` for records) as numpy arrays."""

    def __init__(self, directory: Path, split: str, entry: dict, dtype, block_size: int, pad_id: int,
                 records: bool) -> None:
        self._maps = [np.memmap(directory / f["file"], dtype=dtype, mode="r") if f["tokens"] else np.zeros(0, dtype)
                      for f in entry["files"]]
        self._starts = np.cumsum([0] + [f["tokens"] for f in entry["files"]])
        self.total = int(self._starts[-1])
        self._block = block_size
        self._pad = pad_id
        self.ids = _Field(self, "ids")
        self.mask = _Field(self, "mask")
        if records:
            table = np.load(directory / f"examples-{split}.npy")
            self._layout(table)
            self.segments: _Field | None = _Field(self, "segments")
            self.positions: _Field | None = _Field(self, "positions")
        else:
            if self.total < 2:
                raise ValueError("need at least two tokens to train on")
            self._rows = max(1, -(-(self.total - 1) // block_size))
            self.segments = self.positions = None

    @property
    def block_size(self) -> int:
        return self._block

    def __len__(self) -> int:
        return self._rows

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream, across shard files."""
        stop = min(stop, self.total)
        parts = []
        k = int(np.searchsorted(self._starts, start, side="right") - 1)
        while start < stop:
            end = min(stop, int(self._starts[k + 1]))
            parts.append(np.asarray(self._maps[k][start - self._starts[k] : end - self._starts[k]], dtype=np.int64))
            start, k = end, k + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _layout(self, table: np.ndarray) -> None:
        """pack_examples' first-fit layout, as (token start, length, prompt end) pieces per row."""
        width = self._block + 1
        ends = np.append(table[1:, 0], self.total) if len(table) else np.zeros(0, np.int64)
        piece_start, piece_len, piece_prompt, row_of = [], [], [], []
        used, row = width, -1
        for (start, prompt), end in zip(table.tolist(), ends.tolist()):
            length = end - start
            if length < 2:
                continue
            for at in range(0, max(length - 1, 1), self._block):
                n = min(width, length - at)
                if used + n > width:
                    row += 1
                    used = 0
                piece_start.append(start + at)
                piece_len.append(n)
                piece_prompt.append(start + prompt)
                row_of.append(row)
                used += n
        if not piece_start:
            raise ValueError("need at least two tokens to train on")
        self._piece_start = np.asarray(piece_start, dtype=np.int64)
        self._piece_len = np.asarray(piece_len, dtype=np.int64)
        self._piece_prompt = np.asarray(piece_prompt, dtype=np.int64)
        self._row_ptr = np.searchsorted(np.asarray(row_of), np.arange(row + 2))
        self._rows = row + 1

    def _gather(self, rows: np.ndarray) -> dict:
        width = self._block + 1
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        if self.segments is None:
            for r, block in enumerate(rows):
                piece = self._tokens(int(block) * self._block, int(block) * self._block + width)
                ids[r, : len(piece)] = piece
                mask[r, : len(piece)] = True
            return {"ids": ids, "mask": mask}
        segments = np.zeros((len(rows), width), dtype=np.int32)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        for r, block in enumerate(rows):
            at = 0
            first, last = int(self._row_ptr[block]), int(self._row_ptr[block + 1])
            for segment, p in enumerate(range(first, last)):
                start, n = int(self._piece_start[p]), int(self._piece_len[p])
                ids[r, at : at + n] = self._tokens(start, start + n)
                mask[r, at : at + n] = np.arange(start, start + n) >= self._piece_prompt[p]
                mask[r, at] = False
                segments[r, at : at + n] = segment
                positions[r, at : at + n] = np.arange(n)
                at += n
            segments[r, at:] = last - first
            positions[r, at:] = np.arange(width - at)
        return {"ids": ids, "mask": mask, "segments": segments, "positions": positions}
