"""Export: a merged Hugging Face directory and GGUF files, proven by the runtimes that read them
(transformers, transformers' GGUF reader, and llama.cpp through llama-cpp-python)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tunesmith import TunesmithError, finetune, load
from tunesmith.cli import app
from tunesmith.export import export

TEXT = "".join(
    f"The lamp burned low in study number {i}. Holmes leaned back and closed his eyes for {i} minutes. "
    f"\"You have come {i} miles,\" he said at last. The visitor nodded and said nothing.\n\n"
    for i in range(24)
)
TINY = dict(base="tiny-llama", block_size=64, batch_size=2, epochs=1, sample_tokens=8, lr=3e-2)
# Text that trips tokenizers: leading spaces, runs of spaces and newlines, digits, unicode, specials.
TRICKY = [
    "Hello world",
    "  two leading spaces and  double  spaces",
    "\n\nnewlines\n\n\nand\ttabs\t",
    "In 1984 there were 12345 ships, 3.14159 and 1,000,000.",
    "naïve café, Straße, Ελληνικά, 日本語, emoji 🦊🎉",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't won't it's y'all ''quoted''",
    " ",
]
PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run on the tiny model, trained enough that the adapter is far from zero."""
    root = tmp_path_factory.mktemp("export")
    book = root / "book.txt"
    book.write_text(TEXT)
    run = finetune(book, out=root / "run", progress=False, samples=False, **TINY)
    assert run.status == "succeeded"
    return run


# -- Hugging Face directory -------------------------------------------------------------------


