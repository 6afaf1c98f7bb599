"""A folder (or glob) of books: prepared in path order, each file's name and line kept for the copy finder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.copies import find_copies
from tunesmith.errors import TunesmithError
from tunesmith.prepare import prepare

FIRST = (
    "CHAPTER I\n\nThe harbour was quiet when the ferry came in at dawn,\n"
    "and the gulls had not yet begun their shouting over the fish market.\n"
)
SECOND = (
    "CHAPTER I\n\nA short opening line stands here.\n\n"
    "CHAPTER II\n\nMarta folded the letter twice, put it in her coat pocket, and\n"
    "walked the long way round the old cemetery to the station.\n"
)


@pytest.fixture()
def shelf(tmp_path: Path) -> Path:
    folder = tmp_path / "shelf"
    (folder / "b").mkdir(parents=True)
    (folder / "a-first.txt").write_text(FIRST, encoding="utf-8")
    (folder / "b" / "second.txt").write_text(SECOND, encoding="utf-8")
    (folder / ".hidden.txt").write_text("Never read.\n", encoding="utf-8")
    (folder / "notes.pdf").write_bytes(b"%PDF")  # not a supported type: skipped in a folder
    return folder


@pytest.fixture()
def tokenizer(real_base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_base_dir))


def test_a_folder_is_prepared_in_path_order_and_copies_name_file_and_line(
    shelf: Path, tmp_path: Path, tokenizer, real_base_dir: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(real_base_dir.parent, target_is_directory=True)
    prepared = prepare(shelf, out=tmp_path / "shelf.prepared", tokenizer=tokenizer, valid_fraction=0.0,
                       estimate=False)
    report = prepared.report
    assert report["source"] == str(shelf.resolve())
    assert [Path(f["file"]).name for f in report["files"]] == ["a-first.txt", "second.txt"]
    texts = [row["text"] for row in prepared.train]
    assert texts[0].startswith("CHAPTER I") and any("Marta folded" in t for t in texts)
    assert not any("Never read" in t for t in texts)
    text = "Then Marta folded the letter twice, put it in her coat pocket, and walked the long way home."
    (span,) = find_copies(prepared.dir, text).spans
    (where,) = span.locations
    assert (where.file, where.line, where.end_line, where.heading) == ("b/second.txt", 7, 8, "CHAPTER II")


def test_a_glob_and_mixed_formats(shelf: Path, tmp_path: Path, tokenizer) -> None:
    prepared = prepare(str(shelf / "**" / "*.txt"), out=tmp_path / "g", tokenizer=tokenizer, estimate=False)
    assert [Path(f["file"]).name for f in prepared.report["files"]] == ["a-first.txt", "second.txt"]
    default = prepare(str(shelf / "*.txt"), tokenizer=tokenizer, estimate=False)  # named after the folder
    assert default.dir == shelf.parent / "shelf.prepared" and len(default.report["files"]) == 1
    with pytest.raises(TunesmithError, match="no file matches"):
        prepare(str(shelf / "*.nothing"), out=tmp_path / "n", tokenizer=tokenizer, estimate=False)
    (shelf / "rows.jsonl").write_text('{"prompt": "q", "completion": " a"}\n', encoding="utf-8")
    with pytest.raises(TunesmithError) as err:
        prepare(shelf, out=tmp_path / "m", tokenizer=tokenizer, estimate=False)
    assert "format" in err.value.message and err.value.file.endswith("rows.jsonl")
    assert not (tmp_path / "m").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TunesmithError, match="holds no file"):
        prepare(empty, out=tmp_path / "e", tokenizer=tokenizer, estimate=False)
