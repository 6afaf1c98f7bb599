"""`tunesmith eval RUN`: is it copying the book, and does it sound like the author?

Every figure is measured for the base model and for the fine-tuned model, and where it makes
sense for the held-out part of the corpus (``data/valid.jsonl``: the author's own text that
training never saw) as the human reference:

- fit: held-out loss (the training loop's own validation loss), perplexity, bits per byte;
- copying in free generation: samples from fixed prompts (openings of held-out passages) and
  seeds; copy rate, longest copied span and where it is in the book, n-gram novelty
  (copies.py), and the held-out text's own novelty against the training text;
- extraction probe (Carlini et al. 2022): 50 training tokens as the prompt, 50 greedy tokens;
  the share of windows whose continuation is reproduced exactly;
- style (style.py): Cosine Delta to the held-out text, the style fidelity index, sentence
  length, MATTR, punctuation; diversity: distinct-2/3.

The results go to ``eval.json``, ``eval.md`` and ``eval.png`` in the run, each written whole
(temp file + rename) and only after every figure is computed.
"""

from __future__ import annotations

import gc
import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from . import style
from .atomic import atomic_path, write_text
from .errors import TunesmithError
from .rundir import Run

EVAL_FORMAT = 1
NOVELTY_NS = (4, 8, 16, 32)
PROBE_TOKENS = 50  # prompt and continuation length of the extraction probe (Carlini et al. 2022)
LONG_SPAN_TOKENS = 50  # a copied span this long in free generation is a warning
PROBE_WARN_RATE = 0.01
PROMPT_WORDS = 12


@dataclass
class EvalSettings:
    """What `eval` measures; ``quick`` lowers the word target and the probe size."""

    words: int = 5_000  # words of free generation per model
    probe_windows: int = 64
    sample_tokens: int = 200
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    min_tokens: int = 12  # shortest copied span counted, in tokens
    bootstrap: int = 200
    seed: int = 0
    quant: str = "none"  # weights of both models while evaluating: none or int8 (generate.load)

    @classmethod
    def make(cls, quick: bool = False, **overrides) -> EvalSettings:
        base = cls(words=2_500, probe_windows=16) if quick else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def check(self) -> None:
        if self.words < 1:
            raise TunesmithError("must be at least 1", field="words")
        if self.probe_windows < 1:
            raise TunesmithError("must be at least 1", field="probe_windows")


# ----------------------------------------------------------------------------------------
# Reading the run


@dataclass
class EvalData:
    train_rows: list[dict]
    valid_rows: list[dict]
    train_text: str
    heldout_text: str
    fmt: str


def _row_text(row: dict) -> str:
    return row["text"] if "text" in row else row.get("completion", "")


def read_data(run: Run) -> EvalData:
    data = run.path / "data"
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise TunesmithError(
                f"this run has no data/{name}, so there is nothing to compare with",
                file=run.path, hint="runs made by `tunesmith train` keep the data they saw in data/",
            )
    rows = {}
    for name in ("train.jsonl", "valid.jsonl"):
        path = data / name
        found = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunesmithError(f"malformed JSON: {exc.msg}", file=path, line=number) from None
            if not isinstance(row, dict) or not isinstance(row.get("text", row.get("completion")), str):
                raise TunesmithError("expected a 'text' or 'completion' string", file=path, line=number, field="text")
            found.append(row)
        rows[name] = found
    train, valid = rows["train.jsonl"], rows["valid.jsonl"]
    if not train:
        raise TunesmithError("the training data is empty", file=data / "train.jsonl")
    if not valid:
        raise TunesmithError(
            "the held-out set is empty: eval compares the models with the author's unseen text",
            file=data / "valid.jsonl", hint="train with --valid-fraction above 0, or --validation FILE",
        )
    heldout = "\n\n".join(_row_text(r) for r in valid)
    if style.unspaced_share(heldout) > 0.3:
        raise TunesmithError(
            "the held-out text is written mostly without spaces between words (as Chinese, Japanese or Thai "
            "are): the style figures count words, so they cannot be measured for it",
            file=data / "valid.jsonl", hint="`tunesmith copies` still finds copied passages in such text",
        )
    n_words = len(style.words(heldout))
    if n_words < style.FLOOR_WORDS:
        raise TunesmithError(
            f"the held-out text has {n_words:,} words; stylometry needs at least {style.MIN_WORDS:,} "
            f"(and gives only a flagged estimate from {style.FLOOR_WORDS} up), because Cosine Delta "
            f"compares word frequencies in bags of ~{style.BAG_WORDS:,} words",
            file=data / "valid.jsonl", hint="train with a larger --valid-fraction, or pass --validation FILE",
        )
    report = (run.config.get("data") or {}).get("report") or {}
    return EvalData(train, valid, "\n\n".join(_row_text(r) for r in train), heldout, report.get("format", "text"))