def test_hf_export_loads_in_plain_transformers_with_the_same_logits(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = export(tiny_run.path, format="hf", out=tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = load(tiny_run.path, dtype="fp32")
    ids = ours.tokenizer.encode(TEXT[:300], add_special_tokens=False)
    expected = _logits(ours.model, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_run.config["base_path"])).eval()
    assert (expected - _logits(base, ids)).abs().max() > 1e-2, "the adapter changes the model"
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-5, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == ours.tokenizer.chat_template
    assert tok.encode(TRICKY[4], add_special_tokens=False) == ours.tokenizer.encode(TRICKY[4], add_special_tokens=False)
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.pad_token_id is not None and gen.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")

    card = (out / "README.md").read_text()
    book = Path(tiny_run.config["data"]["source"])
    assert hashlib.sha256(book.read_bytes()).hexdigest() in card
    assert "book.txt" in card and "| epochs | 1 |" in card and "| method | lora |" in card
    summary = json.loads((tiny_run.path / "summary.json").read_text())
    assert "validation" in card.lower() and summary, "the card reports the run's validation numbers"
    assert oct((out / "model.safetensors").stat().st_mode & 0o077) != "0o0", "readable by others like any file"


def test_model_card_names_the_bundled_base_and_its_licence(tiny_run, tmp_path):
    from tunesmith.export import Source, model_card

    src = Source(None, None, Path("."), "demo", "smollm2-135m", Path("."), tiny_run)
    (tiny_run.path / "eval.json").write_text(json.dumps({"originality": {"score": 0.875}}))
    try:
        card = model_card(src, "gguf", "q8_0")
    finally:
        (tiny_run.path / "eval.json").unlink()
    assert "license: apache-2.0" in card and "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| eval: originality.score | 0.875 |" in card


# -- GGUF: metadata, tensors, transformers' reader -----------------------------------------------


def test_gguf_metadata_and_vocabulary_match_llama_cpps_converter(tiny_run, tmp_path, real_base_dir):
    """The tokenizer part is compared with the bundled GGUF, which llama.cpp's own converter wrote."""
    from gguf import GGUFReader

    from tunesmith.models import BUNDLED, bundled_gguf_path

    out = export(tiny_run.path, format="gguf", quant="f16", out=tmp_path / "tiny.gguf")
    ours = GGUFReader(out)
    reference = GGUFReader(bundled_gguf_path(BUNDLED["smollm2-135m"]))
    field = lambda reader, key: reader.fields[key].contents()  # noqa: E731
    expected = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 2048,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 49152,
        "tokenizer.ggml.model": "gpt2",
    }
    assert {k: field(ours, k) for k in expected} == expected
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert field(ours, key) == field(reference, key), key
    names = {t.name: t for t in ours.tensors}
    assert "output.weight" not in names, "tied embeddings are not written twice"
    assert names["blk.1.attn_k.weight"].tensor_type.name == "F16" and names["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    assert len(names) == 1 + 2 * 9 + 1


@pytest.mark.parametrize("quant, atol", [("f32", 1e-4), ("f16", 2e-2)])
def test_gguf_loads_back_through_transformers_gguf_reader(tiny_run, tmp_path, quant, atol):
    from transformers import AutoModelForCausalLM

    out = export(tiny_run.path, format="gguf", quant=quant, out=tmp_path / f"tiny-{quant}.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    ours = load(tiny_run.path, dtype="fp32")
    ids = ours.tokenizer.encode(TEXT[:200], add_special_tokens=False)
    torch.testing.assert_close(_logits(back, ids), _logits(ours.model, ids), atol=atol, rtol=0)


def test_ollama_modelfile_carries_the_chatml_template_and_stops(tiny_run, tmp_path):
    out = export(tiny_run.path, format="gguf", out=tmp_path / "m.gguf", ollama=True)
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    # Rendered by hand for one user message "Hi", Go's template must give the tokenizer's prompt.
    ours = load(tiny_run.path, dtype="fp32")
    expected = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = template.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    rendered = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == expected and out.exists()


# -- bad input ----------------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_unknown_quant_and_format_are_refused_before_loading(tiny_run, tmp_path):
    result = _cli(tiny_run.path, "--format", "gguf", "--quant", "q3_k", "--out", tmp_path / "x.gguf")
    assert result.exit_code == 1 and "unknown --quant 'q3_k'" in result.output and "Traceback" not in result.output
    result = _cli(tiny_run.path, "--format", "hf", "--quant", "q8_0", "--out", tmp_path / "hf")
    assert result.exit_code == 1 and "unknown --quant 'q8_0' for --format hf" in result.output
    assert "Traceback" not in result.output
    result = _cli(tiny_run.path, "--format", "onnx", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "unknown format 'onnx'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_run_still_training_is_refused(tiny_run, tmp_path):
    status = tiny_run.path / "status.json"
    saved = status.read_text()
    status.write_text(json.dumps({"status": "running", "step": 3}))
    try:
        with tiny_run.training_lock():  # what a training process holds
            result = _cli(tiny_run.path, "--format", "hf", "--out", tmp_path / "hf")
    finally:
        status.write_text(saved)
    assert result.exit_code == 1 and "still training" in result.output and "status.json" in result.output
    assert not (tmp_path / "hf").exists()


def test_a_run_whose_training_process_died_exports_its_last_weights(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy)
    (copy / "status.json").write_text(json.dumps({"status": "running", "step": 3}))  # killed: no lock held
    out = export(copy, format="hf", out=tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "tunesmith-export.json").is_file()


def test_a_run_whose_base_is_gone_is_refused(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["base"] = "no-such-model"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunesmithError, match="base model 'no-such-model' cannot be found") as err:
        export(copy, format="gguf", out=tmp_path / "x.gguf")
    assert err.value.field == "base" and not (tmp_path / "x.gguf").exists()


def test_an_existing_output_is_kept_unless_it_is_an_earlier_export(tiny_run, tmp_path):
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"precious")
    result = _cli(tiny_run.path, "--format", "gguf", "--out", theirs)
    assert result.exit_code == 1 and "already exists" in result.output
    result = _cli(tiny_run.path, "--format", "gguf", "--out", theirs, "--overwrite")
    assert result.exit_code == 1 and "not written by tunesmith" in result.output
    assert theirs.read_bytes() == b"precious"

    ours = export(tiny_run.path, format="gguf", out=tmp_path / "ours.gguf")
    ours.write_bytes(ours.read_bytes())  # still a tunesmith export
    before = ours.stat().st_mtime_ns
    with pytest.raises(TunesmithError, match="already exists"):
        export(tiny_run.path, format="gguf", out=ours)
    export(tiny_run.path, format="gguf", out=ours, quant="q8_0", overwrite=True)
    assert ours.stat().st_mtime_ns != before

    earlier = export(tiny_run.path, format="hf", out=tmp_path / "earlier")
    result = _cli(tiny_run.path, "--format", "hf", "--out", earlier)
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert (earlier / "model.safetensors").is_file()

    hf = tmp_path / "dir"
    hf.mkdir()
    (hf / "notes.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="not written by tunesmith"):
        export(tiny_run.path, format="hf", out=hf, overwrite=True)
    assert (hf / "notes.txt").read_text() == "mine"


def test_a_full_disk_leaves_nothing_at_the_output_path(tiny_run, tmp_path, monkeypatch):
    import gguf

    def fill_up(self, *args, **kwargs):
        for fout in self.fout:
            fout.write(b"\0" * 4096)  # part of the file is on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fill_up)
    out = tmp_path / "sub" / "full.gguf"
    with pytest.raises(TunesmithError, match="the disk is full") as err:
        export(tiny_run.path, format="gguf", out=out)
    assert err.value.file == str(out)
    assert not out.exists() and os.listdir(out.parent) == []

    from transformers import PreTrainedModel

    def save_fills_up(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_fills_up)
    hf = tmp_path / "hf-full"
    result = _cli(tiny_run.path, "--format", "hf", "--out", hf)
    assert result.exit_code == 1 and "the disk is full" in result.output and "Traceback" not in result.output
    assert not hf.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sub"]

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TunesmithError, match="not enough disk space"):
        export(tiny_run.path, format="hf", out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -- llama.cpp itself ---------------------------------------------------------------------------


def _llama(path, **kwargs):
    """llama.cpp on the file, with weights used as stored: its CPU weight repacking ("extra buffer
    types", AMX/AVX-512 layouts) crashes on some CPUs (this project's AMX machine among them) even
    for llama.cpp's own GGUF files, and it changes only the memory layout, not what the file says."""
    llama_cpp = pytest.importorskip("llama_cpp")
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def as_stored():
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = as_stored
    try:
        return llama_cpp.Llama(model_path=str(path), n_threads=2, n_ctx=512, verbose=False, **kwargs)
    finally:
        low.llama_model_default_params = default


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by argmax over llama.cpp's logits (``llm`` made with logits_all=True), no sampler involved."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _ours_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by argmax over the full forward pass each step (no cache: the plainest reference)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_logits(model.model, ids)[-1].argmax()))
    return ids[-n:]


def test_llama_cpp_runs_a_tiny_fine_tune_exactly(tiny_run, tmp_path):
    """LoRA merged, Q/K permuted, norms and tied output right: f32 greedy tokens equal ours."""
    pytest.importorskip("llama_cpp")
    out = export(tiny_run.path, format="gguf", quant="f32", out=tmp_path / "tiny.gguf")
    llm = _llama(out, logits_all=True)
    ours = load(tiny_run.path, dtype="fp32")
    ids = ours.tokenizer.encode(TEXT[:120], add_special_tokens=False)
    llm.reset()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    torch.testing.assert_close(theirs, _logits(ours.model, ids), atol=2e-3, rtol=0)
    assert _llama_greedy(llm, ids, 32) == _ours_greedy(ours, ids, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, real_base_dir):
    """The bundled SmolLM2-135M exported as it is."""
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("real-export")
    return {q: export("smollm2-135m", format="gguf", quant=q, out=root / f"smol-{q}.gguf") for q in ("f16", "bf16", "q8_0")}


@pytest.fixture(scope="module")
def ours(real_base_dir):
    return load("smollm2-135m", dtype="fp32")


@pytest.mark.real_model
class TestRealModelInLlamaCpp:
    """The bundled SmolLM2-135M exported as it is, run by llama.cpp."""

    def test_same_token_ids_as_our_tokenizer(self, files, ours):
        llm = _llama(files["q8_0"], vocab_only=True)
        for text in TRICKY:
            expected = ours.tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
            assert llm.detokenize(expected, special=True).decode() == text

    @pytest.mark.parametrize("quant", ["f16", "bf16"])
    def test_greedy_text_is_ours(self, files, ours, quant):
        llm = _llama(files[quant], logits_all=True)
        ids = ours.tokenizer.encode(PROMPT, add_special_tokens=False)
        theirs = _llama_greedy(llm, ids, 40)
        expected = ours.generate(PROMPT, max_tokens=40, temperature=0)[0]
        assert expected.completion_tokens == 40
        assert ours.tokenizer.decode(theirs) == expected.text

    def test_q8_0_logits_within_the_stated_error(self, files, ours):
        """q8_0 against the fp32 original, 101 tokens of TEXT, measured with llama.cpp 0.3.36's CPU
        backend: top-1 agreement 97%, mean KL 0.004 nats/token, mean |diff| 0.21, max |diff| 1.77
        (f16: 100%, 3e-6, 0.007, 0.05). The bounds leave room for other CPUs' kernels."""
        llm = _llama(files["q8_0"], logits_all=True)
        ids = ours.tokenizer.encode(TEXT[:400], add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
        expected = _logits(ours.model, ids)
        top1 = (theirs.argmax(-1) == expected.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(
            theirs.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1).mean().item()
        diff = (theirs - expected).abs()
        assert top1 >= 0.93 and kl < 0.01 and diff.mean() < 0.3 and diff.max() < 3.0, (top1, kl, diff.mean(), diff.max())

    def test_f16_loads_back_through_transformers_gguf_reader(self, files, ours):
        """The bundled base arrives as GGUF through this reader: the export closes the round trip."""
        from transformers import AutoModelForCausalLM

        path = files["f16"]
        back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        ids = ours.tokenizer.encode(PROMPT, add_special_tokens=False)
        theirs, expected = _logits(back, ids), _logits(ours.model, ids)
        assert (theirs.argmax(-1) == expected.argmax(-1)).all()
        torch.testing.assert_close(theirs, expected, atol=0.1, rtol=0)

    def test_chat_template_renders_the_same_prompt(self, files, ours):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = _llama(files["q8_0"], vocab_only=True)
        template = llm.metadata["tokenizer.chat_template"]
        assert template == ours.tokenizer.chat_template
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
        formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>", add_generation_prompt=True)
        assert formatter(messages=messages).prompt == ours.chat_prompt(messages)
