"""Token shards: prepare writes them, training reads the same blocks from them, in the same order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tunesmith.prepare import load_prepared, prepare
from tunesmith.tokens import SHARD_INDEX, make_blocks, open_shards


@pytest.fixture(scope="module")
def tokenizer(real_base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_base_dir))


BOOK = "\n\n".join(
    f"Chapter {i}. The fog lay thick upon the moor, and Holmes said nothing for a while. " * (1 + i % 4)
    for i in range(60)
) + "\n"


def _records(kind: str) -> str:
    if kind == "prompt_completion":
        rows = [{"prompt": f"Question {i} asks about the weather?" * (1 + i % 3), "completion": f" Answer {i}." * (1 + i % 5)}
                for i in range(80)]
    else:
        rows = [{"text": f"Document {i}: " + "words and more words. " * (1 + i % 7)} for i in range(80)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("kind", ["book", "text", "prompt_completion"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_shard_blocks_equal_make_blocks(tmp_path: Path, tokenizer, kind: str, block_size: int) -> None:
    source = tmp_path / ("book.txt" if kind == "book" else "rows.jsonl")
    source.write_text(BOOK if kind == "book" else _records(kind), encoding="utf-8")
    prepared = prepare(source, out=tmp_path / "p", tokenizer=tokenizer, block_size=block_size, estimate=False)
    assert prepared.report["format"] == kind
    index = json.loads((prepared.dir / SHARD_INDEX).read_text())
    assert index["dtype"] == "uint16"  # the vocabulary (49,152) fits
    shards = open_shards(prepared.dir, tokenizer, block_size, kind)
    for split, rows in (("train", prepared.train), ("valid", prepared.valid)):
        reference = make_blocks(list(rows), tokenizer, block_size, kind)
        blocks = shards[split]
        assert len(blocks) == len(reference)
        order = np.random.default_rng(0).permutation(len(reference))
        for idx in (order[:8], order[8:16], slice(0, 3), np.arange(len(reference))):
            assert np.array_equal(blocks.ids[idx], reference.ids[idx])
            assert np.array_equal(blocks.mask[idx], reference.mask[idx])
            if reference.segments is None:
                assert blocks.segments is None
            else:
                assert np.array_equal(blocks.segments[idx], reference.segments[idx])
                assert np.array_equal(blocks.positions[idx], reference.positions[idx])
    # another tokenizer or format: the shards are not used
    assert open_shards(prepared.dir, tokenizer, block_size, "chat" if kind != "chat" else "book") is None


def test_a_prepared_dir_without_shards_still_trains_the_same(tmp_path: Path, tokenizer, tiny_model_dir) -> None:
    from tunesmith import finetune

    source = tmp_path / "book.txt"
    source.write_text(BOOK, encoding="utf-8")
    prepared = prepare(source, out=tmp_path / "p", tokenizer=tokenizer, block_size=64, estimate=False)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("train.jsonl", "valid.jsonl", "report.json"):  # as an older version wrote it
        shutil.copy2(prepared.dir / name, old / name)
    kw = dict(base="tiny-llama", epochs=1, batch_size=4, block_size=64, max_steps=3, sample_tokens=8)
    a = finetune(prepared.dir, out=tmp_path / "a", progress=False, samples=False, **kw)
    b = finetune(old, out=tmp_path / "b", progress=False, samples=False, **kw)
    losses = lambda run: [r["training_loss"] for r in run.metrics() if "training_loss" in r]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == 3
    assert (tmp_path / "b" / "data" / SHARD_INDEX).is_file()  # written from the rows when training began
    assert load_prepared(tmp_path / "b" / "data").train == prepared.train
