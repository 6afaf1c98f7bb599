"""`tunesmith eval` on a tiny-model run: the files, their fields, the fit figures, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tunesmith import TunesmithError, finetune, load
from tunesmith.cli import app
from tunesmith.evaluate import EvalSettings, evaluate_run, extraction, fit, read_data
from tunesmith.rundir import Run
from tunesmith.tokens import book_joiner, pack, tokenize_rows
from tunesmith.train import TrainConfig

NOUNS = "lamp door street letter window carriage river garden stranger doctor city night candle road coat".split()
VERBS = "opened watched crossed carried answered followed lifted noticed remembered closed".split()
ADJS = "old quiet narrow grey heavy bright cold distant careful silent".split()


def prose(words: int, seed: int) -> str:
    """Plain sentences from a small vocabulary, in paragraphs of about 60 words."""
    rng = np.random.default_rng(seed)
    out, count, paragraph = [], 0, []
    while count < words:
        sentence = (f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}, "
                    f"and the {rng.choice(NOUNS)} {rng.choice(VERBS)} it.")
        paragraph.append(sentence)
        count += len(sentence.split())
        if len(paragraph) == 5:
            out.append(" ".join(paragraph))
            paragraph = []
    out.append(" ".join(paragraph))
    return "\n\n".join(p for p in out if p) + "\n"


SETTINGS = dict(words=600, probe_windows=4, sample_tokens=64, bootstrap=50)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval")
    (root / "book.txt").write_text(prose(3000, 0))
    (root / "valid.txt").write_text(prose(900, 1))
    return finetune(root / "book.txt", validation=root / "valid.txt", out=root / "run", progress=False,
                    samples=False, base="tiny-llama", block_size=64, batch_size=8, epochs=1)


def _numbers(obj, path=""):
    """Every leaf of a JSON tree with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_eval_writes_all_three_files_with_every_field(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--quick", "--words", "600", "--probe", "4"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "fidelity" in result.output  # the table (wrapped at 80 columns)
    data = json.loads((run_dir / "eval.json").read_text())
    assert (run_dir / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "eval.md").read_text()
    assert "| held-out perplexity |" in md and "style fidelity index (300 MFW)" in md

    for side in ("base", "finetuned"):
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert math.isfinite(data["fit"][side][key])
        assert data["extraction"][side]["windows"] == 4
        assert 0 <= data["extraction"][side]["rate"] <= 1
        assert data["words"][side] >= 600
        for key in ("distinct_2", "distinct_3"):
            assert 0 < data["diversity"][side][key] <= 1
    for side in ("base", "finetuned", "heldout"):
        cp = data["copying"][side]
        assert set(cp["novelty"]) == {"4", "8", "16", "32"}
        assert all(0 <= v <= 1 for v in cp["novelty"].values())
        assert 0 <= cp["copy_rate"] <= 1
        feats = data["style"]["features"][side]
        assert feats["sentence_length"] > 0 and 0 < feats["mattr"] <= 1
    # The held-out text is made of the training text's sentence pattern: much of it recurs.
    assert data["copying"]["heldout"]["novelty"]["4"] < 0.5
    for n in ("100", "300", "500"):
        row = data["style"]["mfw"][n]
        for key in ("delta_base", "delta_finetuned", "delta_heldout_vs_train", "fidelity_index"):
            assert row[key]["low"] <= row[key]["mean"] <= row[key]["high"]
    # Too little text for a stable Delta here: the result says so.
    assert data["style"]["reliable"] is False and any("unstable" in w for w in data["warnings"])
    # Every leaf is present and finite; the only nulls are the location/heading of an absent or unheaded span.
    for path, value in _numbers(data):
        if value is None:
            assert path.endswith((".location", ".heading")), path
        elif isinstance(value, float):
            assert math.isfinite(value), path


def test_perplexity_and_bits_per_byte_against_a_plain_forward_pass(tiny_run):
    run = Run(tiny_run.path)
    data = read_data(run)
    model = load(run.path, dtype="fp32")
    cfg = TrainConfig(**{k: v for k, v in run.config.items() if k in TrainConfig.__dataclass_fields__})
    got = fit(model, data.valid_rows, cfg, data.fmt)
    # Independently: plain logits and torch's cross-entropy over the same packed blocks.
    tok = model.tokenizer
    assert data.fmt == "book"  # pieces of one book are joined by a paragraph break, as in training
    rows = tokenize_rows(data.valid_rows, tok, book_joiner(tok))
    blocks = pack(*rows, cfg.block_size, tok.pad_token_id or tok.eos_token_id)
    nll, count, text_bytes = 0.0, 0, 0
    with torch.no_grad():
        for ids, mask in zip(blocks.ids, blocks.mask):
            logits = model.model(input_ids=torch.as_tensor(ids[None, :-1])).logits[0].float()
            keep = torch.as_tensor(mask[1:])
            targets = torch.as_tensor(ids[1:])
            nll += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
            for t in ids[1:][mask[1:]]:
                text_bytes += len(tok.decode([int(t)], skip_special_tokens=True).encode("utf-8"))
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * text_bytes), rel=1e-3)


