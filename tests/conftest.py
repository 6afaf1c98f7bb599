"""Shared fixtures: a tiny random Llama (fast) and the real bundled base (slow, cached once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
ARTIFACTS = ROOT / "test-artifacts"

# One model cache for the whole session (and across runs): converting the bundled GGUF takes ~18 s.
SESSION_HOME = Path(os.environ.setdefault("TUNESMITH_TEST_HOME", str(ROOT / ".pytest-home")))
os.environ["TUNESMITH_HOME"] = str(SESSION_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def real_base_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the bundled GGUF into the session cache."""
    from tunesmith.models import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(real_base_dir: Path) -> Path:
    """A 2-layer random Llama that shares the real tokenizer, registered as model 'tiny-llama'."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.home import models_dir

    target = models_dir() / "tiny-llama"
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(str(real_base_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    tmp = target.with_name(".tiny-llama.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


@pytest.fixture()
def tunesmith_home(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """An empty TUNESMITH_HOME for one test, sharing the session's model cache."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(SESSION_HOME / "models", target_is_directory=True)
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not (CORPORA / "sherlock.txt").exists():
        pytest.skip("public-domain corpora not found beside the project (../shared/corpora)")
    return CORPORA


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
