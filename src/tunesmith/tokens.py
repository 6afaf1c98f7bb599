"""From prepared examples to packed token blocks, and the `tokenize` lesson.

Examples are tokenized once, joined into one stream (each ending in EOS) and cut into
full blocks, so no compute is spent on padding. A loss mask keeps prompts out of the
loss for prompt/completion and chat data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import numpy as np

from .errors import TunesmithError


@dataclass
class Blocks:
    """``ids[i]`` holds ``block_size + 1`` tokens: inputs are ``[:-1]``, targets ``[1:]``."""

    ids: np.ndarray  # (n, block_size + 1) int64
    mask: np.ndarray  # (n, block_size + 1) bool: True where the token is a target to learn

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def block_size(self) -> int:
        return self.ids.shape[1] - 1

    @property
    def target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())


def encode_example(row: dict, tokenizer, joiner: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of one example. Records end in EOS; consecutive pieces of one
    book end in ``joiner`` (a paragraph break) instead, so the model learns to go on writing
    rather than to stop after every few hundred tokens."""
    eos = tokenizer.eos_token_id
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


def tokenize_text(text: str, tokenizer) -> list[dict]:
    """How the tokenizer splits ``text``: one row per token with its id and visible text."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for tid, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        rows.append({"id": int(tid), "token": tokenizer.convert_ids_to_tokens(int(tid)), "text": text[start:end]})
    return rows


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise TunesmithError("no such file", file=path)
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise TunesmithError("this looks like a binary file, not text", file=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TunesmithError(f"not valid UTF-8 (byte {exc.start})", file=path, line=line, hint="save it as UTF-8") from None
