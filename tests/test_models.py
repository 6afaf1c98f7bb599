"""Base model resolution: bundled names, local dirs, .gguf files, hub ids; never a download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tunesmith import TunesmithError, models
from tunesmith.models import CACHE_MARKER, list_models, resolve


def test_bundled_base_is_cached_as_safetensors(real_base_dir):
    assert (real_base_dir / CACHE_MARKER).exists()
    assert (real_base_dir / "model.safetensors").exists()
    assert (real_base_dir / "tokenizer.json").exists()
    assert resolve("smollm2-135m") == real_base_dir
    row = next(r for r in list_models() if r["name"] == "smollm2-135m")
    assert row["available"] and row["cached"]


def test_local_model_directory_is_accepted(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == tiny_model_dir
    assert resolve("tiny-llama") == tiny_model_dir


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(TunesmithError, match="not a Hugging Face model"):
        resolve(str(tmp_path))


def test_broken_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(TunesmithError) as info:
        resolve(str(bad))
    assert "broken.gguf" in str(info.value)


def test_missing_gguf_and_unknown_names(tmp_path):
    with pytest.raises(TunesmithError, match="no such GGUF file"):
        resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(TunesmithError, match="unknown base model"):
        resolve("gpt-17")


def test_hub_id_not_in_local_cache_fails_fast_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(TunesmithError, match="not in the local Hugging Face cache"):
        resolve("HuggingFaceTB/SmolLM2-360M")


def test_hub_id_already_in_the_local_cache_is_used(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve("someone/tiny") == snapshot


# --- the GGUF cache: its own TUNESMITH_HOME, a fake GGUF file and a converter that counts its calls ---

@pytest.fixture()
def own_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    return home


@pytest.fixture()
def conversions(monkeypatch, tiny_model_dir):
    """Replace the dequantizer by one that returns the tiny model and records each call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def fake(gguf):
        calls.append(gguf)
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), AutoTokenizer.from_pretrained(str(tiny_model_dir))

    monkeypatch.setattr(models, "_dequantize", fake)
    return calls


def test_gguf_cache_is_reused_only_while_source_and_converter_match(tmp_path, own_home, conversions):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF first version")
    target = own_home / "models" / "m"
    assert models._convert_gguf(gguf, target) == target and len(conversions) == 1
    assert (target / "model.safetensors").exists()
    models._convert_gguf(gguf, target)
    assert len(conversions) == 1  # unchanged: reused

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched: same size, new mtime
    models._convert_gguf(gguf, target)
    assert len(conversions) == 2

    gguf.write_bytes(b"GGUF second, longer version")
    models._convert_gguf(gguf, target)
    assert len(conversions) == 3

    marker = json.loads((target / models.CACHE_MARKER).read_text())
    assert marker["size"] == gguf.stat().st_size and marker["mtime_ns"] == gguf.stat().st_mtime_ns
    (target / models.CACHE_MARKER).write_text(json.dumps({**marker, "converter": models.CONVERTER_VERSION - 1}))
    models._convert_gguf(gguf, target)
    assert len(conversions) == 4  # an older converter's output is redone
    (target / models.CACHE_MARKER).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
    models._convert_gguf(gguf, target)
    assert len(conversions) == 5  # a marker from before the checks existed is not trusted
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == [".m.lock"]


def test_a_changed_bundled_file_is_converted_again(tmp_path, own_home, conversions, monkeypatch):
    gguf = tmp_path / "bundled.gguf"
    gguf.write_bytes(b"GGUF bundled")
    monkeypatch.setattr(models, "bundled_gguf_path", lambda spec: gguf)
    path = resolve("smollm2-135m")
    assert path == own_home / "models" / "smollm2-135m" and len(conversions) == 1
    assert resolve("smollm2-135m") == path and len(conversions) == 1
    assert next(r for r in list_models() if r["name"] == "smollm2-135m")["cached"]
    gguf.write_bytes(b"GGUF bundled, upgraded")
    assert not next(r for r in list_models() if r["name"] == "smollm2-135m")["cached"]
    resolve("smollm2-135m")
    assert len(conversions) == 2


def test_a_missing_tensor_is_an_error(tmp_path, own_home, monkeypatch, tiny_model_dir):
    import transformers

    def incomplete(*args, **kwargs):
        model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model_dir))
        full = model.state_dict
        model.state_dict = lambda: {k: v for k, v in full().items() if k != "model.layers.1.mlp.up_proj.weight"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(incomplete))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir))))
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(TunesmithError) as info:
        resolve(str(gguf))
    assert "cut.gguf" in str(info.value) and "model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert not [p for p in (own_home / "models").iterdir() if not p.name.endswith(".lock")]  # nothing cached


