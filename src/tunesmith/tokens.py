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

import numpy as np

from .chat import encode_chat
from .corpus import decode_text, require_file
from .errors import TunesmithError


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
    """A text file's contents: UTF-8 or UTF-16 with a byte-order mark (see corpus.decode_text)."""
    path = Path(path)
    require_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TunesmithError(f"cannot read the file: {exc.strerror or exc}", file=path) from None
    return decode_text(data, path, [])