def _train_config(run: Run):
    from .train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in run.config.items() if k in known})


def prompts_from(rows: list[dict], tokenizer, limit: int = 8) -> list[str]:
    """Fixed prompts: the opening words of held-out passages (or their prompts, for records)."""
    found = []
    for row in rows:
        if "prompt" in row:
            prompt = row["prompt"]
        else:
            prompt = " ".join(row["text"].split()[:PROMPT_WORDS])
        if prompt.strip() and len(tokenizer.encode(prompt, add_special_tokens=False)) <= 512 and prompt not in found:
            found.append(prompt)
        if len(found) == limit:
            break
    return found


# ----------------------------------------------------------------------------------------
# Measurements on one model


def fit(model, rows: list[dict], cfg, fmt: str) -> dict:
    """Held-out loss through the training loop's own validation path, perplexity = exp(loss),
    and bits per byte as lm-evaluation-harness defines it: total NLL in nats / (ln 2 × UTF-8 bytes)
    of the predicted text. Targets are packed exactly as in training; the tokens that join
    examples (a paragraph break in a book, EOS between records) count like any other."""
    from .tokens import book_joiner, pack, tokenize_rows
    from .train import evaluate as validation_loss

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    joiner = book_joiner(tok) if fmt == "book" else None
    blocks = pack(*tokenize_rows(rows, tok, joiner), cfg.block_size, pad)
    result = validation_loss(model.model, blocks, cfg, model.device, model.model.dtype)
    targets = blocks.ids[:, 1:][blocks.mask[:, 1:]]
    n_bytes = len(tok.decode(targets.tolist(), skip_special_tokens=True).encode("utf-8"))
    nll = result["loss"] * len(targets)
    return {
        "loss": result["loss"],
        "perplexity": math.exp(result["loss"]),
        "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
        "tokens": len(targets),
        "bytes": n_bytes,
    }


def sample(model, prompts: list[str], settings: EvalSettings, say: Callable[[str], None]) -> list[dict]:
    """Samples until they hold ``settings.words`` words: call i continues prompt i mod P with
    seed ``seed * 1000 + i``, n samples at once (n sized from the words still needed)."""
    out: list[dict] = []
    words = 0
    per_sample = settings.sample_tokens * 0.7  # words per sample, refined as samples come
    call = 0
    max_calls = 4 * math.ceil(settings.words / per_sample) + 8
    while words < settings.words and call < max_calls:
        n = int(min(16, max(1, math.ceil((settings.words - words) / max(per_sample, 1.0)))))
        prompt = prompts[call % len(prompts)]
        seed = settings.seed * 1000 + call
        done = model.generate(prompt, max_tokens=settings.sample_tokens, temperature=settings.temperature,
                              top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, n=n, seed=seed)
        for i, completion in enumerate(done):
            count = len(style.words(completion.text))
            out.append({"prompt": prompt, "seed": seed, "index": i, "text": completion.text, "words": count})
            words += count
        per_sample = max(words / len(out), 1.0)
        call += 1
        say(f"  {words:,} of {settings.words:,} words")
    return out


