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
