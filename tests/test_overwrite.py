"""No command deletes or writes into a folder that tunesmith did not make; --overwrite replaces only a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.atomic import atomic_dir
from tunesmith.cli import app

runner = CliRunner()
TINY = ["--base", "tiny-llama", "--epochs", "1", "--block-size", "64", "--batch-size", "4"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles) -> str:
    """The command stopped with a message (no traceback) that contains every needle."""
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit, result.exception  # an uncaught error would be here
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    return result.output


@pytest.fixture()
def book(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Paragraph {i} tells of the sea and the ship. It was cold.\n\n" for i in range(30)))
    return path


@pytest.fixture()
def precious(tmp_path) -> Path:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "t.txt").write_text("thesis")
    return folder


def intact(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["t.txt"] and (folder / "t.txt").read_text() == "thesis"


def no_leftovers(parent: Path) -> bool:
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_never_touches_a_folder_it_did_not_make(book, precious, overwrite, tiny_model_dir):
    result = invoke("train", book, "--out", precious, *TINY, *overwrite)
    text = refused(result, "precious", "1 file or folder that tunesmith did not make")
    assert "run directory" not in text  # it is not one
    if overwrite:
        assert "even with --overwrite" in text
    else:
        assert "pass --overwrite" not in text  # that would lead straight to the deletion
    assert intact(precious) and no_leftovers(precious.parent)


def test_train_refuses_prepared_data_and_files(book, tmp_path, tiny_model_dir):
    prepared = tmp_path / "book.prepared"
    assert invoke("prepare", book, "--base", "tiny-llama", "--no-estimate", "--out", prepared).exit_code == 0
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    refused(invoke("train", prepared, "--out", prepared, *TINY, "--overwrite"), "prepared data")
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before

    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    refused(invoke("train", book, "--out", notes, *TINY), "a file is already there")
    refused(invoke("train", book, "--out", notes / "run", *TINY), "is a file")
    assert notes.read_text() == "keep"


def test_overwrite_replaces_an_earlier_run_only(book, tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1, "base": "older"}))
    (run / "status.json").write_text(json.dumps({"status": "succeeded"}))
    (run / "old-only.txt").write_text("from the earlier run")
    text = refused(invoke("train", book, "--out", run, *TINY), "a tunesmith run already exists", "--overwrite")
    assert (run / "old-only.txt").exists()
    assert "status: succeeded" in text

    result = invoke("train", book, "--out", run, *TINY, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["base"] == "tiny-llama"
    assert not (run / "old-only.txt").exists()
    assert no_leftovers(tmp_path)


def test_train_into_an_empty_folder_is_fine(book, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("train", book, "--out", empty, *TINY, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert (empty / "adapter" / "adapter_config.json").exists()


def test_demo_refuses_a_folder_it_did_not_make(precious, tmp_path):
    refused(invoke("demo", "--out", precious), "precious", "tunesmith did not make")
    assert intact(precious) and no_leftovers(precious.parent)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    refused(invoke("demo", "--out", notes), "a file is already there")
    assert notes.read_text() == "keep"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_prepare_never_touches_a_folder_it_did_not_make(book, precious, overwrite, tiny_model_dir):
    result = invoke("prepare", book, "--base", "tiny-llama", "--no-estimate", "--out", precious, *overwrite)
    text = refused(result, "precious", "not a prepared data set")
    assert "pass --overwrite" not in text
    assert intact(precious) and no_leftovers(precious.parent)


def test_atomic_dir_replaces_only_what_replace_if_allows(precious, tmp_path):
    with pytest.raises(FileExistsError):
        with atomic_dir(precious, overwrite=True, replace_if=lambda p: (p / "config.json").exists()) as tmp:
            (tmp / "new.txt").write_text("new")
    assert intact(precious) and no_leftovers(tmp_path)

    with atomic_dir(precious, overwrite=True, replace_if=lambda p: True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in precious.iterdir()] == ["new.txt"]
    assert no_leftovers(tmp_path)