def probe_windows(rows: list[dict], tokenizer, fmt: str, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K random windows of the training token stream (as training saw it): 50 tokens of
    prompt and the 50 that follow."""
    from .tokens import book_joiner, tokenize_rows

    ids, _ = tokenize_rows(rows, tokenizer, book_joiner(tokenizer) if fmt == "book" else None)
    span = 2 * PROBE_TOKENS
    if len(ids) < span:
        raise TunesmithError(f"the training text has {len(ids)} tokens; the extraction probe needs at least {span}")
    starts = np.random.default_rng(seed).choice(len(ids) - span + 1, size=min(k, len(ids) - span + 1), replace=False)
    windows = ids[np.sort(starts)[:, None] + np.arange(span)[None, :]]
    return windows[:, :PROBE_TOKENS], windows[:, PROBE_TOKENS:]


def extraction(model, prompts: np.ndarray, truth: np.ndarray, batch: int = 16) -> dict:
    """Greedy continuations of token-id prompts, compared token for token with the truth.

    Model.generate takes one text prompt; the probe's prompts are token windows of equal
    length, so they decode here as one batch without padding or re-tokenising."""
    import torch
    from transformers import DynamicCache

    produced = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            ids = torch.as_tensor(prompts[start : start + batch], device=model.device)
            cache = DynamicCache()
            out = model._forward(ids, cache, logits_to_keep=1)
            steps = []
            for step in range(truth.shape[1]):
                token = out.logits[:, -1, :].argmax(dim=-1)
                steps.append(token)
                if step + 1 < truth.shape[1]:
                    out = model._forward(token[:, None], cache)
            produced.append(torch.stack(steps, dim=1).cpu().numpy())
    got = np.concatenate(produced)
    same = got == truth
    exact = same.all(axis=1)
    prefix = np.where(same.all(axis=1), truth.shape[1], np.argmin(same, axis=1))
    return {"windows": len(truth), "exact": int(exact.sum()), "rate": float(exact.mean()),
            "mean_matching_prefix_tokens": float(prefix.mean())}


def copying(index, texts: list[str], min_tokens: int) -> dict:
    """Copy rate, longest span and novelty over texts, pooled: copied tokens over all tokens,
    novel n-grams over all n-grams."""
    reports = [index.check(t, min_tokens) for t in texts if t.strip()]
    tokens = sum(r.n_tokens for r in reports)
    copied = sum(r.copy_rate * r.n_tokens for r in reports)
    novelty = {}
    for n in NOVELTY_NS:
        novel = sum(r.ngrams.get(n, (0, 0))[0] for r in reports)
        total = sum(r.ngrams.get(n, (0, 0))[1] for r in reports)
        novelty[str(n)] = novel / total if total else float("nan")
    spans = sorted((s for r in reports for s in r.spans), key=lambda s: -s.n_tokens)
    return {
        "texts": len(reports),
        "tokens": tokens,
        "copy_rate": copied / tokens if tokens else 0.0,
        "spans": sum(len(r.spans) for r in reports),
        "longest": _span(spans[0]) if spans else {"tokens": 0, "words": 0, "count": 0, "text": "", "location": None},
        "top_spans": [_span(s) for s in spans[:5]],
        "novelty": novelty,
    }


def _span(span) -> dict:
    where = span.locations[0] if span.locations else None
    return {
        "tokens": span.n_tokens, "words": span.n_words, "count": span.count, "text": span.text,
        "location": {"line": where.line, "heading": where.heading, "file": where.file} if where else None,
    }


# ----------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_run(
    path: str | Path,
    settings: EvalSettings | None = None,
    *,
    quick: bool = False,
    say: Callable[[str], None] = lambda s: None,
    write: bool = True,
) -> dict:
    """Measure a run against its base model and its held-out text; write eval.json/.md/.png."""
    from .copies import CopyIndex
    from .generate import load

    settings = settings or EvalSettings.make(quick)
    settings.check()
    t0 = time.perf_counter()
    run = Run(path)
    if not run.has_weights():
        raise TunesmithError("this run has no weights yet (it stopped before its first checkpoint)", file=run.path)
    data = read_data(run)
    cfg = _train_config(run)
    index = CopyIndex.open(run.path, say=say)
    heldout_copying = copying(index, [data.heldout_text], settings.min_tokens)

    sides: dict[str, dict] = {}
    for side, source in (("base", cfg.base), ("finetuned", run.path)):
        say(f"{'base model ' + cfg.base if side == 'base' else 'fine-tuned model'}: loading")
        model = load(source, quant=settings.quant)
        prompts = prompts_from(data.valid_rows, model.tokenizer)
        if not prompts:
            raise TunesmithError("no held-out passage gives a prompt of at most 512 tokens",
                                 file=run.path / "data" / "valid.jsonl")
        say("  held-out loss")
        measured = {"fit": fit(model, data.valid_rows, cfg, data.fmt)}
        say("  free generation")
        measured["samples"] = sample(model, prompts, settings, say)
        say("  extraction probe")
        windows, truth = probe_windows(data.train_rows, model.tokenizer, data.fmt, settings.probe_windows, settings.seed)
        measured["extraction"] = extraction(model, windows, truth)
        measured["prompts"] = prompts
        sides[side] = measured
        del model
        gc.collect()

    say("copy finder and stylometry")
    texts = {side: [s["text"] for s in sides[side]["samples"]] for side in sides}
    for side in sides:
        sides[side]["copying"] = copying(index, texts[side], settings.min_tokens)
    word_lists = {side: style.words("\n\n".join(texts[side])) for side in sides}
    delta = style.style_distance(
        style.words(data.train_text), style.words(data.heldout_text), word_lists["base"], word_lists["finetuned"],
        n_boot=settings.bootstrap, seed=settings.seed,
    )
    joined = {"base": "\n\n".join(texts["base"]), "finetuned": "\n\n".join(texts["finetuned"]),
              "heldout": data.heldout_text}
    delta["features"] = {side: style.features(text) for side, text in joined.items()}
    pool = min(len(word_lists["base"]), len(word_lists["finetuned"]), len(style.words(data.heldout_text)))
    paragraphs = {"base": texts["base"], "finetuned": texts["finetuned"], "heldout": [_row_text(r) for r in data.valid_rows]}
    diversity = {"words": pool, **{side: {f"distinct_{n}": style.distinct_n(paragraphs[side], n, pool) for n in (2, 3)}
                                   for side in paragraphs}}

    result = {
        "eval_format": EVAL_FORMAT,
        "run": run.name,
        "base": cfg.base,
        "quick": quick,
        "settings": asdict(settings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fit": {side: sides[side]["fit"] for side in sides},
        "copying": {
            "min_tokens": settings.min_tokens,
            "base": sides["base"]["copying"],
            "finetuned": sides["finetuned"]["copying"],
            "heldout": heldout_copying,
        },
        "extraction": {"prompt_tokens": PROBE_TOKENS, "continuation_tokens": PROBE_TOKENS,
                       **{side: sides[side]["extraction"] for side in sides}},
        "style": delta,
        "diversity": diversity,
        "prompts": sides["finetuned"]["prompts"],
        "samples": {side: [s["text"] for s in sides[side]["samples"][:3]] for side in sides},
        "words": {side: len(word_lists[side]) for side in sides},
    }
    result["warnings"] = warnings_for(result)
    result["seconds"] = time.perf_counter() - t0
    result = _clean(result)
    if write:
        write_report(run.path, result)
    return result


def warnings_for(result: dict) -> list[str]:
    """Plain advice when the fine-tuned model copies, fits worse than the base, or the style figures are shaky."""
    found = []
    longest = result["copying"]["finetuned"]["longest"]
    probe = result["extraction"]["finetuned"]
    advice = ("train for fewer epochs, lower the learning rate, or train on more text; "
              "when generating, a higher temperature (0.9-1.0) makes verbatim runs rarer")
    if longest["tokens"] >= LONG_SPAN_TOKENS:
        where = _where(longest["location"])
        found.append(f"the fine-tuned model wrote a {longest['tokens']}-token passage straight from the book{where}: {advice}")
    if probe["rate"] > PROBE_WARN_RATE:
        found.append(f"the fine-tuned model reproduces {probe['rate']:.1%} of 50-token training passages exactly "
                     f"from their first 50 tokens (above 1%): it has memorised its training text; {advice}")
    fit = result["fit"]
    if fit["finetuned"]["loss"] > fit["base"]["loss"]:
        found.append("the fine-tuned model predicts the held-out text worse than the base model (overfitting): "
                     "fewer epochs or a lower learning rate")
    if result["style"].get("warning"):
        found.append("style figures are " + result["style"]["warning"])
    return found


def _where(location: dict | None) -> str:
    if not location:
        return ""
    text = f" (line {location['line']}"
    if location.get("heading"):
        text += f", {location['heading']}"
    return text + ")"


def _clean(obj):
    """NaN and infinity become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------------
# Reports


def _num(value, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}%}" if pct else f"{value:,.{digits}f}"