SLOW_CONVERTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith import models

    gguf, target, log, tiny = map(Path, sys.argv[1:5])

    def slow(path):
        with open(log, "a") as fh:
            fh.write("start\\n")
        time.sleep(2)
        return AutoModelForCausalLM.from_pretrained(str(tiny)), AutoTokenizer.from_pretrained(str(tiny))

    models._dequantize = slow
    Path(str(log) + ".ready" + sys.argv[5]).touch()
    while not all(Path(str(log) + ".ready" + i).exists() for i in "12"):
        time.sleep(0.01)
    models._convert_gguf(gguf, target)
    """
)


def test_two_processes_converting_at_once_share_one_conversion(tmp_path, own_home, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = own_home / "models" / "m"
    log = tmp_path / "conversions.log"
    env = {**os.environ, "TUNESMITH_HOME": str(own_home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", SLOW_CONVERTER, str(gguf), str(target), str(log), str(tiny_model_dir), i],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in "12"
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert log.read_text() == "start\n"  # the second process waited and reused the first one's result
    assert models.cache_is_current(target, gguf)
    AutoModelForCausalLM.from_pretrained(str(target))  # a complete checkpoint
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


# --- `tunesmith models list|show|rm`: base models, runs and exports on disk ---------------------------


def _file(path, size: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def _run(path, *, status="succeeded", task=None, weights=1000):
    """A run directory as train writes it, with files of known sizes."""
    config = {"tunesmith_run": 1, "base": "tiny-llama", "method": "lora", "epochs": 3, "learning_rate": 0.001,
              "block_size": 64, "seed": 7, "data": {"source": "/data/book.txt",
                                                    "report": {"format": "book", "examples": {"train": 9, "valid": 1}}}}
    if task:
        config["task"] = task
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "status.json").write_text(json.dumps({"status": status, "step": 12}))
    (path / "summary.json").write_text(json.dumps({"validation_loss_after": 2.5}))
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    _file(path / "adapter" / "adapter_model.safetensors", weights)
    return path


def _gguf_export(path, source="runs/demo"):
    import gguf

    from tunesmith.gguf_export import EXPORT_KEY

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string(EXPORT_KEY, json.dumps({"tunesmith_export": 1, "format": "gguf", "quant": "q8_0",
                                              "source": source}))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _size_of(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@pytest.fixture()
def shelf(tmp_path, own_home, monkeypatch):
    """A working directory with runs/ and exports/, and a home with one model of its own."""
    monkeypatch.chdir(tmp_path)
    _file(own_home / "models" / "mine" / "config.json", 300)
    _file(own_home / "models" / "mine" / "model.safetensors", 4000)
    _run(tmp_path / "runs" / "demo")
    _run(tmp_path / "runs" / "two-stage" / "reviews", task="regress", weights=500)
    hf = tmp_path / "exports" / "demo-hf"
    _file(hf / "model.safetensors", 2500)
    (hf / "tunesmith-export.json").write_text(json.dumps({"tunesmith_export": 1, "format": "hf", "quant": "f32",
                                                          "source": str(tmp_path / "runs" / "demo")}))
    _gguf_export(tmp_path / "exports" / "demo.gguf")
    (tmp_path / "exports" / "Modelfile").write_text("# tunesmith export of demo\nFROM ./demo.gguf\n")
    _file(tmp_path / "exports" / "notes.txt", 10)  # not an export: not listed
    return tmp_path


def test_list_shows_bases_runs_and_exports_with_their_size_and_uses(shelf, own_home):
    from tunesmith.inventory import list_items

    items = {(i.kind, i.name): i for i in list_items()}
    assert set(items) >= {("base", "smollm2-135m"), ("base", "mine"), ("run", "runs/demo"),
                          ("run", "runs/two-stage/reviews"), ("export", "exports/demo-hf"),
                          ("export", "exports/demo.gguf")}
    assert ("export", "exports/notes.txt") not in items
    assert items["base", "mine"].size == 4300
    assert items["run", "runs/demo"].size == _size_of(shelf / "runs" / "demo")
    assert items["run", "runs/demo"].size >= 1000 + 2  # the adapter's weights and its config
    assert items["export", "exports/demo-hf"].size == _size_of(shelf / "exports" / "demo-hf")
    assert items["export", "exports/demo.gguf"].size == (shelf / "exports" / "demo.gguf").stat().st_size
    assert items["base", "smollm2-135m"].size == 0  # bundled, not converted in this home yet
    assert {"generate", "serve", "eval", "export"} <= set(items["run", "runs/demo"].uses)
    assert "predict" in items["run", "runs/two-stage/reviews"].uses
    assert "generate" not in items["run", "runs/two-stage/reviews"].uses
    assert {"llama.cpp", "Ollama"} <= set(items["export", "exports/demo.gguf"].uses)
    assert "transformers" in items["export", "exports/demo-hf"].uses
    assert "train --base" in items["base", "mine"].uses


def test_a_run_being_trained_can_only_wait(shelf):
    from tunesmith.inventory import find, remove
    from tunesmith.rundir import Run

    run = _run(shelf / "runs" / "busy", status="running")
    with Run(run).training_lock():
        item = find("busy")
        assert item.uses == [] and item.state == "training now"
        with pytest.raises(TunesmithError, match="training this run"):
            remove(item)
    assert (run / "config.json").is_file()


def test_models_cli_list_and_show(shelf):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output and "mine" in result.output
    result = CliRunner().invoke(app, ["models", "list", "--json"])
    listed = {(row["kind"], row["name"]): row for row in json.loads(result.output)}
    assert set(listed) >= {("base", "smollm2-135m"), ("base", "mine"), ("run", "runs/demo"),
                           ("run", "runs/two-stage/reviews"), ("export", "exports/demo-hf"),
                           ("export", "exports/demo.gguf")}
    assert listed["base", "mine"]["size"] == 4300 and "generate" in listed["run", "runs/demo"]["uses"]
    result = CliRunner().invoke(app, ["models", "show", "demo", "--json"], terminal_width=250)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["kind"] == "run" and info["base"] == "tiny-llama"
    assert info["corpus"]["source"] == "/data/book.txt" and info["corpus"]["examples"] == {"train": 9, "valid": 1}
    assert info["hyperparameters"] == {"method": "lora", "epochs": 3, "learning_rate": 0.001, "block_size": 64,
                                       "seed": 7}
    assert info["metrics"]["summary"] == {"validation_loss_after": 2.5}
    files = {f["name"]: f["size"] for f in info["files"]}
    assert files["adapter/"] == 1002 and files["config.json"] == (shelf / "runs" / "demo" / "config.json").stat().st_size
    result = CliRunner().invoke(app, ["models", "show", "exports/demo.gguf"], terminal_width=250)
    assert result.exit_code == 0 and "q8_0" in result.output and "Modelfile" in result.output
    result = CliRunner().invoke(app, ["models", "show", "nothing-here"])
    assert result.exit_code == 1 and "no base model, run or export called 'nothing-here'" in result.output
    assert "Traceback" not in result.output


def test_rm_asks_first_and_removes_a_run_whole(shelf):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["models", "rm", "demo"], input="n\n")
    assert result.exit_code == 1 and "nothing removed" in result.output
    assert (shelf / "runs" / "demo" / "config.json").is_file()
    result = CliRunner().invoke(app, ["models", "rm", "demo"], input="y\n")
    assert result.exit_code == 0 and not (shelf / "runs" / "demo").exists()
    result = CliRunner().invoke(app, ["models", "rm", "exports/demo.gguf", "--yes"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (shelf / "exports").iterdir()) == ["demo-hf", "notes.txt"]  # its Modelfile too
    result = CliRunner().invoke(app, ["models", "rm", "mine", "--yes"])
    assert result.exit_code == 0 and not (shelf / "home" / "models" / "mine").exists()
    assert list((shelf / "runs").iterdir()) == [shelf / "runs" / "two-stage"]  # nothing else went


def test_rm_refuses_a_symlink_that_leads_outside(shelf, own_home):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    outside = _run(shelf / "elsewhere" / "precious")
    (shelf / "runs" / "link").symlink_to(outside, target_is_directory=True)
    (own_home / "models" / "linked").symlink_to(shelf / "home" / "models" / "mine", target_is_directory=True)
    _file(shelf / "elsewhere" / "model" / "config.json", 10)
    (own_home / "models" / "escape").symlink_to(shelf / "elsewhere" / "model", target_is_directory=True)
    for name in ("link", "runs/link", "escape"):
        result = CliRunner().invoke(app, ["models", "rm", name, "--yes"])
        assert result.exit_code == 1 and "outside $TUNESMITH_HOME" in result.output, (name, result.output)
        assert "Traceback" not in result.output
    assert (outside / "config.json").is_file() and (shelf / "runs" / "link").is_symlink()
    assert (shelf / "elsewhere" / "model" / "config.json").is_file()


def test_rm_refuses_a_path_that_climbs_out_with_dotdot(shelf):
    from tunesmith.inventory import remove

    outside = _run(shelf / "other-runs" / "kept")
    for name in ("runs/../other-runs/kept", str(shelf / "runs" / ".." / "other-runs" / "kept")):
        with pytest.raises(TunesmithError, match="outside") as err:
            remove(name)
        assert "other-runs/kept" in str(err.value)
    with pytest.raises(TunesmithError, match="no base model, run or export called 'runs/..'"):
        remove("runs/..")  # the folder above the runs folder is none of them
    assert (shelf / "runs" / "demo").is_dir()
    assert (outside / "config.json").is_file()
    # pointed at that folder, the same run may go
    remove("other-runs/kept", runs=shelf / "other-runs")
    assert not outside.exists()
