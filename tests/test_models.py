"""Base model resolution: bundled names, local dirs, .gguf files, hub ids; never a download."""

from __future__ import annotations

import pytest

from tunesmith import TunesmithError
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