def test_extraction_probe_counts_exact_continuations(tiny_run):
    model = load(tiny_run.path, dtype="fp32")
    prompts = np.random.default_rng(0).integers(0, 1000, size=(3, 50))
    greedy = [model.model.generate(torch.as_tensor(p[None]), max_new_tokens=5, do_sample=False)[0, 50:].numpy()
              for p in prompts]
    truth = np.stack(greedy)
    truth[1, 3] += 1  # the second window differs at its 4th token
    got = extraction(model, prompts, truth)
    assert got == {"windows": 3, "exact": 2, "rate": pytest.approx(2 / 3),
                   "mean_matching_prefix_tokens": pytest.approx((5 + 3 + 5) / 3)}


@pytest.mark.parametrize("damage, message", [
    ("no_data", "no data/train.jsonl"),
    ("empty_valid", "held-out set is empty"),
    ("small_valid", "2,500"),
    ("other_script", "without spaces between words"),
])
def test_bad_runs_fail_clearly_and_write_nothing(tiny_run, tmp_path, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    if damage == "no_data":
        shutil.rmtree(run_dir / "data")
    elif damage == "empty_valid":
        (run_dir / "data" / "valid.jsonl").write_text("")
    elif damage == "other_script":
        text = "東京の古い書店で、彼女は一冊の地図を見つけた。誰もその道を知らなかった。" * 200
        (run_dir / "data" / "valid.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    else:
        (run_dir / "data" / "valid.jsonl").write_text(json.dumps({"text": prose(100, 2)}) + "\n")
    with pytest.raises(TunesmithError, match=message):
        evaluate_run(run_dir, EvalSettings.make(True, **SETTINGS))
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--quick"])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not list(run_dir.glob("eval.*"))


@pytest.mark.real_model
def test_eval_and_copies_on_the_real_model(corpora, real_base_dir, tmp_path):
    """A short run of the real bundled model on the start of a real book: eval writes its figures,
    a real language model's bits per byte, and the copy finder names the book's lines."""
    from tunesmith.copies import find_copies

    lines = (corpora / "sherlock.txt").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    book = tmp_path / "sherlock-start.txt"
    book.write_text("".join(lines[:1500]), encoding="utf-8")  # about 12,000 words
    run = finetune(book, out=tmp_path / "run", progress=False, samples=False, base="smollm2-135m",
                   block_size=128, batch_size=4, lr=2e-3, max_steps=3, valid_fraction=0.1)
    result = evaluate_run(run.path, EvalSettings.make(True, words=500, probe_windows=4, sample_tokens=64,
                                                      bootstrap=20))
    assert {p.name for p in run.path.glob("eval.*")} == {"eval.json", "eval.md", "eval.png"}
    for side in ("base", "finetuned"):
        # a trained English model: about 1 bit per byte (a random one over 49,152 tokens: ~4)
        assert 0.3 < result["fit"][side]["bits_per_byte"] < 2.0
        assert result["words"][side] >= 500
    # the author's unseen pages share no 32-token passage with the rest of the book
    assert result["copying"]["heldout"]["novelty"]["32"] > 0.95
    # a passage of the training text, checked against the run, is found at its line of the book
    words = [(w, number) for number, line in enumerate(lines[:1500], start=1) for w in line.split()]
    plain = [w for w, _ in words]
    for row in (run.path / "data" / "train.jsonl").read_text().splitlines():
        piece = json.loads(row)["text"].split()[5:25]
        found = [k for k in range(len(plain) - len(piece)) if plain[k : k + len(piece)] == piece]
        if len(piece) == 20 and len(found) == 1:
            break
    passage = " ".join(piece)
    report = find_copies(run.path, f"Something new was written here today. {passage}")
    assert report.longest is not None and report.longest.text == passage
    assert report.longest.locations[0].file == "sherlock-start.txt"
    assert report.longest.locations[0].line == words[found[0]][1]