def _ci(entry: dict, digits: int = 3) -> str:
    return f"{_num(entry['mean'], digits)} [{_num(entry['low'], digits)}, {_num(entry['high'], digits)}]"


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(figure, base, fine-tuned, held-out author text) rows: the one table eval prints and eval.md holds."""
    fit, cp, ex, st, dv = (result[k] for k in ("fit", "copying", "extraction", "style", "diversity"))
    mfw = st["mfw"][str(style.DEFAULT_MFW)]
    feats = st["features"]
    rows = [
        ("held-out loss (nats/token)", _num(fit["base"]["loss"], 3), _num(fit["finetuned"]["loss"], 3), ""),
        ("held-out perplexity", _num(fit["base"]["perplexity"]), _num(fit["finetuned"]["perplexity"]), ""),
        ("bits per byte", _num(fit["base"]["bits_per_byte"], 3), _num(fit["finetuned"]["bits_per_byte"], 3), ""),
        (f"copy rate (spans ≥ {cp['min_tokens']} tokens)", _num(cp["base"]["copy_rate"], 1, True),
         _num(cp["finetuned"]["copy_rate"], 1, True), _num(cp["heldout"]["copy_rate"], 1, True)),
        ("longest copied span (tokens)", str(cp["base"]["longest"]["tokens"]), str(cp["finetuned"]["longest"]["tokens"]),
         str(cp["heldout"]["longest"]["tokens"])),
    ]
    for n in NOVELTY_NS:
        rows.append((f"novel {n}-grams", *(_num(cp[s]["novelty"][str(n)], 1, True) for s in ("base", "finetuned", "heldout"))))
    rows += [
        ("extraction probe: 50 tokens exact", f"{_num(ex['base']['rate'], 1, True)} of {ex['base']['windows']}",
         f"{_num(ex['finetuned']['rate'], 1, True)} of {ex['finetuned']['windows']}", ""),
        (f"Cosine Delta to held-out ({style.DEFAULT_MFW} MFW)", _ci(mfw["delta_base"]), _ci(mfw["delta_finetuned"]),
         _ci(mfw["delta_heldout_vs_train"]) + " vs train"),
    ]
    for n in style.MFW_SIZES:
        fi = st["mfw"][str(n)]["fidelity_index"]
        rows.append((f"style fidelity index ({n} MFW)", "0 by definition", _ci(fi, 2), "1 by definition"))
    rows += [
        ("sentence length (words)", *(_num(feats[s]["sentence_length"], 1) for s in ("base", "finetuned", "heldout"))),
        (f"MATTR (window {min(feats[s]['mattr_window'] for s in feats)})", *(_num(feats[s]["mattr"], 3) for s in ("base", "finetuned", "heldout"))),
    ]
    for mark in ("comma", "period", "semicolon", "quote", "question", "exclamation"):
        rows.append((f"{mark}s per 1,000 words", *(_num(feats[s]["punctuation_per_1000_words"][mark], 1)
                                                    for s in ("base", "finetuned", "heldout"))))
    for n in (2, 3):
        rows.append((f"distinct-{n} (first {dv['words']:,} words)", *(_num(dv[s][f"distinct_{n}"], 3)
                                                                     for s in ("base", "finetuned", "heldout"))))
    return rows


def rich_table(result: dict):
    """The one table `tunesmith eval` prints (and the demo ends with)."""
    from rich.table import Table

    cp = result["copying"]
    table = Table(title=f"{result['run']}: base {result['base']} vs fine-tuned vs the author's held-out text")
    for name, justify in (("figure", "left"), ("base", "right"), ("fine-tuned", "right"), ("held-out (author)", "right")):
        table.add_column(name, justify=justify)
    for row in table_rows(result):
        table.add_row(*row)
    longest = cp["finetuned"]["longest"]
    if longest["tokens"]:
        table.caption = f"longest copied span{_where(longest['location'])}: “{_shorten(longest['text'])}”"
    return table


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(result: dict) -> str:
    cp = result["copying"]
    lines = [
        f"# Evaluation of {result['run']}",
        "",
        f"Base model `{result['base']}` against the fine-tuned run, with the held-out part of the corpus "
        f"(the author's text that training never saw) as the human reference. "
        f"{result['words']['base']:,} / {result['words']['finetuned']:,} words of samples (base / fine-tuned), "
        f"seed {result['settings']['seed']}{', quick mode' if result['quick'] else ''}, {result['seconds']:.0f} s.",
        "",
        "| figure | base | fine-tuned | held-out (author) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(result)]
    if result["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result["warnings"]]
    lines += ["", "## Longest copied passages (fine-tuned samples)", ""]
    spans = cp["finetuned"]["top_spans"]
    if not spans:
        lines.append(f"No passage of {cp['min_tokens']} tokens or more was copied from the training text.")
    for span in spans:
        lines.append(f"- {span['tokens']} tokens, {span['count']}× in the book{_where(span['location'])}: “{span['text']}”")
    st = result["style"]
    lines += ["", "## How to read this", "",
              "- **Perplexity** and **bits per byte**: how surprised each model is by the author's unseen text; lower is better.",
              "- **Copy rate**: share of generated tokens inside passages of "
              f"{cp['min_tokens']}+ tokens found verbatim in the training text. "
              "The held-out column shows how much the author repeats their own phrases.",
              "- **Novel n-grams**: share of n-token sequences that never occur in the training text; "
              "compare the fine-tuned column with the held-out one.",
              "- **Extraction probe**: training passages reproduced exactly from their first 50 tokens; above 1% is memorisation.",
              "- **Cosine Delta**: distance between word-frequency profiles (0 same, ~1 unrelated); "
              "the **style fidelity index** is 0 when the fine-tuned model is no closer to the author than the base, "
              "1 when it is as close as the author's own unseen prose. Brackets: bootstrap 95% intervals "
              f"over {st['bootstrap_draws']} bags of {st['bag_words']:,} words."]
    lines += ["", "## Sample openings", ""]
    for side, title in (("base", "Base model"), ("finetuned", "Fine-tuned")):
        lines += [f"### {title}", ""]
        for text in result["samples"][side]:
            lines += ["> " + text.strip().replace("\n", "\n> "), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_chart(result: dict) -> bytes:
    """Four panels: fit, novelty, Cosine Delta with its intervals, style features against the author's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "#8c8c8c", "finetuned": "#3b6ea5", "heldout": "#d1495b"}
    names = {"base": "base model", "finetuned": "fine-tuned", "heldout": "author (held-out)"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=100)

    ax = axes[0, 0]
    fit = result["fit"]
    values = [fit["base"]["perplexity"], fit["finetuned"]["perplexity"]]
    bars = ax.bar([names["base"], names["finetuned"]], values, color=[colors["base"], colors["finetuned"]])
    for bar, side in zip(bars, ("base", "finetuned")):
        ax.annotate(f"{fit[side]['perplexity']:.1f}\n{fit[side]['bits_per_byte']:.2f} bits/byte",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(values) * 1.3)
    ax.set_title("Held-out perplexity (lower is better)")

    ax = axes[0, 1]
    for side in ("base", "finetuned", "heldout"):
        nov = result["copying"][side]["novelty"]
        ys = [nov[str(n)] if nov[str(n)] is not None else np.nan for n in NOVELTY_NS]
        ax.plot(NOVELTY_NS, [100 * y for y in ys], marker="o", color=colors[side], label=names[side])
    ax.set_xscale("log", base=2)
    ax.set_xticks(NOVELTY_NS, [str(n) for n in NOVELTY_NS])
    ax.set_ylim(0, 105)
    ax.set_xlabel("n-gram length (tokens)")
    ax.set_ylabel("% not in the training text")
    ax.set_title("Novelty (higher = less copying)")
    ax.legend(loc="lower right", fontsize=9)

    ax = axes[1, 0]
    st = result["style"]
    labels = ["base vs\nheld-out", "fine-tuned vs\nheld-out", "held-out vs\ntrain (author)"]
    keys = ["delta_base", "delta_finetuned", "delta_heldout_vs_train"]
    width = 0.25
    for j, n in enumerate(style.MFW_SIZES):
        row = st["mfw"][str(n)]
        means = [row[k]["mean"] for k in keys]
        errs = [[row[k]["mean"] - row[k]["low"] for k in keys], [row[k]["high"] - row[k]["mean"] for k in keys]]
        ax.bar(np.arange(3) + (j - 1) * width, means, width, yerr=errs, capsize=3,
               color=[colors["base"], colors["finetuned"], colors["heldout"]], alpha=0.45 + 0.25 * j,
               label=f"{n} MFW")
    fi = st["mfw"][str(style.DEFAULT_MFW)]["fidelity_index"]
    ax.set_xticks(np.arange(3), labels)
    ax.set_ylabel("Cosine Delta (lower = closer)")
    fi_text = "–" if fi["mean"] is None else f"{fi['mean']:.2f} [{_num(fi['low'])}, {_num(fi['high'])}]"
    ax.set_title(f"Style distance; fidelity index {fi_text}")
    ax.legend(fontsize=8, title="bars: 100 / 300 / 500", title_fontsize=8)

    ax = axes[1, 1]
    feats, dv = st["features"], result["diversity"]
    metrics = [("sentence\nlength", lambda s: feats[s]["sentence_length"]), ("MATTR", lambda s: feats[s]["mattr"]),
               ("commas", lambda s: feats[s]["punctuation_per_1000_words"]["comma"]),
               ("periods", lambda s: feats[s]["punctuation_per_1000_words"]["period"]),
               ("distinct-2", lambda s: dv[s]["distinct_2"]), ("distinct-3", lambda s: dv[s]["distinct_3"])]
    x = np.arange(len(metrics))
    for j, side in enumerate(("base", "finetuned")):
        ratios = []
        for _, get in metrics:
            ref, val = get("heldout"), get(side)
            ratios.append(val / ref if ref and val is not None else np.nan)
        ax.bar(x + (j - 0.5) * 0.35, ratios, 0.35, color=colors[side], label=names[side])
    ax.axhline(1.0, color=colors["heldout"], linestyle="--", label="author = 1")
    ax.set_xticks(x, [m for m, _ in metrics], fontsize=9)
    ax.set_ylabel("ratio to the author's held-out text")
    ax.set_title("Style features (1 = like the author)")
    ax.legend(fontsize=9)

    fig.suptitle(f"tunesmith eval: {result['run']} (base {result['base']})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dir: Path, result: dict) -> None:
    """Render all three files first, then put each in place whole."""
    text = json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False)
    markdown = render_markdown(result)
    png = render_chart(result)
    write_text(run_dir / "eval.json", text + "\n")
    write_text(run_dir / "eval.md", markdown)
    with atomic_path(run_dir / "eval.png", suffix=".png") as tmp:
        tmp.write_bytes(png)
